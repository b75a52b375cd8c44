"""One job at a time: the runner starts a posted job (after checking its paths) on a thread of its
own, stops it on cancel or shutdown, keeps finished jobs' reports for the daemon to collect, and
cleans up after each so that nothing of it reaches the next. Running the program itself is
`supervise`; the job and the worker's settings are in `job`.
"""

from __future__ import annotations

import os
import threading
import time

from . import isolation, procs
from .job import Job, Settings, command
from .launcher import Launcher
from .protocol import JobSpec, Outcome, Staging
from .supervise import execute
from .warm import WarmPool


class Busy(RuntimeError):
    """The worker already runs a job."""


class Runner:
    """Runs the jobs posted to this worker, one at a time, and keeps the last results for the daemon."""

    def __init__(self, settings: Settings, launcher: Launcher | None = None) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._current: Job | None = None
        self._finished: dict[str, Job] = {}
        # ids cancelled before their start request arrived (the two may cross on the way): such a
        # job is never started; it ends at once as cancelled
        self._cancelled_early: dict[str, None] = {}
        #: how many jobs this worker started: the next job's uid is the next in the range
        self._started = 0
        #: the fork servers jobs are forked from (used by the job's thread only: one job at a time); with
        #: job uids only through the launcher, forked before the worker emptied its bounding set
        self.warm = WarmPool(enabled=settings.warm and (settings.uids is None or launcher is not None),
                             preload=settings.preload, launcher=launcher)
        settings.jobs.mkdir(parents=True, exist_ok=True)
        if settings.uids is not None:
            # the staging folder: job uids may pass through to their own folder, but neither list it
            # (the keys are not theirs to learn) nor create anything in it
            os.chmod(settings.jobs, 0o711)

    @property
    def current(self) -> Job | None:
        job = self._current
        return job if job is not None and not job.done.is_set() else None

    def start(self, spec: JobSpec) -> Job:
        with self._lock:
            known = self.get(spec.key)
            if known is not None:
                return known  # the same job posted twice (the daemon retried a request): idempotent
            if self.current is not None:
                raise Busy(self.current.spec.key)
            argv = command(spec, self.settings)
            if spec.key in self._cancelled_early:
                del self._cancelled_early[spec.key]
                job = Job(spec, Staging(self.settings.jobs, spec.key))
                job.close_wake()
                job.report = job.report.ended(Outcome.CANCELLED, finished_at=time.time())
                self._remember(job)
                job.done.set()
                return job
            staging = Staging(self.settings.jobs, spec.key)
            # left by a worker that died before the daemon took it away: removed without following
            # links or recursing (a job's tree may be deeper than the stack)
            isolation.remove_tree(str(staging.output))
            uid = None
            if self.settings.uids is not None:
                uid = self.settings.uids.nth(self._started)
                isolation.make_output(staging.output, uid)
            else:
                staging.output.mkdir()
            self._started += 1
            job = Job(spec, staging, uid)
            self._current = job
            self._finished.pop(spec.key, None)
        threading.Thread(target=self._run, args=(job, argv), name=f"job-{spec.key}", daemon=True).start()
        return job

    def get(self, key: str) -> Job | None:
        job = self._current
        if job is not None and job.spec.key == key:
            return job
        return self._finished.get(key)

    def cancel(self, key: str) -> Job | None:
        """Stop the job if it runs; if this worker has not seen it yet, make sure it never starts."""
        job = self.get(key)
        if job is None:
            with self._lock:
                self._cancelled_early[key] = None
                while len(self._cancelled_early) > 64:
                    self._cancelled_early.pop(next(iter(self._cancelled_early)))
        elif not job.done.is_set():
            job.stop("cancel")
        return job

    def _remember(self, job: Job) -> None:
        """Keep a finished job's result for the daemon to collect (the last 64); under self._lock."""
        self._finished[job.spec.key] = job
        while len(self._finished) > 64:
            self._finished.pop(next(iter(self._finished)))

    def forget(self, key: str) -> bool:
        with self._lock:
            job = self._finished.pop(key, None)
            if self._current is not None and self._current.spec.key == key and self._current.done.is_set():
                self._current = None
        return job is not None

    def shutdown(self, timeout: float = 10.0) -> None:
        job = self.current
        if job is not None:
            job.stop("shutdown")
            job.done.wait(timeout)
        self.warm.close()

    def _clean_up(self, job: Job) -> None:
        """Nothing of the job may reach the next one: its processes are killed, and with a job uid its
        files in /tmp and /dev/shm removed and its output taken back, before it is reported done."""
        uids = self.settings.uids
        if job.uid is not None:
            isolation.kill_uid(job.uid)
        procs.kill_leftovers()  # what a job without a uid left (and, with one, nothing by now)
        if job.uid is not None and uids is not None:
            isolation.clear_scratch(job.uid)
            isolation.take_back(job.staging.output, uids)

    def _run(self, job: Job, argv: list[str]) -> None:
        try:
            report = execute(job, argv, job.variables(self.settings), self.settings, self.warm)
        except Exception as exc:  # noqa: BLE001 - whatever happened, the job must end with a report
            report = job.report.ended(Outcome.ERROR, finished_at=time.time(),
                                      error=f"the worker failed to run the job: {exc}")
        finally:
            job.close_wake()
        try:
            self._clean_up(job)
        except OSError as exc:  # its leftovers could not all go: the job fails saying so (they stay
            # its uid's, which the next job, under the next uid, cannot reach)
            report = report.ended(Outcome.ERROR, finished_at=time.time(),
                                  error=f"the worker could not clean up after the job: {exc}")
        with self._lock:
            job.report = report
            self._remember(job)
        job.done.set()
