"""Pipelines: the jobs waiting for the jobs they run after (`after:`, and the jobs `outbox:` inputs read from).

A job whose inbox inputs are all claimed (see inputs) but that names upstream jobs stays `waiting` until
each of them has committed. It is queued once all of them succeeded, after the files its `outbox:` inputs
name have been copied from their outbox folders into its own `inputs/outbox/JOB/PATH` (copied, never
linked: the upstream folder stays as it was published, and the two never share a file). It is cancelled as
soon as one of them ends otherwise, naming it ("prep failed, so this job did not run"); the jobs after it
are then cancelled the same way, naming the first job that failed. An upstream job dropped after its
dependent may be claimed after it: a job not known yet is waited for until the dependent's deadline
(`intake.input_grace` seconds after its claim, as its inputs are), then the dependent is rejected naming
it. A cycle (a job after itself, or after one that runs after it) is rejected when it closes.

What is waited for lives in the job's stored manifest (`Manifest.after`) and its deadline in the store,
so a restart rebuilds all of this from the waiting jobs (Intake.recover).

Both directions are kept, so that a job that commits costs work for the jobs that named it and for no
other (issue 16: O(what changed)): `awaited(id)` is asked from the committer's thread for every published
job, and only those awaited are handed to the intake's thread, which calls `published`. The intake's
thread drives everything else too; decisions come out as `Settled` records, as those of inputs do.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath

from dropq.config import Config
from dropq.errors import ManifestError
from dropq.intake.inputs import FILE_KINDS, Settled
from dropq.intake.manifest import Manifest
from dropq.paths import resolve_inside
from dropq.publish.owners import Owner, Ownership
from dropq.queue.jobs import JobStatus
from dropq.queue.store import JobRecord, Store

#: how a job that did not succeed is named in the reason its dependents are cancelled for
_ENDED = {JobStatus.FAILED: "failed", JobStatus.TIMED_OUT: "timed out", JobStatus.CANCELLED: "was cancelled",
          JobStatus.REJECTED: "was rejected"}
#: the key, in a cancelled job's outcome, of the first failure in its chain ("prep failed")
CAUSE = "after_failed"


@dataclass
class _Waiting:
    manifest: Manifest
    #: the upstream jobs that have not ended yet (or are not known yet)
    pending: set[str]
    #: when an upstream job not known by then makes the job rejected
    deadline: float


class AwaitedUpstreams:
    def __init__(self, *, config: Config, store: Store, now: Callable[[], float],
                 ownership: Ownership | None = None) -> None:
        self.config = config
        self.store = store
        #: on a shared host, a job reads only its own owner's outbox folders
        self.ownership = ownership if ownership is not None else Ownership(active=False)
        self._now = now
        self._waiting: dict[str, _Waiting] = {}  # job id -> what it waits for
        self._dependents: dict[str, set[str]] = {}  # upstream id -> ids of the waiting jobs that name it
        self._deadlines: dict[str, float] = {}  # job id -> its deadline, while it names a job not known yet

    def awaited(self, job_id: str) -> bool:
        """Whether the end of job `job_id` concerns a waiting job (it is named by one, or is one). Asked from
        the committer's thread: a lookup only."""
        return job_id in self._dependents or job_id in self._waiting

    def wait(self, job_id: str, manifest: Manifest, deadline: float) -> Settled | None:
        """Job `job_id` (its inbox inputs claimed) waits for the jobs its manifest names; whether it waits
        no more: it may run, or is cancelled or rejected."""
        if job_id in manifest.after:
            return Settled(job_id, f"the job names itself in `after` ({job_id}); it would wait for ever")
        if job_id not in self._waiting:
            self._waiting[job_id] = _Waiting(manifest, set(manifest.after), deadline)
            for up in manifest.after:
                self._dependents.setdefault(up, set()).add(job_id)
        # a cycle can close only through a job some waiting job names: others cost no walk at all
        cycle = self._cycle(job_id) if job_id in self._dependents else []
        if cycle:
            self.forget(job_id)
            return Settled(job_id, f"`after` makes a cycle: {' -> '.join(cycle)}; none of these jobs could ever run")
        return self._look(job_id)

    def published(self, job_id: str) -> Iterator[Settled]:
        """Job `job_id` has committed: the jobs waiting for it, and only they, look again."""
        if job_id in self._waiting:
            self.forget(job_id)  # it ended while it waited (a person cancelled it)
        for waiting in sorted(self._dependents.get(job_id, ())):
            if self._still_waiting(waiting) and (done := self._look(waiting)) is not None:
                yield done

    def due(self, now: float) -> Iterator[Settled]:
        """Jobs past their deadline that still name a job not known: rejected, naming it."""
        for job_id, deadline in list(self._deadlines.items()):
            if deadline <= now and self._still_waiting(job_id) and (done := self._look(job_id)) is not None:
                yield done

    def next_times(self) -> list[float]:
        return list(self._deadlines.values())

    def reason(self, job_id: str) -> str | None:
        """What a waiting job waits for, in words (None if it waits for no job)."""
        entry = self._waiting.get(job_id)
        if entry is None or not entry.pending:
            return None
        return "waiting for " + ", ".join(up for up in entry.manifest.after if up in entry.pending)

    def forget(self, job_id: str) -> None:
        """The job waits no more (queued, rejected, cancelled)."""
        self._deadlines.pop(job_id, None)
        entry = self._waiting.pop(job_id, None)
        for up in entry.manifest.after if entry else ():
            self._undepend(up, job_id)

    # --- deciding ------------------------------------------------------------------------------

    def _look(self, job_id: str) -> Settled | None:
        """Look up the upstream jobs a waiting job still waits for; whether it waits no more."""
        entry = self._waiting[job_id]
        unknown = []
        for up in entry.manifest.after:
            if up not in entry.pending:
                continue
            record = self.store.find(up)
            if record is None:
                unknown.append(up)
            elif record.status.is_final:
                entry.pending.discard(up)
                self._undepend(up, job_id)
                if record.status is not JobStatus.SUCCEEDED:
                    self.forget(job_id)
                    return _cancelled(job_id, record)
        if unknown and self._now() >= entry.deadline:
            self.forget(job_id)
            grace = self.config.intake.input_grace
            return Settled(job_id, f"the job runs after {unknown[0]!r}, but no job {unknown[0]!r} was dropped within "
                                   f"{grace:g} seconds of this manifest (is the name right? a job's id is its "
                                   "manifest's name without .yaml)")
        if unknown:
            self._deadlines[job_id] = entry.deadline
        else:
            self._deadlines.pop(job_id, None)
        if entry.pending:
            return None
        self.forget(job_id)
        try:
            self._fetch(job_id, entry.manifest)
        except ManifestError as exc:
            return Settled(job_id, str(exc))
        except OSError as exc:
            return Settled(job_id, f"an input from an outbox folder could not be copied: {exc}")
        return Settled(job_id, manifest=entry.manifest)

    def _cycle(self, job_id: str) -> list[str]:
        """A path from `job_id` back to itself through the waiting jobs' upstreams, or [] (a depth-first walk
        of what the job waits for, bounded by the jobs waiting)."""
        stack = [(up, [job_id, up]) for up in sorted(self._waiting[job_id].pending)]
        seen: set[str] = set()
        while stack:
            current, path = stack.pop()
            if current == job_id:
                return path
            if current in seen or current not in self._waiting:
                continue
            seen.add(current)
            stack.extend((up, [*path, up]) for up in sorted(self._waiting[current].pending))
        return []

    def _fetch(self, job_id: str, manifest: Manifest) -> None:
        """Copy each `outbox:JOB/PATH` input from JOB's outbox folder into inputs/outbox/JOB/PATH. Checked as
        every untrusted path is (no symlink on the way, a regular file), and copied from the file that was
        checked (opened without following a link, compared with what lstat saw)."""
        reader = Owner.of_job(self.store.find(job_id))
        for item in manifest.from_outbox:
            dst = self.config.spool / job_id / "inputs" / "outbox" / item
            if os.path.lexists(dst):
                continue  # copied before a restart
            up, *rest = PurePosixPath(item).parts
            record = self.store.get(up)
            written = f"outbox:{item}"
            refused = self.ownership.read_refused(reader, Owner.of_job(record), upstream_id=up)
            if refused is not None:
                raise ManifestError(f"input {written!r} may not be read: {refused}")
            src = resolve_inside(self.config.outbox, PurePosixPath(record.folder, *rest), what=f"input {written!r}:")
            try:
                st = os.lstat(src)
            except FileNotFoundError:
                raise ManifestError(f"input {written!r} is not there: job {up} succeeded, but its outbox folder "
                                    f"has no {'/'.join(rest)}") from None
            if not stat.S_ISREG(st.st_mode):
                kind = FILE_KINDS.get(stat.S_IFMT(st.st_mode), "not a regular file")
                raise ManifestError(f"input {written!r} is {kind}; inputs must be regular files")
            _copy(src, dst, st, written=written)

    # --- bookkeeping ---------------------------------------------------------------------------

    def _undepend(self, up: str, job_id: str) -> None:
        waiting = self._dependents.get(up)
        if waiting is not None:
            waiting.discard(job_id)
            if not waiting:
                del self._dependents[up]

    def _still_waiting(self, job_id: str) -> bool:
        """Whether the job still waits (it may have been cancelled meanwhile)."""
        job = self.store.find(job_id)
        if job is None or job.status is not JobStatus.WAITING or job_id not in self._waiting:
            self.forget(job_id)
            return False
        return True


def _cancelled(job_id: str, upstream: JobRecord) -> Settled:
    """The job is cancelled because `upstream` did not succeed; the reason names the first job that failed."""
    direct = f"{upstream.id} {_ENDED.get(upstream.status, upstream.status.value)}"
    first = (upstream.outcome or {}).get(CAUSE) if upstream.status is JobStatus.CANCELLED else None
    if isinstance(first, str) and first:
        return Settled(job_id, f"{first}, so this job did not run (nor did {upstream.id}, which it runs after)",
                       cause=first)
    return Settled(job_id, f"{direct}, so this job did not run", cause=direct)


def _copy(src: os.PathLike[str], dst: os.PathLike[str], seen: os.stat_result, *, written: str) -> None:
    """Copy the regular file `src` (as lstat saw it) to `dst`, read-only, by a rename of a finished copy."""
    fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as source:
        st = os.fstat(source.fileno())
        if (st.st_dev, st.st_ino) != (seen.st_dev, seen.st_ino) or not stat.S_ISREG(st.st_mode):
            raise ManifestError(f"input {written!r} was replaced while it was being copied")
        target = os.fspath(dst)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.fetch")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)  # a copy a crash interrupted (read-only already, perhaps)
        out_fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        with os.fdopen(out_fd, "wb") as out:
            shutil.copyfileobj(source, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
            os.fchmod(out.fileno(), 0o444)
        os.replace(tmp, target)
