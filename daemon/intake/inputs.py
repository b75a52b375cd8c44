"""The jobs waiting for their input files: which files each still needs, and which jobs wait for each file.

A claimed manifest's inputs are claimed with it (renamed into its spool folder, `inputs/`), each once it
is complete (see completeness). A job that has them all is queued; one whose inputs do not all arrive
within `intake.input_grace` seconds of the manifest is rejected, naming the first one missing.

Both directions are kept, so that an arriving file costs work for the jobs that named it, not for every
job waiting (issue 16: O(what changed)). Inputs in subfolders raise no event the intake acts on: they
are looked at again every DEEP_INPUT_CHECK seconds, and only they.

The intake's thread drives this (no thread of its own). What a look decides comes out as `Settled`
records, which the intake acts on (queue the job, or reject it); `arrived` and `due` yield each as it
is decided, so that the intake acts on it before the next job is looked at, and an error on one job
(an input that cannot be moved) leaves those before it settled.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath

from dropq.config import Config
from dropq.errors import ManifestError
from dropq.intake.completeness import Completeness
from dropq.intake.manifest import Manifest
from dropq.paths import move, resolve_inside
from dropq.publish.owners import Owner, Ownership
from dropq.queue.jobs import JobStatus
from dropq.queue.store import Store

#: seconds between looks at awaited inputs in subfolders (the watcher reports only the inbox's top level)
DEEP_INPUT_CHECK = 1.0

FILE_KINDS = {stat.S_IFLNK: "a symlink", stat.S_IFDIR: "a directory", stat.S_IFIFO: "a FIFO",
              stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a device", stat.S_IFBLK: "a device"}


@dataclass(frozen=True)
class Settled:
    """A job that waits no more: it may run (`reason` None), or must be rejected (or, with a `cause`,
    cancelled: a job it runs after did not succeed) for `reason`."""

    job_id: str
    reason: str | None = None
    #: the job's manifest, when it may run
    manifest: Manifest | None = None
    #: when it ends cancelled rather than rejected: the first job in its chain that did not succeed, in
    #: words ("prep failed"), kept in its outcome for the jobs after it
    cause: str | None = None


class AwaitedInputs:
    def __init__(self, *, config: Config, store: Store, completeness: Completeness,
                 now: Callable[[], float], ownership: Ownership | None = None) -> None:
        self.config = config
        self.store = store
        #: on a shared host, a job takes only its own owner's files from the inbox
        self.ownership = ownership if ownership is not None else Ownership(active=False)
        self.completeness = completeness
        self._now = now
        self._deadlines: dict[str, float] = {}  # job id -> deadline for its inputs
        self._needs: dict[str, tuple[Manifest, set[str]]] = {}  # job id -> its manifest, inputs unclaimed
        self._wanted: dict[str, set[str]] = {}  # input path -> ids of the jobs waiting for it
        self._next_deep_check = 0.0

    def wait(self, job_id: str, manifest: Manifest, deadline: float) -> Settled | None:
        """Job `job_id` waits for the inputs its manifest names, until `deadline`: those there are
        claimed at once; whether it waits no more."""
        self._deadlines[job_id] = deadline
        if job_id not in self._needs:
            # inputs read from an outbox folder are fetched once the jobs they come from have ended (upstream)
            self._needs[job_id] = (manifest, set(manifest.inbox_inputs()))
            for rel in manifest.inbox_inputs():
                self._wanted.setdefault(rel, set()).add(job_id)
        return self._claim(job_id)

    def wanted(self, rel: str) -> bool:
        """Whether some waiting job named input `rel`."""
        return rel in self._wanted

    def arrived(self, rel: str) -> Iterator[Settled]:
        """Input `rel` arrived (or its quiet period ended): the jobs waiting for it, and only they, claim it."""
        for job_id in sorted(self._wanted.get(rel, ())):
            if self._still_waiting(job_id) and (done := self._claim(job_id, only=rel)) is not None:
                yield done

    def due(self, now: float) -> Iterator[Settled]:
        """Inputs past their quiet period, jobs past their deadline, and the look at subfolder inputs."""
        for rel in self.completeness.inputs_due(now, self._wanted):
            yield from self.arrived(rel)  # its quiet period is over
        for job_id, deadline in list(self._deadlines.items()):
            # one last look, then rejected naming what is missing
            if deadline <= now and self._still_waiting(job_id) and (done := self._claim(job_id)) is not None:
                yield done
        if now >= self._next_deep_check and self._wanted:
            # inputs in subfolders raise no event the intake acts on: look at those, and only those, again
            self._next_deep_check = now + DEEP_INPUT_CHECK
            for rel in [r for r in self._wanted if "/" in r]:
                yield from self.arrived(rel)

    def next_times(self) -> list[float]:
        """When `due` may next have something to say."""
        times = [*self._deadlines.values(), *self.completeness.input_times(self._wanted)]
        if any("/" in rel for rel in self._wanted):
            times.append(self._next_deep_check)
        return times

    def forget(self, job_id: str) -> None:
        """The job waits no more (queued, rejected, cancelled)."""
        self._deadlines.pop(job_id, None)
        entry = self._needs.pop(job_id, None)
        for rel in entry[1] if entry else ():
            self._unwant(rel, job_id)

    def _claim(self, job_id: str, *, only: str | None = None) -> Settled | None:
        """Claim the inputs of a waiting job that are there (with `only`, just that one); whether it waits
        no more: it has them all, or it must be rejected (an input that can never be taken, or its
        deadline passed, naming the first one missing)."""
        manifest, needs = self._needs[job_id]
        for rel in sorted(needs) if only is None else [only] if only in needs else []:
            try:
                if self._claim_input(job_id, rel):
                    needs.discard(rel)
                    self._unwant(rel, job_id)
            except ManifestError as exc:
                self.forget(job_id)
                return Settled(job_id, str(exc))
        if not needs:
            self.forget(job_id)
            return Settled(job_id, manifest=manifest)
        if self._now() >= self._deadlines[job_id]:
            grace = self.config.intake.input_grace
            missing = next(rel for rel in manifest.inputs if rel in needs)
            self.forget(job_id)
            return Settled(job_id, f"input file {missing!r} did not arrive in the inbox within {grace:g} seconds "
                                   "of the manifest")
        return None

    def _claim_input(self, job_id: str, rel: str) -> bool:
        """Move input `rel` into the job's spool folder if it is there and complete; whether the job has it.
        Raises ManifestError when it can never be (a path through a link, not a regular file)."""
        dst = self.config.spool / job_id / "inputs" / rel
        if os.path.lexists(dst):
            return True
        src = resolve_inside(self.config.inbox, PurePosixPath(rel), what="input")
        try:
            st = os.lstat(src)
        except FileNotFoundError:
            return False
        if not stat.S_ISREG(st.st_mode):
            kind = FILE_KINDS.get(stat.S_IFMT(st.st_mode), "not a regular file")
            raise ManifestError(f"input {rel!r} is {kind}; inputs must be regular files")
        refused = self.ownership.input_refused(st.st_uid, Owner.of_job(self.store.find(job_id)))
        if refused is not None:  # left where it is, for its owner's own manifest
            raise ManifestError(f"input {rel!r} may not be taken: {refused}")
        if not self.completeness.input_complete(rel, st):
            return False
        try:
            move(src, dst)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise
            return False
        return True

    def _unwant(self, rel: str, job_id: str) -> None:
        waiting = self._wanted.get(rel)
        if waiting is not None:
            waiting.discard(job_id)
            if not waiting:
                del self._wanted[rel]

    def _still_waiting(self, job_id: str) -> bool:
        """Whether the job is still waiting for inputs (it may have been cancelled meanwhile)."""
        job = self.store.find(job_id)
        if job is None or job.status is not JobStatus.WAITING or job_id not in self._needs:
            self.forget(job_id)
            return False
        return True
