"""Schema versions: a state directory of dropq 0.1.0 carries on under this dropq, a newer one is refused.

The 0.1.0 state comes from tests/fixtures/state-0.1.0.tar.gz, made by the real 0.1.0 code
(tests/fixtures/README.md says how): three finished jobs, one that was running when the daemon and
its worker were killed with SIGKILL, and three queued behind it.
"""

from __future__ import annotations

import sqlite3
import tarfile
from pathlib import Path

import pytest

from conftest import DaemonProcess, Workspace
from dropq.errors import SchemaError
from dropq.queue.migrations import LATEST, MIGRATIONS, Migration, migrate, statements, version_of
from dropq.queue.store import Store
from helpers import dropq, dropq_json

FIXTURE = Path(__file__).parent / "fixtures" / "state-0.1.0.tar.gz"
#: the jobs the fixture holds published, and how they ended
FINISHED = {"ok": "succeeded", "failed": "failed", "rejected": "rejected"}
#: queued in the fixture, never started
QUEUED = ("queued-1", "queued-2", "queued-input")
#: running in the fixture when the daemon, its worker and the program were killed
INTERRUPTED = "interrupted"


def unpack_0_1_0(root: Path) -> None:
    """The fixture's inbox, outbox and state into `root` (its config.yaml is left out: the test's own is used)."""
    # extraction filters came in Python 3.11.4, and Debian 12 ships 3.11.2, where `filter=` is a TypeError;
    # without them the fixture (our own file) still unpacks as it is, and Pythons that have them use "data"
    with tarfile.open(FIXTURE) as tar:
        members = [m for m in tar.getmembers() if m.name != "config.yaml"]
        if hasattr(tarfile, "data_filter"):
            tar.extractall(root, members=members, filter="data")
        else:
            tar.extractall(root, members=members)


def user_version(path: Path) -> int:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return version_of(db)
    finally:
        db.close()


def schema(path: Path) -> tuple[list[tuple[str, str, str]], dict[str, list[tuple[object, ...]]]]:
    """Every object SQLite keeps in sqlite_master (its SQL with whitespace normalised), and each table's columns."""
    db = sqlite3.connect(path)
    try:
        objects = sorted((kind, name, " ".join((sql or "").split())) for kind, name, sql in
                         db.execute("SELECT type, name, sql FROM sqlite_master"))
        columns = {name: db.execute(f"PRAGMA table_info({name})").fetchall()
                   for kind, name, _ in objects if kind == "table"}
    finally:
        db.close()
    return objects, columns


def test_the_fixture_is_an_unversioned_0_1_0_database(tmp_path: Path) -> None:
    # guards the tests below: they would prove nothing if the fixture had already been migrated
    unpack_0_1_0(tmp_path)
    assert user_version(tmp_path / "state" / "dropq.sqlite3") == 0


def test_a_0_1_0_state_directory_carries_on(workspace: Workspace, daemon: DaemonProcess) -> None:
    unpack_0_1_0(workspace.root)
    published = {name: (workspace.outbox / name / "result.yaml").read_bytes() for name in FINISHED}

    daemon.start()
    expected = {*FINISHED, INTERRUPTED, *QUEUED}
    results = workspace.wait_results(len(expected), timeout=90)

    # nothing ran twice: one folder per job, none with a suffix
    assert set(results) == expected
    for name in QUEUED:
        assert (results[name]["status"], results[name]["attempts"]) == ("succeeded", 1), results[name]
    assert "queue" in (workspace.outbox / "queued-input" / "stdout.txt").read_text()
    # the job whose worker was killed under it is retried once, and committed once
    assert (results[INTERRUPTED]["status"], results[INTERRUPTED]["attempts"]) == ("succeeded", 2)
    log = daemon.log_text()
    assert log.count(f"job {INTERRUPTED}: attempt 2 on worker") == 1
    assert f"job {INTERRUPTED}: attempt 3" not in log
    # the finished ones are left exactly as 0.1.0 published them, and are still reported
    for name, status in FINISHED.items():
        assert (workspace.outbox / name / "result.yaml").read_bytes() == published[name]
        assert dropq_json(workspace.config, "show", name)["status"] == status
    shown = dropq(workspace.config, "show", "failed")
    assert shown.returncode == 0 and "status: failed" in shown.stdout, shown.stderr
    status = dropq_json(workspace.config, "status")
    assert status["jobs"] == {"succeeded": 5, "failed": 1, "rejected": 1}
    assert user_version(workspace.state / "dropq.sqlite3") == LATEST


def test_the_steps_are_numbered_1_to_n() -> None:
    assert [step.version for step in MIGRATIONS] == list(range(1, len(MIGRATIONS) + 1))
    assert LATEST == len(MIGRATIONS)


@pytest.mark.parametrize("step", MIGRATIONS, ids=lambda s: f"step-{s.version}")
def test_each_step_applies_to_the_schema_before_it(tmp_path: Path, step: Migration) -> None:
    db = sqlite3.connect(tmp_path / "db.sqlite3", isolation_level=None)
    try:
        before = MIGRATIONS[: step.version - 1]
        assert migrate(db, where=tmp_path, steps=before) == list(before)
        assert migrate(db, where=tmp_path, steps=MIGRATIONS[: step.version]) == [step]
        assert version_of(db) == step.version
    finally:
        db.close()


def test_an_upgraded_0_1_0_database_has_the_schema_of_a_new_one(tmp_path: Path) -> None:
    unpack_0_1_0(tmp_path / "old")
    old = tmp_path / "old" / "state" / "dropq.sqlite3"
    Store(old).close()
    Store(tmp_path / "new" / "dropq.sqlite3").close()

    assert user_version(old) == LATEST
    assert schema(old) == schema(tmp_path / "new" / "dropq.sqlite3")
    # and its jobs are all there
    store = Store(old, readonly=True)
    try:
        assert store.counts() == {"succeeded": 1, "failed": 1, "rejected": 1, "running": 1, "queued": 3}
    finally:
        store.close()


def test_a_new_step_adds_to_what_is_there_and_runs_once(tmp_path: Path) -> None:
    # what migration N+1 looks like: SQL, or a function for a change of data
    store = Store(tmp_path / "db.sqlite3")
    store.add("kept", source="kept.yaml")
    store.close()

    def fill(db: sqlite3.Connection) -> None:
        db.execute("UPDATE jobs SET tag = 'base'")

    later = (*MIGRATIONS,
             Migration(LATEST + 1, "jobs.tag", "ALTER TABLE jobs ADD COLUMN tag TEXT;\n"
                                               "CREATE INDEX jobs_tag ON jobs (tag);"),
             Migration(LATEST + 2, "every job gets a tag", fill))
    db = sqlite3.connect(tmp_path / "db.sqlite3", isolation_level=None)
    try:
        assert [s.version for s in migrate(db, where=tmp_path, steps=later)] == [LATEST + 1, LATEST + 2]
        assert migrate(db, where=tmp_path, steps=later) == []
        assert db.execute("SELECT id, tag FROM jobs").fetchall() == [("kept", "base")]
        assert version_of(db) == LATEST + 2
    finally:
        db.close()


def test_a_failing_step_leaves_the_database_at_the_version_before(tmp_path: Path) -> None:
    Store(tmp_path / "db.sqlite3").close()
    broken = (*MIGRATIONS, Migration(LATEST + 1, "half a change",
                                     "ALTER TABLE jobs ADD COLUMN half TEXT; SELECT * FROM no_such_table"))
    db = sqlite3.connect(tmp_path / "db.sqlite3", isolation_level=None)
    try:
        with pytest.raises(SchemaError, match=rf"could not be upgraded to schema {LATEST + 1} \(half a change\)"):
            migrate(db, where=tmp_path, steps=broken)
        # the step's transaction was rolled back whole: no version, and no half of the change either
        assert version_of(db) == LATEST
        assert "half" not in [row[1] for row in db.execute("PRAGMA table_info(jobs)")]
    finally:
        db.close()


def test_statements_are_cut_where_sqlite_says_one_ends() -> None:
    script = "INSERT INTO t VALUES ('a;b');\n-- a comment; with a semicolon\nSELECT 1;\n"
    assert statements(script) == ["INSERT INTO t VALUES ('a;b');", "-- a comment; with a semicolon\nSELECT 1;"]
    with pytest.raises(ValueError, match="does not end"):
        statements("SELECT 'unterminated;")


def newer_state(workspace: Workspace) -> int:
    """A state directory as a later dropq would leave it; returns its schema version."""
    Store(workspace.state / "dropq.sqlite3").close()
    db = sqlite3.connect(workspace.state / "dropq.sqlite3")
    try:
        db.execute(f"PRAGMA user_version = {LATEST + 5}")
    finally:
        db.close()
    return LATEST + 5


@pytest.mark.parametrize("command", [("run",), ("status",)], ids=lambda c: c[0])
def test_a_state_directory_from_a_newer_dropq_is_refused_with_one_line(workspace: Workspace,
                                                                       command: tuple[str, ...]) -> None:
    version = newer_state(workspace)
    done = dropq(workspace.config, *command, timeout=60)
    assert done.returncode == 3, (done.stdout, done.stderr)  # Exit.CONFIG: a restart cannot cure it
    assert done.stderr.splitlines() == [
        f"dropq: the state directory {workspace.state} was written by a newer dropq (schema {version}; this dropq "
        f"knows up to {LATEST}): upgrade dropq, or point `state:` elsewhere"]
    assert done.stdout == ""
    assert user_version(workspace.state / "dropq.sqlite3") == version  # never "migrated" backwards
