"""The job database's schema, as numbered migrations: the one place that creates or changes a table.

`PRAGMA user_version` (an integer in the database file's header) is the number of the last step
applied. Version 0 is either a new, empty database or one written by dropq 0.1.0, which created its
tables without setting a version. Step 1 is exactly the 0.1.0 schema, written with `IF NOT EXISTS`:
it creates a new database and leaves a 0.1.0 one as it is, so the two need not be told apart. A new
database goes through the same steps as an upgraded one, so the two paths cannot drift apart.

Each step runs in its own transaction together with the version it sets: a crash or a failing step
leaves the database at the version before, never half-way, and the next start tries again. Only the
daemon migrates (it holds the state directory's lock); readers (the CLI, the dashboard) open the
database read-only and refuse only a version newer than they know, since they cannot read a schema
from the future, while a database one version older is what they meet when they are upgraded
before the daemon is restarted.

Adding migration N+1 (never edit, renumber or remove a released step):

1. Append a step to MIGRATIONS, e.g.
   `Migration(3, "jobs.tag: a person's label for a job", "ALTER TABLE jobs ADD COLUMN tag TEXT")`.
   The SQL may hold several statements; for a change of data, give a function that takes the
   connection instead (it runs inside the step's transaction: do not commit in it).
2. Give the new field of `JobRecord` (store.py) a default, so that a reader still meets the
   previous schema without failing.
3. Run `pytest tests/test_migrations.py`: it applies every step to the schema before it, checks that
   the upgraded 0.1.0 fixture ends with the same schema as a new database, and that its jobs still
   run. A release that changes the schema adds a fixture of its own the same way
   (tests/fixtures/README.md).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from dropq.errors import SchemaError


@dataclass(frozen=True)
class Migration:
    #: the user_version the database has once this step is applied: 1, 2, 3, ... in order
    version: int
    #: what the step changes and why, for the log and the next reader
    why: str
    #: SQL (one or more statements), or a function given the connection inside the step's transaction
    change: str | Callable[[sqlite3.Connection], None]

    def apply(self, db: sqlite3.Connection) -> None:
        if callable(self.change):
            self.change(db)
            return
        for statement in statements(self.change):
            db.execute(statement)


#: the schema dropq 0.1.0 created with executescript(), word for word
SCHEMA_0_1_0 = """
CREATE TABLE IF NOT EXISTS jobs (
    seq           INTEGER PRIMARY KEY AUTOINCREMENT,
    id            TEXT NOT NULL UNIQUE,
    source        TEXT NOT NULL,
    status        TEXT NOT NULL,
    priority      INTEGER NOT NULL DEFAULT 0,
    attempts      INTEGER NOT NULL DEFAULT 0,
    retries       INTEGER NOT NULL DEFAULT 0,
    worker        TEXT,
    error         TEXT,
    manifest      TEXT,
    outcome       TEXT,
    submitted_at  REAL NOT NULL,
    started_at    REAL,
    finished_at   REAL,
    not_before    REAL NOT NULL DEFAULT 0,
    deadline      REAL,
    updated_at    REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_ready ON jobs (status, priority DESC, seq);
-- the dashboard's and the API's pages of jobs by status, newest first, and the throughput chart
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, seq);
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs (finished_at) WHERE finished_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS workers (
    name        TEXT PRIMARY KEY,
    state       TEXT NOT NULL,
    job         TEXT,
    detail      TEXT,
    updated_at  REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key    TEXT PRIMARY KEY,
    value  TEXT NOT NULL
);
"""

MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "the schema of dropq 0.1.0, whose databases are at version 0", SCHEMA_0_1_0),
    Migration(2, "environments: programs' dependency environments; jobs.env, the one a job runs in, and "
                 "jobs.held, the one a queued job waits for (the ready index skips held jobs)", """
CREATE TABLE environments (
    id          TEXT PRIMARY KEY,
    spec        TEXT NOT NULL,
    target      TEXT NOT NULL,
    state       TEXT NOT NULL,
    error       TEXT,
    packages    TEXT,
    size_bytes  INTEGER,
    builds      INTEGER NOT NULL DEFAULT 0,
    created_at  REAL NOT NULL,
    started_at  REAL,
    built_at    REAL,
    failed_at   REAL,
    last_used   REAL
);
ALTER TABLE jobs ADD COLUMN env TEXT;
ALTER TABLE jobs ADD COLUMN held TEXT;
DROP INDEX jobs_ready;
CREATE INDEX jobs_ready ON jobs (status, held, priority DESC, seq);
CREATE INDEX jobs_held ON jobs (held) WHERE held IS NOT NULL;
"""),
    Migration(3, "retention: jobs.pruned_at, when a job's outbox folder was removed (its record stays, so counts "
                 "hold), and jobs.folder_bytes, the folder's size once measured", """
ALTER TABLE jobs ADD COLUMN pruned_at REAL;
ALTER TABLE jobs ADD COLUMN folder_bytes INTEGER;
CREATE INDEX jobs_retained ON jobs (finished_at) WHERE finished_at IS NOT NULL AND pruned_at IS NULL;
"""),
    Migration(4, "deliveries: webhooks to send when a job is published, kept until delivered or given up, so "
                 "that they survive a restart", """
CREATE TABLE deliveries (
    job          TEXT PRIMARY KEY,
    url          TEXT NOT NULL,
    state        TEXT NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    next_at      REAL NOT NULL,
    last_error   TEXT,
    created_at   REAL NOT NULL,
    delivered_at REAL
);
CREATE INDEX deliveries_due ON deliveries (next_at) WHERE state = 'pending';
"""),
    Migration(5, "owners: jobs.owner_uid and jobs.owner_gid, who dropped the manifest (lstat at its claim), so that "
                 "a daemon running as root publishes the job's folder as theirs and obeys cancels from them only, "
                 "after a restart too", """
ALTER TABLE jobs ADD COLUMN owner_uid INTEGER;
ALTER TABLE jobs ADD COLUMN owner_gid INTEGER;
"""),
    Migration(6, "arrays: a task of an array job is a row of jobs with jobs.parent (the array's id) and "
                 "jobs.task_index, so that the balancer's pick, retries and the capacity rule serve tasks as they "
                 "serve jobs; jobs.tasks is an array's number of tasks (NULL: not an array)", """
ALTER TABLE jobs ADD COLUMN parent TEXT;
ALTER TABLE jobs ADD COLUMN task_index INTEGER;
ALTER TABLE jobs ADD COLUMN tasks INTEGER;
CREATE INDEX jobs_tasks ON jobs (parent, status) WHERE parent IS NOT NULL;
"""),
    Migration(7, "agents: the hosts that lease jobs from this daemon (`dropq agent`), so that their workers are "
                 "known again at the next start (their running jobs are collected, not run again) and `dropq "
                 "workers` groups workers by agent with each one's last contact", """
CREATE TABLE agents (
    name          TEXT PRIMARY KEY,
    host          TEXT NOT NULL,
    workers       INTEGER NOT NULL,
    pool          TEXT NOT NULL,
    first_seen    REAL NOT NULL,
    last_contact  REAL NOT NULL
);
"""),
)

#: the schema version this dropq writes
LATEST = MIGRATIONS[-1].version


def statements(script: str) -> list[str]:
    """The statements of an SQL script, cut where SQLite says one ends (never inside a string or comment)."""
    found, current = [], ""
    for piece in script.split(";"):
        current += piece + ";"
        if sqlite3.complete_statement(current):
            if current.strip(" \t\n;"):
                found.append(current.strip())
            current = ""
    if current.strip(" \t\n;"):
        raise ValueError(f"the SQL does not end where a statement ends: {current.strip()[:60]!r}")
    return found


def version_of(db: sqlite3.Connection) -> int:
    return int(db.execute("PRAGMA user_version").fetchone()[0])


def check_known(db: sqlite3.Connection, *, where: Path, steps: Sequence[Migration] = MIGRATIONS) -> int:
    """The database's schema version; SchemaError if a newer dropq wrote it. `where`: its state directory."""
    found, latest = version_of(db), (steps[-1].version if steps else 0)
    if found > latest:
        raise SchemaError(f"the state directory {where} was written by a newer dropq (schema {found}; this dropq "
                          f"knows up to {latest}): upgrade dropq, or point `state:` elsewhere")
    return found


def migrate(db: sqlite3.Connection, *, where: Path, steps: Sequence[Migration] = MIGRATIONS) -> list[Migration]:
    """Apply the steps the database lacks, in order, each in one transaction; returns those applied.

    `db` must be in autocommit mode (isolation_level=None): the transactions are begun here.
    """
    check_known(db, where=where, steps=steps)
    return [step for step in steps if version_of(db) < step.version and _apply(db, step, where)]


def _apply(db: sqlite3.Connection, step: Migration, where: Path) -> bool:
    db.execute("BEGIN IMMEDIATE")
    try:
        # asked again under the write lock: another process may have applied it meanwhile
        if version_of(db) >= step.version:
            db.execute("ROLLBACK")
            return False
        step.apply(db)
        db.execute(f"PRAGMA user_version = {int(step.version)}")
    except sqlite3.Error as exc:
        db.execute("ROLLBACK")
        raise SchemaError(f"the job database in {where} could not be upgraded to schema {step.version} "
                          f"({step.why}): {exc}") from exc
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
    return True
