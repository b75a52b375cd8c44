"""The balancer: gives the highest-priority, oldest ready job to an idle, healthy worker.

One slot thread per worker. An idle slot sleeps on a condition variable and wakes only when a job
is queued, a worker frees up or comes back, or a retry's backoff ends (the wait is timed to the
earliest such moment): no polling. The job's state lives in the store, so the queue's order is one
indexed SQLite query, and a restart loses nothing.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from .config import Config
from .errors import JobRefused, StoreError, TransportError, UnknownJob, WorkerBusy
from .jobs import JobStatus
from .manifest import Manifest
from .outbox import Outbox, job_key
from .paths import remove_tree
from .pools import Pool, WorkerHandle
from .store import JobRecord, Store

log = logging.getLogger("dropq.balancer")

#: seconds one long-poll waits on the worker before asking again
POLL_WAIT = 30.0


class Balancer:
    def __init__(self, *, config: Config, store: Store, pool: Pool, outbox: Outbox,
                 now: Callable[[], float] = time.time) -> None:
        self.config = config
        self.store = store
        self.pool = pool
        self.outbox = outbox
        self._now = now
        self._cond = threading.Condition()
        self._stopping = False
        self._threads: dict[str, threading.Thread] = {}
        self._broken: set[str] = set()
        self._started = False
        self._cancel_requested: set[str] = set()
        # Publishing (moves, fsyncs) happens on its own thread, so a worker starts its next job as
        # soon as the last one's outcome is recorded; the store has it as committing meanwhile, and
        # a restart finishes any such commit.
        self._commits: queue.SimpleQueue[tuple[WorkerHandle, JobRecord] | None] = queue.SimpleQueue()
        self._committer = threading.Thread(target=self._commit_loop, name="committer", daemon=True)
        pool.on_change(self._pool_changed)

    def trouble(self) -> str | None:
        """Why the balancer cannot go on by itself (and the daemon should be restarted), or None."""
        if self._broken:
            return f"the slot of worker(s) {', '.join(sorted(self._broken))} failed"
        if self._committer.ident is not None and not self._committer.is_alive() and not self._stopping:
            return "the committer thread ended"
        return None

    def notify(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def start(self) -> None:
        handles = self.pool.workers()
        names = {h.name for h in handles}
        self.store.forget_workers(names)
        for job in self.store.with_status(JobStatus.RUNNING):
            if job.worker not in names:
                self._retry_or_fail(job, f"its worker {job.worker} no longer exists")
        self._committer.start()
        with self._cond:
            self._started = True
            for handle in handles:
                if handle.name not in self._threads:
                    self._add_slot(handle)

    def _add_slot(self, handle: WorkerHandle) -> None:
        thread = threading.Thread(target=self._slot, args=(handle,), name=f"slot-{handle.name}", daemon=True)
        self._threads[handle.name] = thread
        thread.start()

    def _pool_changed(self) -> None:
        """A worker appeared, died or came back: give new workers a slot, and wake the idle ones."""
        with self._cond:
            if self._started and not self._stopping:
                for handle in self.pool.workers():
                    known = self._threads.get(handle.name)
                    if known is None or not known.is_alive():
                        self._add_slot(handle)
            self._cond.notify_all()

    def stop(self) -> None:
        """Stop handing out jobs. Slots still following a job return once the pool stops its worker."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    def join(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        for thread in list(self._threads.values()):
            thread.join(max(0.0, deadline - time.monotonic()))
        if self._committer.is_alive():
            self._commits.put(None)  # after the slots: every outcome they recorded is published first
            self._committer.join(max(0.0, deadline - time.monotonic()))

    def _commit_loop(self) -> None:
        while (item := self._commits.get()) is not None:
            worker, job = item
            key = job_key(job)
            try:
                self.outbox.finish(job, staging=worker.staging(key))
                remove_tree(worker.inputs_dir / key)
                # no DELETE to make the worker forget it: keys are per attempt, and the worker keeps
                # only its last 64 results anyway; one request less per job
            except Exception:  # the job stays committing; the next start publishes it
                log.exception("job %s: publishing failed; it will be retried at the next start", job.id)

    def cancel(self, job_id: str) -> str:
        """Cancel a job wherever it is; says what happened, in words for the log."""
        job = self.store.find(job_id)
        if job is None:
            return "no such job"
        if job.status.is_final or job.status is JobStatus.COMMITTING:
            return f"already {job.status.value}"
        self._cancel_requested.add(job_id)
        if job.status in (JobStatus.WAITING, JobStatus.QUEUED):
            try:
                job = self.store.transition(job_id, JobStatus.COMMITTING, error="the job was cancelled", outcome={
                    "status": JobStatus.CANCELLED.value, "error": "the job was cancelled before it ran",
                    "exit_code": None, "finished_at": self._now()})
            except StoreError:
                job = self.store.get(job_id)  # a slot took it a moment ago: cancel it on its worker
            else:
                self.outbox.finish(job)
                self._cancel_requested.discard(job_id)
                return "cancelled before it ran"
        if job.status is JobStatus.RUNNING:
            handle = next((h for h in self.pool.workers() if h.name == job.worker), None)
            if handle is not None:
                try:
                    handle.transport.cancel(job_key(job))
                except TransportError:
                    pass  # not there yet: the worker keeps the cancel, and the start ends as cancelled
            return f"cancelling it on worker {job.worker}"
        return f"it is {job.status.value}"

    # --- one slot per worker -------------------------------------------------------------------

    def _slot(self, worker: WorkerHandle) -> None:
        health: dict[str, Any] | None = None
        try:
            for job in self.store.with_status(JobStatus.RUNNING):
                if job.worker == worker.name:
                    health = self.pool.ensure(worker.name)
                    if health is None:
                        return
                    log.info("job %s: re-attaching to worker %s", job.id, worker.name)
                    self._follow(worker, job, health)
            health = None
            while not self._stopping:
                if health is None:  # at start, and after anything went wrong with this worker
                    health = self.pool.ensure(worker.name)
                    if health is None:
                        return
                ready = self._next(worker, detail=f"pid {health.get('pid')}")
                if ready is None:
                    return
                if not self._run(worker, ready, health):
                    health = None
        except Exception:  # a slot that dies silently would strand its worker
            log.exception("slot %s failed; the daemon must be restarted to use this worker again", worker.name)
            self._broken.add(worker.name)
            self.store.set_worker(worker.name, "broken", detail="see the daemon's log")

    def _next(self, worker: WorkerHandle, *, detail: str) -> JobRecord | None:
        idle = False
        with self._cond:
            while not self._stopping:
                job = self.store.take_next(worker.name, detail=detail)  # also marks the worker busy
                if job is not None:
                    return job
                if not idle:  # written only when the slot is about to sleep: one write less per job
                    self.store.set_worker(worker.name, "idle", detail=detail)
                    idle = True
                due = self.store.next_due()
                self._cond.wait(None if due is None else max(0.0, due - self._now()))
        return None

    def _run(self, worker: WorkerHandle, job: JobRecord, health: dict[str, Any]) -> bool:
        """Run one job on `worker`; False if the worker misbehaved (it is then checked before reuse)."""
        key = job_key(job)
        assert job.manifest is not None
        manifest = Manifest.from_json(job.manifest)
        log.info("job %s: attempt %d on worker %s", job.id, job.attempts, worker.name)
        try:
            if manifest.inputs:
                self._stage_inputs(worker, job, manifest)
            spec = {
                "id": key, "program": manifest.program, "args": list(manifest.args),
                "inputs": [f"{key}/{rel}" for rel in manifest.inputs], "env": dict(manifest.env),
                "timeout": manifest.timeout, "kill_grace": self.config.jobs.kill_grace,
                "max_output_bytes": self.config.jobs.max_output_bytes,
            }
            # started and waited for in one request; a cancel that overtakes it is kept by the worker
            status: dict[str, Any] | None = worker.transport.start(spec, wait=POLL_WAIT)
        except (JobRefused, WorkerBusy) as exc:
            self._lost(worker, job, str(exc))
            return False
        except TransportError as exc:
            # the job may have started before the connection failed: the worker, if still the same,
            # tells (the long-poll below finds it, or answers that it never came)
            if not self._still_there(worker, job, health, exc):
                return False
            status = None
        return self._follow(worker, job, health, status)

    def _still_there(self, worker: WorkerHandle, job: JobRecord, health: dict[str, Any],
                     exc: TransportError) -> bool:
        """After a failed request: whether the same worker process answers again (else the job is lost)."""
        if self._stopping:
            self._lost(worker, job, "the daemon is shutting down")
            return False
        again = self.pool.ensure(worker.name)
        if again is None or again.get("pid") != health.get("pid"):
            self._lost(worker, job, f"worker {worker.name} stopped answering ({exc})")
            return False
        return True

    def _follow(self, worker: WorkerHandle, job: JobRecord, health: dict[str, Any],
                status: dict[str, Any] | None = None) -> bool:
        """Long-poll the worker until the job ends (unless `status` says it has), then commit it."""
        key = job_key(job)
        while status is None or status.get("state") != "done":
            try:
                status = worker.transport.status(key, wait=POLL_WAIT)
            except UnknownJob as exc:
                self._lost(worker, job, str(exc))
                return False
            except TransportError as exc:
                if not self._still_there(worker, job, health, exc):
                    return False
                status = None
        if status.get("outcome") == "stopped":
            self._lost(worker, job, "the worker was stopped")
            return False
        self._commit(worker, job, status)
        return True

    def _commit(self, worker: WorkerHandle, job: JobRecord, status: dict[str, Any]) -> None:
        manifest = Manifest.from_json(job.manifest) if job.manifest else None
        outcome = outcome_of(status, manifest)
        key = job_key(job)
        code = outcome.get("exit_code")
        if (manifest is not None and code in manifest.retry_on_exit and job.attempts <= job.retries
                and job.id not in self._cancel_requested):
            remove_tree(worker.inputs_dir / key)
            worker.staging(key).remove()
            worker.transport.forget(key)
            self._retry_or_fail(job, f"the program exited with code {code}, which its manifest retries",
                                lost=False)
            return
        self._cancel_requested.discard(job.id)
        try:
            job = self.store.transition(job.id, JobStatus.COMMITTING, outcome=outcome)
        except StoreError:
            log.exception("job %s: could not record its outcome", job.id)
            return
        self._commits.put((worker, job))
        if outcome.get("error"):  # a success needs no line of its own: the outbox logs the publish
            log.info("job %s: %s: %s", job.id, outcome["status"], outcome["error"])

    # --- losing a worker -----------------------------------------------------------------------

    def _lost(self, worker: WorkerHandle, job: JobRecord, reason: str) -> None:
        key = job_key(job)
        if self._stopping and self.pool.keeps_jobs_running:
            # the worker goes on running it; the next start re-attaches and collects the result
            log.info("job %s: left running on worker %s for the next start", job.id, worker.name)
            return
        remove_tree(worker.inputs_dir / key)
        worker.staging(key).remove()
        if self._stopping:
            # interrupted by our own shutdown, not the job's fault: this attempt does not count
            self.store.transition(job.id, JobStatus.QUEUED, attempts=max(0, job.attempts - 1), worker=None)
            log.info("job %s: interrupted by shutdown; queued again", job.id)
            return
        self._retry_or_fail(self.store.get(job.id), reason)

    def _retry_or_fail(self, job: JobRecord, reason: str, *, lost: bool = True) -> None:
        if job.attempts <= job.retries:
            delay = self.config.retry.delay(job.attempts)
            log.warning("job %s: %s; retry %d of %d in %.1fs", job.id,
                        f"worker lost ({reason})" if lost else reason, job.attempts, job.retries, delay)
            self.store.transition(job.id, JobStatus.QUEUED, worker=None, error=reason,
                                  not_before=self._now() + delay)
            self.notify()
            return
        error = (f"the worker running this job was lost {job.attempts} time(s) ({reason}); "
                 f"gave up after {job.attempts} attempt(s)")
        job = self.store.transition(job.id, JobStatus.COMMITTING, outcome={
            "status": JobStatus.FAILED.value, "error": error, "exit_code": None, "finished_at": self._now()})
        self.outbox.finish(job)

    def _stage_inputs(self, worker: WorkerHandle, job: JobRecord, manifest: Manifest) -> None:
        """Give the worker its own read-only view of the job's inputs (hard links, or copies)."""
        target = worker.inputs_dir / job_key(job)
        remove_tree(target)
        target.mkdir(parents=True, exist_ok=True)
        for rel in manifest.inputs:
            src = self.config.spool / job.id / "inputs" / rel
            dst = target / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            # a hard link costs nothing, but shares the file's mode: a container user must be able to
            # read it, so a file that is not world-readable is copied instead
            if os.lstat(src).st_mode & 0o004:
                try:
                    os.link(src, dst, follow_symlinks=False)
                    continue
                except OSError:  # another filesystem, or links not allowed
                    pass
            shutil.copyfile(src, dst, follow_symlinks=False)
            os.chmod(dst, 0o644)


def outcome_of(status: dict[str, Any], manifest: Manifest | None) -> dict[str, Any]:
    """Turn a worker's report into the outcome recorded in the store and written to result.yaml."""
    kind = status.get("outcome")
    code = status.get("exit_code")
    sig = status.get("signal")
    error = status.get("error")
    if kind == "exited" and code == 0:
        final = JobStatus.SUCCEEDED
    elif kind == "timed_out":
        final = JobStatus.TIMED_OUT
        limit = manifest.timeout if manifest else None
        cause = f" ({error})" if error else ""
        error = f"the program ran longer than its timeout of {limit:g} seconds and was stopped{cause}"
    elif kind == "cancelled":
        final, error = JobStatus.CANCELLED, "the job was cancelled"
    elif kind == "oom":
        final = JobStatus.FAILED  # the worker's error names the memory limit
    else:
        final = JobStatus.FAILED
        if kind == "exited" and sig:
            error = error or f"the program was killed by signal {_signal_name(sig)}"
        elif kind == "exited" and error:
            error = f"the program exited with code {code}: {error}"
        elif kind == "exited":
            error = error or f"the program exited with code {code}"
    keep = ("exit_code", "signal", "started_at", "finished_at", "stdout_truncated", "stderr_truncated")
    outcome = {k: status.get(k) for k in keep if status.get(k) is not None}
    outcome.update(status=final.value, error=error, exit_code=code)
    if manifest and manifest.output:
        outcome["stdout_as"] = manifest.output
    return outcome


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)
