"""Publishing a finished job: assemble `outbox/.<id>.tmp/`, then one rename makes it `outbox/<id>/`.

Every step moves a piece only if it is still where it was, so the whole commit can be run again after
a crash at any point and converges on one folder. The rename is the commit: a reader never sees a
half-written job folder. A crash after the rename but before the store learned of it is recognised by
the job's key in result.yaml, so a second folder is never made.
"""

from __future__ import annotations

import errno
import functools
import hmac
import json
import logging
import os
import secrets
import stat
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from dropq.escape import printable
from dropq.paths import collect_tree, move, remove_tree
from dropq.publish.owners import Owner, Ownership
from dropq.queue.jobs import JobStatus
from dropq.queue.store import JobRecord, Store
from dropq_worker.protocol import Staging
from dropq_worker.trees import walk

log = logging.getLogger("dropq.outbox")

_SafeDumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


#: the file in the state directory holding the secret that makes attempt keys unguessable
KEY_SECRET = "attempt-keys.secret"
#: in a task's folder being assembled: the key of the attempt it holds, until result.yaml (with the key) is there
ATTEMPT_MARK = ".attempt"


def job_key(job: JobRecord, secret: bytes) -> str:
    """The name of a job's current attempt towards workers and staging folders: unique per attempt
    (a retry on the same worker is never taken for the attempt before it), safe in a URL and a path,
    and unguessable: a job must not be able to name the next job's files, so the sequence number is
    followed by 12 hex digits of an HMAC under the state directory's secret. The same job and attempt
    always get the same key, across restarts, with nothing more to store."""
    name = f"j{job.seq}-{job.attempts}"
    return f"{name}-{hmac.new(secret, name.encode(), 'sha256').hexdigest()[:12]}"


@functools.cache
def key_secret(state: Path) -> bytes:
    """The state directory's secret for attempt keys (made on first use, mode 0600)."""
    path = state / KEY_SECRET
    try:
        return bytes.fromhex(path.read_text().strip())
    except FileNotFoundError:
        pass
    state.mkdir(parents=True, exist_ok=True)
    tmp = state / f".{KEY_SECRET}.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_hex(32))
    try:
        os.link(tmp, path)  # never replaces a secret another process made a moment ago
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)
    return bytes.fromhex(path.read_text().strip())


class Outbox:
    def __init__(self, *, root: Path, spool: Path, store: Store, secret: bytes | None = None,
                 on_published: Callable[[JobRecord], None] | None = None,
                 ownership: Ownership | None = None) -> None:
        self.root = root
        self.spool = spool
        self.store = store
        #: for attempt keys (key_secret(state) in the daemon; a random one lasts as long as this object)
        self.secret = secrets.token_bytes(32) if secret is None else secret
        self._on_published = on_published
        #: whose each published folder is (Ownership.from_config in the daemon; by default, the daemon's)
        self.ownership = ownership if ownership is not None else Ownership(active=False)
        #: status and error a commit had to change (see commit: a full disk), for finish to record
        self._changed: dict[str, dict[str, Any]] = {}

    def key(self, job: JobRecord) -> str:
        """The key of `job`'s current attempt (job_key under this daemon's secret)."""
        return job_key(job, self.secret)

    def finish(self, job: JobRecord, *, staging: Staging | None = None) -> Path:
        """Publish a job in COMMITTING state and record its final status; safe to run again. A task of an
        array goes into the array's folder being assembled (not yet published)."""
        if job.parent is not None:
            name = f"{job.parent}/tasks/{job.task_index}"
            folder = self.commit_task(job, staging=staging)
        else:
            name = self._folder_name(job)
            folder = self.commit(job, staging=staging, name=name)
        # what publishing changed (a full disk fails a job whose output had to go), as result.yaml says it
        outcome = dict(job.outcome or {}, folder=name, **self._changed.pop(job.id, {}))
        final = self.store.transition(job.id, JobStatus(outcome["status"]), outcome=outcome,
                                      error=outcome.get("error"), finished_at=outcome.get("finished_at"))
        if job.parent is None:
            log.info("job %s: %s, published as %s", job.id, final.status, name)
        else:  # one line per task would flood the log of a 10,000-task array
            log.debug("task %s: %s", job.id, final.status)
        # a task is not published on its own (its array is, once): no webhook, notify.command or pipeline for it
        if self._on_published is not None and job.parent is None:
            self._on_published(final)
        return folder

    def _folder_name(self, job: JobRecord) -> str:
        # Normally the job's id, which was free when it was claimed. Should someone have made a folder
        # of that name since, the next free suffix; the order is fixed, so a re-run after a crash
        # finds the folder it published before.
        name, n = job.id, 1
        while os.path.lexists(self.root / name) and not self.committed_here(job, name):
            n += 1
            name = f"{job.id}-{n}"
        return name

    def folder_taken(self, name: str) -> bool:
        return os.path.lexists(self.root / name) or os.path.lexists(self.root / f".{name}.tmp")

    def committed_here(self, job: JobRecord, name: str) -> bool:
        """Whether outbox/<name> is this job's own, already published folder."""
        try:
            data = yaml.safe_load((self.root / name / "result.yaml").read_text())
        except (OSError, yaml.YAMLError):
            return False
        return isinstance(data, dict) and data.get("key") == self.key(job)

    def commit_task(self, job: JobRecord, *, staging: Staging | None) -> Path:
        """Put task `job` (its outcome recorded) into its array's folder being assembled, spool/<array>/tasks/
        <index>/, by one rename of a folder assembled beside it. Keyed like a commit: run again after a crash
        (the rename done, the store not yet told), it finds the task's folder and makes no second one."""
        assert job.parent is not None and job.task_index is not None
        tasks = self.spool / job.parent / "tasks"
        final = tasks / str(job.task_index)
        if _key_of(final) == self.key(job):
            if staging is not None:
                staging.remove()
            return final
        tmp = tasks / f".{job.task_index}.tmp"
        attempt = tmp / ATTEMPT_MARK
        # A crash mid-assembly leaves stdout, stderr and output/ already moved out of staging into tmp: this
        # attempt's half-assembled folder is carried on, never made again (that would publish empty files).
        # Only a folder another attempt left (its mark differs, or it has none) is removed.
        marked = attempt.is_file() and not attempt.is_symlink() and attempt.read_text() == self.key(job)
        if not (marked or _key_of(tmp) == self.key(job)):
            remove_tree(tmp)
            tmp.mkdir(parents=True)
            _write_atomic(attempt, self.key(job))
            _fsync_dir(tmp)
        outcome = dict(job.outcome or {})
        if staging is not None and os.path.lexists(staging.output):
            dropped = collect_tree(staging.output, tmp / "output")
            if dropped:
                outcome["dropped"] = dropped
        if not os.path.lexists(tmp / "output"):
            (tmp / "output").mkdir()
        stdout_name = outcome.get("stdout_as")
        self._place(staging.stdout if staging else None, tmp / ("output/" + stdout_name if stdout_name else
                                                                "stdout.txt"))
        self._place(staging.stderr if staging else None, tmp / "stderr.txt")
        if stdout_name:
            (tmp / "stdout.txt").touch()
        document = result_document(job, outcome, job.id, key=self.key(job))
        document["task"] = job.task_index
        document["parameters"] = _printable(dict(_parameters(job)))
        _write_atomic(tmp / "result.yaml", yaml.dump(document, Dumper=_SafeDumper, sort_keys=False))
        if os.path.lexists(attempt):
            os.unlink(attempt)  # result.yaml, written with the key, marks the folder from here on
        _fsync_dir(tmp)
        if os.path.lexists(final):
            remove_tree(final)  # not this attempt's (its key differs): no commit the store knows of
        os.rename(tmp, final)
        _fsync_dir(tasks)
        if staging is not None:
            staging.remove()
        return final

    def commit(self, job: JobRecord, *, staging: Staging | None, name: str) -> Path:
        """Publish `job` (its outcome already recorded) as outbox/<name>; returns the folder."""
        final = self.root / name
        spool = self.spool / job.id
        if self.committed_here(job, name):
            self._published_before(job, final, spool, staging)
            return final
        tmp = self.root / f".{name}.tmp"
        outcome = dict(job.outcome or {})
        dropped_entry = self._gather(spool, tmp)
        if dropped_entry:
            outcome["dropped"] = [*outcome.get("dropped", []), dropped_entry]
        if job.tasks is not None:
            return self._commit_array(job, outcome, tmp, name)
        if staging is not None and os.path.lexists(staging.output):
            outcome["dropped"] = [*outcome.get("dropped", []), *collect_tree(staging.output, tmp / "output")]
        if not os.path.lexists(tmp / "output"):
            (tmp / "output").mkdir()
        stdout_name = outcome.get("stdout_as")
        stdout_to = tmp / ("output/" + stdout_name if stdout_name else "stdout.txt")
        self._place(staging.stdout if staging else None, stdout_to)
        self._place(staging.stderr if staging else None, tmp / "stderr.txt")
        if stdout_name:
            (tmp / "stdout.txt").touch()
        document = result_document(job, outcome, name, key=self.key(job))
        try:
            _write_atomic(tmp / "result.yaml", yaml.dump(document, Dumper=_SafeDumper, sort_keys=False))
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            # The disk is full, most likely with what this very job wrote: its output goes, so that its
            # result can be recorded at all (nothing published before is touched), and the result says so.
            freed = _free_job_output(tmp)
            log.warning("job %s: the disk is full; its output (%d bytes) was removed to publish its result",
                        job.id, freed)
            outcome["error"] = ((outcome.get("error") or "") + ("; " if outcome.get("error") else "") +
                                f"the disk was full when it was published: its output ({freed} bytes) was removed")
            if outcome.get("status") == JobStatus.SUCCEEDED.value:
                outcome["status"] = JobStatus.FAILED.value
            self._changed[job.id] = {"status": outcome["status"], "error": outcome["error"]}
            document = result_document(job, outcome, name, key=self.key(job))
            _write_atomic(tmp / "result.yaml", yaml.dump(document, Dumper=_SafeDumper, sort_keys=False))
        # given to the manifest's owner before the rename: nobody ever sees the published folder as another's
        self.ownership.give(tmp, Owner.of_job(job))
        _fsync_dir(tmp)
        os.rename(tmp, final)
        _fsync_dir(self.root)
        remove_tree(spool)
        if staging is not None:
            staging.remove()
        return final

    def _published_before(self, job: JobRecord, final: Path, spool: Path, staging: Staging | None) -> None:
        """Published before a crash: only the clean-up after the rename may be missing; the status is the one
        result.yaml says (publishing may have changed it)."""
        published = yaml.safe_load((final / "result.yaml").read_text())
        if published.get("status") != (job.outcome or {}).get("status"):
            self._changed[job.id] = {"status": published["status"], "error": published.get("error")}
        remove_tree(spool)
        if staging is not None:
            staging.remove()

    def _commit_array(self, job: JobRecord, outcome: dict[str, Any], tmp: Path, name: str) -> Path:
        """An array's folder: its tasks/ (each put there as it ended), its inputs once, and a result.yaml that
        sums the tasks up; published by one rename."""
        if not os.path.lexists(tmp / "tasks"):
            (tmp / "tasks").mkdir()
        for leftover in os.scandir(tmp / "tasks"):
            if leftover.name.startswith("."):  # a task's assembly a crash cut short; the task committed since
                remove_tree(Path(leftover.path))
        document = result_document(job, outcome, name, key=self.key(job))
        document.update(_printable(array_document(self.store.tasks_of(job.id), total=job.tasks or 0)))
        _write_atomic(tmp / "result.yaml", yaml.dump(document, Dumper=_SafeDumper, sort_keys=False))
        _fsync_dir(tmp)
        final = self.root / name
        os.rename(tmp, final)
        _fsync_dir(self.root)
        remove_tree(self.spool / job.id)
        return final

    @classmethod
    def _gather(cls, spool: Path, tmp: Path) -> str | None:
        """Make `tmp` hold the job's manifest and inputs/; returns what of the manifest was not kept."""
        if not os.path.lexists(tmp):
            # The job's spool folder (manifest.yaml, inputs/) becomes the new folder by one rename:
            # no folder to make, nothing to move piece by piece, nothing left to remove.
            try:
                os.rename(spool, tmp)
            except OSError as exc:
                if exc.errno not in (errno.ENOENT, errno.EXDEV):
                    raise
                tmp.mkdir(parents=True)
        # what is still in the spool: it is on another filesystem, or a commit stopped half-way
        for piece in ("manifest.yaml", "inputs", "env-build.log", "tasks"):
            if os.path.lexists(spool / piece) and not os.path.lexists(tmp / piece):
                move(spool / piece, tmp / piece)
        dropped = cls._keep_manifest(tmp)
        if not os.path.lexists(tmp / "inputs"):
            (tmp / "inputs").mkdir()
        return dropped

    @staticmethod
    def _keep_manifest(tmp: Path) -> str | None:
        """The manifest as dropped stays as manifest.yaml when it is a plain file. A directory is kept,
        as manifest-folder/; a symlink, FIFO, socket or device is removed (never read, never
        followed: it holds no data of its own). Returns what was not kept as manifest.yaml."""
        entry = tmp / "manifest.yaml"
        if not os.path.lexists(entry):
            return None
        st = os.lstat(entry)
        if stat.S_ISREG(st.st_mode):
            return None
        if stat.S_ISDIR(st.st_mode):
            os.rename(entry, tmp / "manifest-folder")
            return None
        os.unlink(entry)
        return "manifest.yaml (not a regular file)"

    @staticmethod
    def _place(source: Path | None, target: Path) -> None:
        if source is not None and os.path.lexists(source):
            move(source, target)
            if not target.is_file() or target.is_symlink():
                target.unlink()
                target.touch()
            else:
                # the worker made it readable by the daemon only, while it sat in staging
                os.chmod(target, 0o644)
        elif not os.path.lexists(target):
            target.touch()

    def clean_stale(self, keep: set[str]) -> list[str]:
        """Remove temp folders of commits that no job will finish (their job is gone or published)."""
        removed = []
        for entry in os.scandir(self.root):
            if entry.name.startswith(".") and entry.name.endswith(".tmp") and entry.name[1:-4] not in keep:
                remove_tree(Path(entry.path))
                removed.append(entry.name)
        return removed


def result_document(job: JobRecord, outcome: dict[str, Any], name: str, *, key: str) -> dict[str, Any]:
    """What result.yaml says; every string in it made printable (see `_printable`)."""
    status = JobStatus(outcome["status"])
    doc: dict[str, Any] = {
        "id": name,
        "status": status.value,
        "exit_code": outcome.get("exit_code"),
        "error": outcome.get("error"),
        "attempts": job.attempts,
        "worker": job.worker if job.attempts else None,
        "manifest": job.source,
        "submitted_at": iso(job.submitted_at),
        "started_at": iso(outcome.get("started_at")),
        "finished_at": iso(outcome.get("finished_at")),
    }
    if outcome.get("started_at") and outcome.get("finished_at"):
        doc["duration_seconds"] = round(outcome["finished_at"] - outcome["started_at"], 3)
    if outcome.get("signal"):
        doc["signal"] = outcome["signal"]
    for stream in ("stdout", "stderr"):
        if outcome.get(f"{stream}_truncated"):
            doc[f"{stream}_truncated"] = True
    if outcome.get("warm"):
        doc["interpreter"] = "forked"  # from a warm interpreter (README: The warm interpreter)
    if outcome.get("dropped"):
        doc["dropped"] = outcome["dropped"]
    if outcome.get("environment"):
        doc["environment"] = outcome["environment"]
    doc["key"] = key
    return {field: _printable(value) for field, value in doc.items()}


def array_document(tasks: list[JobRecord], *, total: int) -> dict[str, Any]:
    """What an array's result.yaml says of its tasks: counts by status, and one line per task."""
    counts: dict[str, int] = {}
    lines = []
    for task in tasks:
        counts[task.status.value] = counts.get(task.status.value, 0) + 1
        outcome = task.outcome or {}
        lines.append({"index": task.task_index, "parameters": dict(_parameters(task)), "status": task.status.value,
                      "exit_code": outcome.get("exit_code"), "error": task.error})
    return {"task_count": total, "counts": counts, "tasks": lines}


def _parameters(job: JobRecord) -> list[tuple[str, str]]:
    """A task's parameter values, from its stored manifest."""
    if not job.manifest:
        return []
    return [(str(k), str(v)) for k, v in json.loads(job.manifest).get("parameters", ())]


def _key_of(folder: Path) -> str | None:
    """The key in a folder's result.yaml, or None."""
    try:
        data = yaml.safe_load((folder / "result.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return None
    return data.get("key") if isinstance(data, dict) else None


def _free_job_output(tmp: Path) -> int:
    """Empty what the job produced in a folder being published (output/, stdout.txt, stderr.txt); the
    bytes freed."""
    freed = 0
    for _path, st, _depth in walk(tmp / "output", skip_errors=True):
        if not stat.S_ISDIR(st.st_mode):
            freed += st.st_size
    remove_tree(tmp / "output")
    (tmp / "output").mkdir()
    for stream in ("stdout.txt", "stderr.txt"):
        try:
            freed += os.lstat(tmp / stream).st_size
            os.truncate(tmp / stream, 0)
        except FileNotFoundError:
            continue
    return freed


def _printable(value: Any) -> Any:
    """`value` with each string in it made printable. The id, the manifest's file name, the error (which
    may echo a manifest's key) and the dropped paths are untrusted: a name that is not UTF-8 would make
    the dump fail (UnicodeEncodeError, the job stuck committing), and a control character would reach
    whoever cats the file. Every field, not a list of them: a field added later is safe too."""
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, list):
        return [_printable(v) for v in value]
    if isinstance(value, dict):
        return {k: _printable(v) for k, v in value.items()}
    return value


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
