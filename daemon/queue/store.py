"""The job store: SQLite in WAL mode, the single source of truth for every job's state.

One connection, guarded by a lock, serves the daemon's threads. WAL lets the CLI and the dashboard
read while the daemon writes. `synchronous=NORMAL` makes every committed transaction survive a
crash of the process (kill -9); only a power loss can lose the last few, which is the trade SQLite
documents for WAL mode. The tables are made and upgraded by migrations.py, when the daemon opens
the database; a database written by a newer dropq is refused, by readers too.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from dropq.errors import StoreError
from dropq.queue import migrations
from dropq.queue.jobs import JobStatus, sources_of
from dropq_worker.protocol import WorkerState

log = logging.getLogger("dropq.store")

#: picks the job to start among ready ones, (id, memory bytes, cpus) in queue order; None: none now
Chooser = Callable[[Iterable[tuple[str, int | None, float | None]]], str | None]


@dataclass(frozen=True)
class JobRecord:
    seq: int
    id: str
    source: str
    status: JobStatus
    priority: int
    attempts: int
    retries: int
    worker: str | None
    error: str | None
    manifest: str | None
    outcome: dict[str, Any] | None
    submitted_at: float
    started_at: float | None
    finished_at: float | None
    not_before: float
    deadline: float | None
    updated_at: float
    #: the environment the job runs in (dropq.envs), or None: the pool's interpreter as it is
    env: str | None = None
    #: while queued, the environment it waits for (being built); None when it may be taken
    held: str | None = None
    #: when retention removed its outbox folder (the record stays)
    pruned_at: float | None = None
    #: its outbox folder's size, once retention measured it
    folder_bytes: int | None = None
    #: who dropped the manifest (its uid and gid as the claim found them); None for jobs claimed before
    #: dropq recorded it
    owner_uid: int | None = None
    owner_gid: int | None = None
    #: a task: the id of the array job it belongs to (its own id is "<parent>/<task_index>")
    parent: str | None = None
    #: a task: its index in the array, from 0
    task_index: int | None = None
    #: an array job: how many tasks it has (None: not an array, or not yet expanded)
    tasks: int | None = None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> JobRecord:
        data = dict(row)
        data["status"] = JobStatus(data["status"])
        data["outcome"] = json.loads(data["outcome"]) if data["outcome"] else None
        return cls(**data)

    @property
    def folder(self) -> str:
        """The job's folder in the outbox: its id, or the free name the outbox chose when that was taken."""
        return str((self.outcome or {}).get("folder", self.id))

    @property
    def run_seconds(self) -> float | None:
        """How long the program ran, as its worker measured it; None before it has run."""
        outcome = self.outcome or {}
        started, finished = outcome.get("started_at"), outcome.get("finished_at")
        if isinstance(started, int | float) and isinstance(finished, int | float):
            return max(0.0, finished - started)
        return None

    @property
    def spool_id(self) -> str:
        """The folder in the spool that holds its manifest and inputs: an array's, for a task."""
        return self.parent if self.parent is not None else self.id

    def summary(self) -> dict[str, Any]:
        """The job as `dropq show --json`, `dropq status --json` and the API give it."""
        return {"id": self.id, "status": self.status.value, "priority": self.priority, "attempts": self.attempts,
                "worker": self.worker, "error": self.error, "manifest": self.source,
                "submitted_at": self.submitted_at, "started_at": self.started_at, "finished_at": self.finished_at,
                "environment": self.env}


class EnvState(StrEnum):
    #: wanted by a job; its build has not begun (or begins again after a daemon restart)
    PENDING = "pending"
    BUILDING = "building"
    READY = "ready"
    #: the last build failed; jobs of it fail at once until environments.retry_failed_after has passed
    FAILED = "failed"


@dataclass(frozen=True)
class EnvRecord:
    id: str
    spec: dict[str, Any]
    target: dict[str, str]
    state: EnvState
    error: str | None
    packages: list[str] | None
    size_bytes: int | None
    builds: int
    created_at: float
    started_at: float | None
    built_at: float | None
    failed_at: float | None
    last_used: float | None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> EnvRecord:
        data = dict(row)
        data["state"] = EnvState(data["state"])
        data["spec"] = json.loads(data["spec"])
        data["target"] = json.loads(data["target"])
        data["packages"] = json.loads(data["packages"]) if data["packages"] else None
        return cls(**data)

    @property
    def short(self) -> str:
        return self.id[:8]

    @property
    def summary(self) -> str:
        """The dependency list in a few words: "tabulate>=0.9, numpy"."""
        text = ", ".join(self.spec.get("dependencies", [])) or f"requires-python {self.spec.get('requires_python')}"
        return text if len(text) <= 60 else text[:59] + "…"

    def waiting_reason(self, now: float) -> str:
        """Why a job of this environment waits, as status screens show it."""
        if self.state is EnvState.BUILDING and self.started_at is not None:
            return f"building environment {self.short}… ({self.summary}), {now - self.started_at:.0f} s"
        return f"waiting for environment {self.short}… ({self.summary}) to be built"

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "state": self.state.value, "dependencies": self.spec.get("dependencies", []),
                "requires_python": self.spec.get("requires_python"), "declared_in": self.spec.get("declared_in"),
                "target": self.target, "packages": self.packages, "size_bytes": self.size_bytes,
                "builds": self.builds, "error": self.error, "created_at": self.created_at,
                "built_at": self.built_at, "last_used": self.last_used}


class Store:
    def __init__(self, path: Path, *, readonly: bool = False, now: Callable[[], float] = time.time) -> None:
        self.path = path
        self._now = now
        self._lock = threading.RLock()
        if readonly:
            if not path.exists():
                raise StoreError(f"no job database at {path}; has the daemon ever run with this config?")
            uri = f"file:{path}?mode=ro"
            self._db = sqlite3.connect(uri, uri=True, check_same_thread=False, timeout=10)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, check_same_thread=False, timeout=30, isolation_level=None)
        try:
            self._schema(readonly=readonly)
        except BaseException:
            self._db.close()
            raise
        self._db.row_factory = sqlite3.Row
        #: the schema this database is at: a reader (the CLI, the dashboard) may meet one older than this
        #: dropq's, before the daemon is restarted after an upgrade, and then reads what is there
        self.schema = migrations.version_of(self._db)

    def _schema(self, *, readonly: bool) -> None:
        """Refuse a database from a newer dropq; as the writer, bring an older one (or a new one) up to date."""
        if readonly:
            migrations.check_known(self._db, where=self.path.parent)
            return
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        for step in migrations.migrate(self._db, where=self.path.parent):
            log.info("job database %s: now at schema %d (%s)", self.path, step.version, step.why)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # --- reading -------------------------------------------------------------------------------

    def get(self, job_id: str) -> JobRecord:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise StoreError(f"no job with id {job_id!r}")
        return JobRecord.from_row(row)

    def find(self, job_id: str) -> JobRecord | None:
        try:
            return self.get(job_id)
        except StoreError:
            return None

    def with_status(self, *statuses: JobStatus, limit: int = -1) -> list[JobRecord]:
        marks = ",".join("?" * len(statuses))
        with self._lock:
            rows = self._db.execute(
                f"SELECT * FROM jobs WHERE status IN ({marks}) ORDER BY seq LIMIT ?",  # formats in `?` marks only
                (*[s.value for s in statuses], limit),
            ).fetchall()
        return [JobRecord.from_row(r) for r in rows]

    @property
    def _not_tasks(self) -> str:
        """The condition that leaves an array's tasks out of job lists (they are shown through their array)."""
        return "parent IS NULL" if self.schema >= 6 else "1"

    def recent(self, limit: int = 20) -> list[JobRecord]:
        with self._lock:
            rows = self._db.execute(f"SELECT * FROM jobs WHERE {self._not_tasks} ORDER BY seq DESC LIMIT ?",
                                    (limit,)).fetchall()
        return [JobRecord.from_row(r) for r in rows]

    def page(self, statuses: Sequence[JobStatus] = (), *, limit: int, offset: int = 0,
             since: float | None = None) -> tuple[list[JobRecord], int]:
        """Jobs newest first, optionally only those in `statuses` and those submitted at or after `since`,
        and how many there are in all."""
        conditions: list[str] = [self._not_tasks]
        params: list[str | float] = [s.value for s in statuses]
        if statuses:
            conditions.append(f"status IN ({','.join('?' * len(statuses))})")
        if since is not None:
            conditions.append("submitted_at >= ?")
            params.append(since)
        where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
        with self._lock:
            rows = self._db.execute(f"SELECT * FROM jobs {where} ORDER BY seq DESC LIMIT ? OFFSET ?",
                                    (*params, limit, offset)).fetchall()
            total = self._db.execute(f"SELECT COUNT(*) FROM jobs {where}", params).fetchone()[0]
        return [JobRecord.from_row(r) for r in rows], int(total)

    def finished_per_minute(self, since: float) -> list[tuple[int, str, int]]:
        """(minute since the epoch, final status, jobs) for jobs finished at or after `since`."""
        with self._lock:
            rows = self._db.execute(
                "SELECT CAST(finished_at / 60 AS INTEGER) AS minute, status, COUNT(*) FROM jobs "
                "WHERE finished_at >= ? GROUP BY minute, status", (since,)).fetchall()
        return [(int(m), str(s), int(n)) for m, s, n in rows]

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall()
        return {status: n for status, n in rows}

    def active_counts(self) -> dict[str, int]:
        """Jobs not yet finished, by status; uses the status index, so it stays cheap with a long history."""
        with self._lock:
            rows = self._db.execute(
                "SELECT status, COUNT(*) FROM jobs WHERE status IN ('waiting', 'queued', 'running', 'committing') "
                "GROUP BY status").fetchall()
        return {status: n for status, n in rows}

    def ahead_of(self, job: JobRecord) -> int:
        """Queued jobs that a worker will take before `job` (higher priority, or as high and older)."""
        with self._lock:
            row = self._db.execute(
                "SELECT COUNT(*) FROM jobs WHERE status = 'queued' AND (priority > ? OR (priority = ? AND seq < ?))",
                (job.priority, job.priority, job.seq)).fetchone()
        return int(row[0])

    def queued(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM jobs WHERE status = 'queued'").fetchone()[0])

    def by_source(self, source: str, *, after_seq: int = 0) -> JobRecord | None:
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM jobs WHERE source = ? AND seq > ? ORDER BY seq DESC LIMIT 1", (source, after_seq)
            ).fetchone()
        return JobRecord.from_row(row) if row else None

    def last_seq(self) -> int:
        with self._lock:
            row = self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM jobs").fetchone()
        return int(row[0])

    def id_taken(self, job_id: str) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM jobs WHERE id = ?", (job_id,)).fetchone() is not None

    def next_due(self) -> float | None:
        """When the earliest queued job that is waiting out a retry backoff becomes ready."""
        with self._lock:
            row = self._db.execute(
                "SELECT MIN(not_before) FROM jobs WHERE status = 'queued' AND not_before > ?", (self._now(),)
            ).fetchone()
        return row[0]

    def workers(self) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM workers ORDER BY name").fetchall()
        return [dict(r) for r in rows]

    # --- writing -------------------------------------------------------------------------------

    def add(self, job_id: str, *, source: str, submitted_at: float | None = None,
            owner: tuple[int, int] | None = None) -> JobRecord:
        """Record a claimed job; `owner`: the (uid, gid) of the manifest as it was claimed."""
        now = self._now()
        uid, gid = owner if owner is not None else (None, None)
        with self._tx() as db:
            db.execute(
                "INSERT INTO jobs (id, source, status, submitted_at, updated_at, owner_uid, owner_gid) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (job_id, source, JobStatus.WAITING.value, submitted_at or now, now, uid, gid),
            )
        return self.get(job_id)

    def set_manifest(self, job_id: str, manifest_json: str, *, priority: int, retries: int,
                     deadline: float | None) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET manifest = ?, priority = ?, retries = ?, deadline = ?, updated_at = ? "
                "WHERE id = ?",
                (manifest_json, priority, retries, deadline, self._now(), job_id),
            )

    def transition(self, job_id: str, target: JobStatus, **fields: Any) -> JobRecord:
        """Move a job into `target`, if the transition table allows it from its current state."""
        allowed = [s.value for s in sources_of(target)]
        if target is not JobStatus.QUEUED:
            fields.setdefault("held", None)  # only a queued job waits for its environment
        if "outcome" in fields and fields["outcome"] is not None:
            fields["outcome"] = json.dumps(fields["outcome"])
        fields["updated_at"] = self._now()
        sets = ", ".join(f"{k} = ?" for k in fields)
        marks = ",".join("?" * len(allowed))
        with self._tx() as db:
            cur = db.execute(
                f"UPDATE jobs SET status = ?, {sets} WHERE id = ? AND status IN ({marks})",
                (target.value, *fields.values(), job_id, *allowed),
            )
            if cur.rowcount != 1:
                row = db.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
                state = row[0] if row else "missing"
                raise StoreError(f"job {job_id!r} cannot go from {state} to {target.value}")
        return self.get(job_id)

    def take_next(self, worker: str, *, detail: str | None = None, choose: Chooser | None = None,
                  window: int = 1) -> JobRecord | None:
        """Give the highest-priority, oldest ready job to `worker`: it becomes running, one more attempt,
        and the worker is recorded as busy with it, in the same transaction. With `choose`, the first `window`
        ready jobs are offered to it in that order, as (id, memory, cpus) from their manifests, and the one it
        names is taken instead (None: none now). The rows are read as `choose` asks for them: where the first
        will do, one row is read."""
        now = self._now()
        with self._tx() as db:
            rows = db.execute(
                "SELECT id, json_extract(manifest, '$.memory'), json_extract(manifest, '$.cpus') FROM jobs "
                "WHERE status = 'queued' AND held IS NULL AND not_before <= ? ORDER BY priority DESC, seq LIMIT ?",
                (now, max(1, window) if choose is not None else 1),
            )
            if choose is None:
                row = rows.fetchone()
                job_id = None if row is None else row[0]
            else:
                job_id = choose((r[0], r[1], r[2]) for r in rows)
            rows.close()
            if job_id is None:
                return None
            db.execute(
                "UPDATE jobs SET status = 'running', worker = ?, attempts = attempts + 1, started_at = ?, "
                "updated_at = ? WHERE id = ?",
                (worker, now, now, job_id),
            )
            db.execute(
                "INSERT INTO workers (name, state, job, detail, updated_at) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT(name) DO UPDATE SET state = excluded.state, job = excluded.job, "
                "detail = excluded.detail, updated_at = excluded.updated_at",
                (worker, WorkerState.BUSY.value, job_id, detail, now),
            )
        return self.get(job_id)

    # --- arrays (dropq.intake.arrays) ---------------------------------------------------------------

    def tasks_of(self, parent: str, *, statuses: Sequence[JobStatus] = ()) -> list[JobRecord]:
        """An array's tasks in index order, optionally only those in `statuses`."""
        where, params = "parent = ?", [parent]
        if statuses:
            where += f" AND status IN ({','.join('?' * len(statuses))})"
            params += [s.value for s in statuses]
        with self._lock:
            rows = self._db.execute(f"SELECT * FROM jobs WHERE {where} ORDER BY task_index", params).fetchall()
        return [JobRecord.from_row(row) for row in rows]

    def task_counts(self, parent: str) -> dict[str, int]:
        """An array's tasks by status."""
        if self.schema < 6:
            return {}
        with self._lock:
            rows = self._db.execute("SELECT status, COUNT(*) FROM jobs WHERE parent = ? GROUP BY status",
                                    (parent,)).fetchall()
        return {status: n for status, n in rows}

    def progress(self, job: JobRecord) -> dict[str, Any] | None:
        """An array's progress, as `dropq status`, `dropq show` and the dashboard show it ("37/100 tasks done,
        2 failed"); None for a job that is not an array."""
        if job.tasks is None:
            return None
        counts = self.task_counts(job.id)
        done = sum(n for status, n in counts.items() if JobStatus(status).is_final)
        failed = sum(counts.get(s.value, 0) for s in (JobStatus.FAILED, JobStatus.TIMED_OUT, JobStatus.REJECTED))
        cancelled = counts.get(JobStatus.CANCELLED.value, 0)
        text = f"{done}/{job.tasks} tasks done" + (f", {failed} failed" if failed else "") + (
            f", {cancelled} cancelled" if cancelled else "")
        return {"total": job.tasks, "done": done, "failed": failed, "cancelled": cancelled,
                "running": counts.get(JobStatus.RUNNING.value, 0), "queued": counts.get(JobStatus.QUEUED.value, 0),
                "counts": counts, "text": text}

    def open_tasks(self, parent: str) -> int:
        """How many of an array's tasks have not ended (committing ones count: not yet published)."""
        with self._lock:
            row = self._db.execute("SELECT COUNT(*) FROM jobs WHERE parent = ? AND status IN "
                                   "('waiting', 'queued', 'running', 'committing')", (parent,)).fetchone()
        return int(row[0])

    def arrays_running(self) -> list[JobRecord]:
        """Array jobs whose tasks were made and which are not yet published."""
        if self.schema < 6:
            return []
        with self._lock:
            rows = self._db.execute("SELECT * FROM jobs WHERE status = 'running' AND tasks IS NOT NULL "
                                    "ORDER BY seq").fetchall()
        return [JobRecord.from_row(row) for row in rows]

    # --- retention (dropq.publish.retention) ---------------------------------------------------------

    def retained(self, *, statuses: Sequence[JobStatus] = (), finished_before: float | None = None,
                 limit: int = 1000, after: tuple[float, int] = (0.0, 0)) -> list[JobRecord]:
        """Published jobs whose folders are still in the outbox, oldest finished first, from after
        (finished_at, seq), a page at a time."""
        final = statuses or [s for s in JobStatus if s.is_final]
        marks = ",".join("?" * len(final))
        where = "finished_at IS NOT NULL AND pruned_at IS NULL AND (finished_at > ? OR (finished_at = ? AND seq > ?))"
        if self.schema >= 6:
            where += " AND parent IS NULL"  # a task's folder is inside its array's, which retention removes whole
        params: list[Any] = [after[0], after[0], after[1]]
        if finished_before is not None:
            where += " AND finished_at < ?"
            params.append(finished_before)
        with self._lock:
            rows = self._db.execute(f"SELECT * FROM jobs WHERE {where} AND status IN ({marks}) "  # marks only
                                    "ORDER BY finished_at, seq LIMIT ?", (*params, *[s.value for s in final], limit))
            return [JobRecord.from_row(row) for row in rows.fetchall()]

    def set_folder_bytes(self, job_id: str, size: int) -> None:
        with self._tx() as db:
            db.execute("UPDATE jobs SET folder_bytes = ? WHERE id = ?", (size, job_id))

    def mark_pruned(self, job_id: str) -> bool:
        """Record that a published job's folder was removed; whether it was still unpruned."""
        with self._tx() as db:
            return db.execute("UPDATE jobs SET pruned_at = ? WHERE id = ? AND pruned_at IS NULL AND finished_at IS "
                              "NOT NULL", (self._now(), job_id)).rowcount == 1

    # --- webhooks (dropq.publish.notify) ------------------------------------------------------------

    def add_delivery(self, job_id: str, url: str) -> None:
        now = self._now()
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO deliveries (job, url, state, next_at, created_at) "
                       "VALUES (?, ?, 'pending', ?, ?)", (job_id, url, now, now))

    def due_deliveries(self, limit: int = 20) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM deliveries WHERE state = 'pending' AND next_at <= ? ORDER BY "
                                    "next_at LIMIT ?", (self._now(), limit)).fetchall()
        return [dict(row) for row in rows]

    def next_delivery_at(self) -> float | None:
        with self._lock:
            row = self._db.execute("SELECT MIN(next_at) FROM deliveries WHERE state = 'pending'").fetchone()
        return row[0] if row and row[0] is not None else None

    def delivery_done(self, job_id: str, *, state: str, attempts: int, error: str | None,
                      next_at: float | None = None) -> None:
        """Record one attempt: delivered, failed for good, or pending again at `next_at`."""
        now = self._now()
        with self._tx() as db:
            db.execute("UPDATE deliveries SET state = ?, attempts = ?, last_error = ?, next_at = COALESCE(?, next_at), "
                       "delivered_at = CASE WHEN ? = 'delivered' THEN ? ELSE delivered_at END WHERE job = ?",
                       (state, attempts, error, next_at, state, now, job_id))

    def delivery(self, job_id: str) -> dict[str, Any] | None:
        if self.schema < 4:
            return None
        with self._lock:
            row = self._db.execute("SELECT * FROM deliveries WHERE job = ?", (job_id,)).fetchone()
        return dict(row) if row else None

    # --- environments (dropq.envs) ----------------------------------------------------------------

    def queue_job(self, job_id: str, *, env: str | None = None) -> JobRecord:
        """A job whose inputs are all there becomes queued; in an environment, held until that is ready
        (or made again, should it have been pruned meanwhile). One statement reads the environment's state
        and sets the hold, so a build that ends meanwhile cannot leave the job held for good (env_ready
        releases in its own transaction)."""
        now = self._now()
        allowed = [s.value for s in sources_of(JobStatus.QUEUED)]
        marks = ",".join("?" * len(allowed))
        with self._tx() as db:
            row = db.execute("SELECT manifest FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is not None and row[0] and json.loads(row[0]).get("matrix"):
                self._expand(db, job_id, row[0], env=env, now=now)
                return self.get(job_id)
            cur = db.execute(
                "UPDATE jobs SET status = 'queued', env = ?, updated_at = ?, held = CASE WHEN ? IS NULL THEN NULL "
                "WHEN (SELECT state FROM environments WHERE id = ?) = 'ready' THEN NULL ELSE ? END "
                f"WHERE id = ? AND status IN ({marks})",
                (env, now, env, env, env, job_id, *allowed))
            if cur.rowcount != 1:
                raise StoreError(f"job {job_id!r} cannot be queued now")
            if env is not None:
                db.execute("UPDATE environments SET last_used = ? WHERE id = ?", (now, env))
        return self.get(job_id)

    def _expand(self, db: sqlite3.Connection, job_id: str, manifest_json: str, *, env: str | None,
                now: float) -> None:
        """An array that may run: its tasks become queued rows (in its environment, held as a job would be)
        and the array itself running, in the caller's transaction: a crash leaves either no task or all."""
        from dropq.intake.arrays import tasks  # the store knows rows; the manifest's rules are the intake's
        from dropq.intake.manifest import Manifest

        allowed = [s.value for s in sources_of(JobStatus.QUEUED)]
        marks = ",".join("?" * len(allowed))
        made = tasks(Manifest.from_json(manifest_json))
        held = None
        if env is not None:
            state = db.execute("SELECT state FROM environments WHERE id = ?", (env,)).fetchone()
            held = None if state is not None and state[0] == "ready" else env
            db.execute("UPDATE environments SET last_used = ? WHERE id = ?", (now, env))
        # the array's own `held` says, as a queued job's does, that its environment is still to be built (the
        # caller requests the build); it is never picked (running), and env_ready clears it with its tasks'
        cur = db.execute(f"UPDATE jobs SET status = 'running', env = ?, held = ?, tasks = ?, started_at = ?, "
                         f"updated_at = ? WHERE id = ? AND status IN ({marks}) AND tasks IS NULL",
                         (env, held, len(made), now, now, job_id, *allowed))
        if cur.rowcount != 1:
            raise StoreError(f"job {job_id!r} cannot be queued now")
        array = db.execute("SELECT source, priority, retries, submitted_at FROM jobs WHERE id = ?",
                           (job_id,)).fetchone()
        db.executemany(
            "INSERT INTO jobs (id, source, status, priority, retries, manifest, submitted_at, updated_at, env, held, "
            "parent, task_index) VALUES (?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            ((f"{job_id}/{index}", array[0], array[1], array[2], task.to_json(), array[3], now, env, held, job_id,
              index) for index, task in enumerate(made)))

    def env(self, env_id: str) -> EnvRecord | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM environments WHERE id = ?", (env_id,)).fetchone()
        return EnvRecord.from_row(row) if row else None

    def envs(self) -> list[EnvRecord]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM environments ORDER BY created_at").fetchall()
        return [EnvRecord.from_row(row) for row in rows]

    def want_env(self, env_id: str, *, spec: dict[str, Any], target: dict[str, str]) -> EnvRecord:
        """The record of environment `env_id`, made (pending a build) when it is new."""
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO environments (id, spec, target, state, created_at) "
                       "VALUES (?, ?, ?, 'pending', ?)", (env_id, json.dumps(spec), json.dumps(target), self._now()))
        record = self.env(env_id)
        assert record is not None
        return record

    def env_state(self, env_id: str, state: EnvState, *, only_from: Sequence[EnvState] = ()) -> bool:
        """Set an environment's state (from one of `only_from`, when given); whether it changed."""
        now = self._now()
        extra = {EnvState.BUILDING: ", started_at = ?, builds = builds + 1, error = NULL",
                 EnvState.PENDING: ", error = NULL"}.get(state, "")
        params: list[Any] = [state.value, *([now] if state is EnvState.BUILDING else [])]
        where = " AND state IN (" + ",".join("?" * len(only_from)) + ")" if only_from else ""
        with self._tx() as db:
            cur = db.execute(f"UPDATE environments SET state = ?{extra} WHERE id = ?{where}",
                             (*params, env_id, *[s.value for s in only_from]))
        return cur.rowcount == 1

    def env_ready(self, env_id: str, *, packages: list[str], size_bytes: int) -> int:
        """The build succeeded: the environment is ready and the jobs held for it may be taken (one
        transaction). Returns how many were released."""
        now = self._now()
        with self._tx() as db:
            db.execute("UPDATE environments SET state = 'ready', packages = ?, size_bytes = ?, built_at = ?, "
                       "error = NULL, failed_at = NULL WHERE id = ?", (json.dumps(packages), size_bytes, now, env_id))
            return db.execute("UPDATE jobs SET held = NULL WHERE held = ?", (env_id,)).rowcount

    def env_failed(self, env_id: str, error: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE environments SET state = 'failed', error = ?, failed_at = ? WHERE id = ?",
                       (error, self._now(), env_id))

    def held_for(self, env_id: str) -> list[JobRecord]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM jobs WHERE held = ? AND status = 'queued' ORDER BY seq",
                                    (env_id,)).fetchall()
        return [JobRecord.from_row(row) for row in rows]

    def held_envs(self) -> dict[str, int]:
        """Environments queued jobs wait for, with how many wait for each."""
        with self._lock:
            rows = self._db.execute("SELECT held, COUNT(*) FROM jobs WHERE held IS NOT NULL AND status = 'queued' "
                                    "GROUP BY held").fetchall()
        return {row[0]: row[1] for row in rows}

    def waiting_for(self) -> list[dict[str, Any]]:
        """The environments queued jobs wait for, each with the reason in words and how many wait."""
        if self.schema < 2:
            return []
        now = self._now()
        found = []
        for env, jobs in self.held_envs().items():
            record = self.env(env)
            reason = record.waiting_reason(now) if record else f"waiting for environment {env[:8]}…"
            found.append({"id": env, "jobs": jobs, "reason": reason})
        return found

    def waiting_reason(self, job: JobRecord) -> str | None:
        """Why a job is not taken yet: a waiting job waits for the jobs it runs after ("waiting for prep,
        fetch") or for its input files; a queued one, for its environment."""
        if job.status is JobStatus.WAITING:
            return self._waiting_reason(job)
        if job.status is not JobStatus.QUEUED or job.held is None:
            return None
        record = self.env(job.held)
        return record.waiting_reason(self._now()) if record else f"waiting for environment {job.held[:8]}…"

    def _waiting_reason(self, job: JobRecord) -> str | None:
        """A waiting job's reason, from its stored manifest (dropq.intake.manifest.Manifest.to_json): the
        jobs it runs after that have not ended, else its input files; None before its manifest is read."""
        if not job.manifest:
            return None
        manifest = json.loads(job.manifest)
        after = [up for up in manifest.get("after", ()) if isinstance(up, str)]
        pending = [up for up in after if (found := self.find(up)) is None or not found.status.is_final]
        if pending:
            return "waiting for " + ", ".join(pending)
        from_inbox = len(manifest.get("inputs", ())) - len(manifest.get("from_outbox", ()))
        return "waiting for its input files" if from_inbox > 0 else None

    def env_in_use(self, env_id: str) -> bool:
        """Whether a job that has not ended runs, or will run, in the environment."""
        with self._lock:
            row = self._db.execute("SELECT 1 FROM jobs WHERE env = ? AND status IN "
                                   "('waiting', 'queued', 'running', 'committing') LIMIT 1", (env_id,)).fetchone()
        return row is not None

    def forget_env(self, env_id: str) -> bool:
        """Remove an environment's record, unless a job that has not ended needs it (checked in the same
        transaction); whether it was removed."""
        with self._tx() as db:
            busy = db.execute("SELECT 1 FROM jobs WHERE env = ? AND status IN "
                              "('waiting', 'queued', 'running', 'committing') LIMIT 1", (env_id,)).fetchone()
            if busy:
                return False
            return db.execute("DELETE FROM environments WHERE id = ?", (env_id,)).rowcount == 1

    def set_worker(self, name: str, state: WorkerState, *, job: str | None = None, detail: str | None = None) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO workers (name, state, job, detail, updated_at) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT(name) DO UPDATE SET state = excluded.state, job = excluded.job, "
                "detail = excluded.detail, updated_at = excluded.updated_at",
                (name, state.value, job, detail, self._now()),
            )

    def forget_workers(self, keep: set[str]) -> None:
        with self._tx() as db:
            for (name,) in db.execute("SELECT name FROM workers").fetchall():
                if name not in keep:
                    db.execute("DELETE FROM workers WHERE name = ?", (name,))

    def set_agent(self, name: str, *, host: str, workers: int, pool: str) -> None:
        """Record an agent as it registers (first seen now, or again)."""
        now = self._now()
        with self._tx() as db:
            db.execute(
                "INSERT INTO agents (name, host, workers, pool, first_seen, last_contact) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT(name) DO UPDATE SET host = excluded.host, workers = excluded.workers, "
                "pool = excluded.pool, last_contact = excluded.last_contact",
                (name, host, workers, pool, now, now))

    def agent_contact(self, name: str, at: float) -> None:
        with self._tx() as db:
            db.execute("UPDATE agents SET last_contact = ? WHERE name = ?", (at, name))

    def agents(self) -> list[dict[str, Any]]:
        """The agents ever registered (name, host, workers, pool, first_seen, last_contact), by name."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM agents ORDER BY name").fetchall()
        return [dict(r) for r in rows]

    def forget_agent(self, name: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM agents WHERE name = ?", (name,))

    def set_meta(self, key: str, value: str) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def meta(self) -> dict[str, str]:
        with self._lock:
            return dict(self._db.execute("SELECT key, value FROM meta").fetchall())
