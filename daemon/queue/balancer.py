"""The balancer: gives the highest-priority, oldest ready job to an idle, healthy worker.

One slot thread per worker. An idle slot sleeps on a condition variable and wakes only when a job
is queued, a worker frees up or comes back, or a retry's backoff ends (the wait is timed to the
earliest such moment): no polling. The job's state lives in the store, so the queue's order is one
indexed SQLite query, and a restart loses nothing. A slot that fails unexpectedly is repaired in place
(its job given back, its worker replaced, after a back-off); only one whose repairs keep failing is
reported broken, for systemd to restart the daemon.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any

from dropq.config import Config
from dropq.errors import (
    DropqError,
    JobRefused,
    PoolError,
    ProtocolMismatch,
    StoreError,
    TransportError,
    UnknownJob,
    WorkerBusy,
)
from dropq.intake.manifest import Manifest
from dropq.paths import remove_tree
from dropq.pools import Incarnation, Pool, WorkerHandle
from dropq.publish.committer import Committer
from dropq.publish.streams import last_line
from dropq.queue.capacity import BACKFILL_WINDOW, Capacity
from dropq.queue.jobs import JobStatus
from dropq.queue.repair import Repairs
from dropq.queue.store import JobRecord, Store
from dropq_worker.protocol import JobSpec, Outcome, Report, WorkerState

log = logging.getLogger("dropq.balancer")

#: seconds one long-poll waits on the worker before asking again
POLL_WAIT = 30.0
#: seconds to wait for the pool to learn why a worker stopped, before a job it ran is retried
SETTLE_WAIT = 30.0


class Balancer:
    def __init__(self, *, config: Config, store: Store, pool: Pool, committer: Committer,
                 capacity: Capacity | None = None, now: Callable[[], float] = time.time) -> None:
        self.config = config
        self.store = store
        self.pool = pool
        #: every finished job goes there (results, cancels, jobs given up); it owns the outbox
        self.committer = committer
        self.outbox = committer.outbox
        self._now = now
        self._cond = threading.Condition()
        self._stopping = False
        self._threads: dict[str, threading.Thread] = {}
        self.repairs = Repairs(max_failures=config.workers.repair_max_failures)
        self._started = False
        self._cancel_requested: set[str] = set()
        #: the room running jobs take of workers.capacity; counted under self._cond, with the pick
        self.capacity = capacity if capacity is not None else Capacity.from_config(config)
        self._unenforced_said: set[str] = set()
        pool.on_change(self._pool_changed)

    def trouble(self) -> str | None:
        """Why the balancer cannot go on by itself (and the daemon should be restarted), or None."""
        return self.repairs.trouble()

    def degraded(self) -> str | None:
        """What the balancer is repairing by itself (the daemon still works, with fewer workers), or None."""
        return self.repairs.degraded()

    def notify(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def start(self) -> None:
        handles = self.pool.workers()
        names = {h.name for h in handles}
        self.store.forget_workers(names)
        for job in self.store.with_status(JobStatus.RUNNING):
            if job.tasks is not None:
                continue  # an array: its tasks run, not it
            if job.worker not in names:
                self._retry_or_fail(job, f"its worker {job.worker} no longer exists")
            else:  # re-attached by its slot: its room is taken before any slot picks a job
                self._reserve(job)
        self._reject_misfits()
        with self._cond:
            self._started = True
            for handle in handles:
                if handle.name not in self._threads:
                    self._add_slot(handle)

    def _reserve(self, job: JobRecord) -> None:
        """Count `job`'s request against the capacity (under self._cond, with the pick that chose it)."""
        manifest = Manifest.from_json(job.manifest) if job.manifest else None
        self.capacity.reserve(job.id, manifest and manifest.memory, manifest and manifest.cpus)

    def _release(self, job_id: str) -> None:
        """The job left its worker: its room is free, and the idle slots look at the queue again."""
        with self._cond:
            if self.capacity.release(job_id):
                self._cond.notify_all()

    def _reject_misfits(self) -> None:
        """Jobs queued (under an earlier configuration) that ask for more than the capacity now: they could
        never start, and the first of them would stop the queue behind it. They end failed, saying why."""
        for job in self.store.with_status(JobStatus.QUEUED):
            manifest = Manifest.from_json(job.manifest) if job.manifest else None
            reason = manifest and self.capacity.never_fits(manifest.memory, manifest.cpus)
            if reason:
                try:
                    self.committer.finish(job.id, {"status": JobStatus.FAILED.value, "error": reason,
                                                   "exit_code": None, "finished_at": self._now()})
                except StoreError:
                    continue  # cancelled a moment ago: it ends anyway
                log.warning("job %s: %s", job.id, reason)

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

    def cancel(self, job_id: str) -> str:
        """Cancel a job wherever it is; says what happened, in words for the log."""
        job = self.store.find(job_id)
        if job is None:
            return "no such job"
        if job.status.is_final or job.status is JobStatus.COMMITTING:
            return f"already {job.status.value}"
        if job.tasks is not None:
            # an array: its tasks are cancelled together; it is published once the last of them has ended
            # those not started first: a slot that a cancelled running task frees must find none to take
            said = [self.cancel(task.id) for task in self.store.tasks_of(job_id, statuses=(
                JobStatus.WAITING, JobStatus.QUEUED))]
            said += [self.cancel(task.id) for task in self.store.tasks_of(job_id, statuses=(
                JobStatus.WAITING, JobStatus.QUEUED, JobStatus.RUNNING))]
            running = sum(1 for words in said if words.startswith("cancelling"))
            return f"cancelled {len(said) - running} task(s) before they ran; cancelling {running} running"
        self._cancel_requested.add(job_id)
        if job.status in (JobStatus.WAITING, JobStatus.QUEUED):
            try:
                self.committer.finish(job_id, {
                    "status": JobStatus.CANCELLED.value, "error": "the job was cancelled before it ran",
                    "exit_code": None, "finished_at": self._now()})
            except StoreError:
                job = self.store.get(job_id)  # a slot took it a moment ago: cancel it on its worker
            else:
                self._cancel_requested.discard(job_id)
                return "cancelled before it ran"
        if job.status is JobStatus.RUNNING:
            handle = next((h for h in self.pool.workers() if h.name == job.worker), None)
            if handle is not None:
                try:
                    handle.transport.cancel(self.outbox.key(job))
                except (TransportError, ProtocolMismatch):
                    pass  # not there yet: the worker keeps the cancel, and the start ends as cancelled
            return f"cancelling it on worker {job.worker}"
        return f"it is {job.status.value}"

    # --- one slot per worker -------------------------------------------------------------------

    def _slot(self, worker: WorkerHandle) -> None:
        while True:
            try:
                self._work(worker)
                return
            except Exception as exc:  # noqa: BLE001 - a slot that dies silently would strand its worker
                try:
                    if not self._repair(worker, exc):
                        return
                except Exception:  # the store itself failed, most likely: only a restart can help now
                    log.exception("slot %s: its repair failed; the daemon must be restarted", worker.name)
                    self.repairs.gave_up(worker.name)
                    return

    def _work(self, worker: WorkerHandle) -> None:
        """Finish the jobs this worker already runs (at start), then serve it until the slot ends."""
        for job in self.store.with_status(JobStatus.RUNNING):
            if job.worker == worker.name:
                health = self._ensure(worker)
                if health is None:
                    break
                log.info("job %s: re-attaching to worker %s", job.id, worker.name)
                try:
                    self._follow(worker, job, health)
                finally:
                    self._ended(worker, job)
        while True:
            self._serve(worker)
            if self._leave(worker):
                return

    # --- repairing a slot that failed ----------------------------------------------------------

    def _repair(self, worker: WorkerHandle, exc: Exception) -> bool:
        """The slot's loop raised. Have the pool put a new worker in its place (the old one may still run the
        job, or be what failed), give back the job it held, and wait out a back-off before serving again. A
        replacement that fails is tried again after the next, longer back-off. True when the slot is to
        serve again; False when it ends: the daemon stops, the worker left the pool, or the slot failed
        workers.repair_max_failures times in a row without completing a job, and is then reported broken
        (trouble() says so, the watchdog is no longer fed, and systemd restarts the daemon)."""
        name = worker.name
        failed: Exception | None = exc
        said = ""
        while failed is not None:
            reason = _words(failed)
            # the traceback once, and only of an unexpected error: a DropqError's message is meant for a person
            trace = failed if reason != said and not isinstance(failed, DropqError) else None
            said = reason
            if self._stopping or not self._listed(worker):  # nothing to repair: the slot ends
                log.error("slot %s failed as %s: %s", name, "the daemon stops" if self._stopping else
                          "its worker left the pool", reason, exc_info=trace)
                self._give_back(worker, reason)
                return not self._leave(worker)
            verdict = self.repairs.failed(name)
            failures = verdict.failures
            log.error("slot %s failed (%d in a row): %s", name, failures, reason, exc_info=trace)
            if verdict.delay is None:
                self._give_back(worker, reason)
                self.store.set_worker(name, WorkerState.BROKEN, detail=(
                    f"failed {failures} time(s) in a row, last: {reason}; the daemon must be restarted"))
                log.error("slot %s: giving up after %d failures in a row; only a restart of the daemon can "
                          "repair it", name, failures)
                return False
            try:
                self.pool.replace(name)
                failed = None
            except Exception as again:  # noqa: BLE001 - counted as the next failure, after the back-off
                failed = again
            self._give_back(worker, reason)  # after the replacement: the old worker no longer runs the job
            delay = verdict.delay
            at = time.strftime("%H:%M:%S", time.localtime(self._now() + delay))
            what = "replaced its worker" if failed is None else f"could not replace its worker ({_words(failed)})"
            self.store.set_worker(name, WorkerState.REPAIRING, detail=(
                f"failed {failures} time(s) in a row ({reason}); {what}; next attempt at {at}"))
            log.warning("slot %s: %s; next attempt in %gs", name, what, delay)
            with self.repairs.waiting(name):
                if not self._pause(delay):
                    return False
        log.info("slot %s: repaired; serving again", name)
        return True

    def _give_back(self, worker: WorkerHandle, reason: str) -> None:
        """The job a failed slot held goes back to the queue through the retry rules: the attempt counts,
        since the job may be what failed the slot, and must not do so forever. Only a job still running on
        this worker: one whose outcome is recorded (committing) is the committer's, and never runs again."""
        for job in self.store.with_status(JobStatus.RUNNING):
            if job.worker != worker.name:
                continue
            if self._stopping and self.pool.keeps_running(worker.name):
                log.info("job %s: left running on worker %s for the next start", job.id, worker.name)
                continue
            key = self.outbox.key(job)
            try:
                remove_tree(worker.inputs_dir / key)
                worker.staging(key).remove()
            except OSError as exc:  # keys are per attempt: what is left in the way of no other attempt
                log.warning("job %s: could not remove its staged files on worker %s: %s", job.id, worker.name, exc)
            if job.id in self._cancel_requested:
                self._cancel_requested.discard(job.id)
                self.committer.finish(job.id, {"status": JobStatus.CANCELLED.value, "error": "the job was cancelled",
                                               "exit_code": None, "finished_at": self._now()})
                self._release(job.id)
                continue
            self._retry_or_fail(job, f"the slot of worker {worker.name} failed: {reason}")
            self._release(job.id)

    def _pause(self, seconds: float) -> bool:
        """Wait `seconds`, or less if the daemon stops (then False)."""
        deadline = time.monotonic() + seconds
        with self._cond:
            while not self._stopping and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)
            return not self._stopping

    def _ensure(self, worker: WorkerHandle) -> Incarnation | None:
        """The worker once it answers (None when stopping). A worker of another protocol version is
        recorded as broken, with the mismatch as the reason, and asked again whenever the pool changes
        (it may have been replaced by one of this version) or a job arrives."""
        said = None
        while not self._stopping:
            try:
                return self.pool.ensure(worker.name)
            except ProtocolMismatch as exc:
                if str(exc) != said:  # once, not at every wake-up
                    said = str(exc)
                    log.error("%s", exc)
                    self.store.set_worker(worker.name, WorkerState.BROKEN, detail=said)
                with self._cond:
                    if not self._stopping:
                        self._cond.wait()
        return None

    def _serve(self, worker: WorkerHandle) -> None:
        """Run jobs on `worker` until the daemon stops or the worker leaves the pool."""
        health: Incarnation | None = None
        while not self._stopping:
            if health is None:  # at start, and after anything went wrong with this worker
                health = self._ensure(worker)
                if health is None:
                    return
            ready = self._next(worker, detail=self.pool.detail(worker.name, health))
            if ready is None:
                return
            try:
                completed = self._run(worker, ready, health)
            finally:
                self._ended(worker, ready)
            if completed:
                self.repairs.completed(worker.name)
            else:
                health = None

    def _listed(self, worker: WorkerHandle) -> bool:
        return any(h.name == worker.name for h in self.pool.workers())

    def _leave(self, worker: WorkerHandle) -> bool:
        """Whether the slot ends: the daemon stops, or its worker left the pool (a compose scale-down), which
        then leaves the store's list too, so that the CLI, the dashboard and /metrics stop counting it. False
        if the worker is back meanwhile: the pool's change notice found this slot still alive, so it must go on."""
        with self._cond:
            if self._stopping:
                return True
            if self._listed(worker):
                return False
            # under the lock _pool_changed takes: a worker that comes back from now on gets a new slot
            if self._threads.get(worker.name) is threading.current_thread():
                del self._threads[worker.name]
            self.store.forget_workers({h.name for h in self.pool.workers()})
        log.info("worker %s: left the pool", worker.name)
        return True

    def _next(self, worker: WorkerHandle, *, detail: str) -> JobRecord | None:
        idle = False
        with self._cond:
            # woken by the pool's change notice when the worker left it: it must not take another job
            while not self._stopping and self._listed(worker):
                # also marks the worker busy; the capacity's rule picks among the first ready jobs
                job = self.store.take_next(worker.name, detail=detail, choose=self.capacity.choose,
                                           window=BACKFILL_WINDOW + 1)
                if job is not None:
                    self._reserve(job)  # still under self._cond: no other slot counts this room
                    return job
                if not idle:  # written only when the slot is about to sleep: one write less per job
                    self.store.set_worker(worker.name, WorkerState.IDLE, detail=detail)
                    idle = True
                due = self.store.next_due()
                self._cond.wait(None if due is None else max(0.0, due - self._now()))
        return None

    def _run(self, worker: WorkerHandle, job: JobRecord, health: Incarnation) -> bool:
        """Run one job on `worker`; False if the worker misbehaved (it is then checked before reuse)."""
        key = self.outbox.key(job)
        assert job.manifest is not None
        manifest = Manifest.from_json(job.manifest)
        log.info("job %s: attempt %d on worker %s", job.id, job.attempts, worker.name)
        try:
            if manifest.inputs:
                self._stage_inputs(worker, job, manifest)
            # the worker is idle: its limits are set for this job (or back to its standing ones)
            rlimit = self.pool.apply_limits(worker.name, memory=manifest.memory, cpus=manifest.cpus)
            self._say_unenforced(manifest)
            spec = JobSpec(
                key=key, job_id=job.id, program=manifest.program, args=tuple(manifest.args),
                inputs=tuple(f"{key}/{rel}" for rel in manifest.inputs), env=dict(manifest.env),
                timeout=manifest.timeout, kill_grace=self.config.jobs.kill_grace,
                max_output_bytes=self.config.jobs.max_output_bytes, environment=job.env,
                memory=manifest.memory, memory_rlimit=rlimit, fresh_interpreter=manifest.fresh_interpreter,
            )
            # started and waited for in one request; a cancel that overtakes it is kept by the worker
            status: Report | None = worker.transport.start(spec, wait=POLL_WAIT)
        except ProtocolMismatch as exc:
            # refused before it started: not the job's fault, so this attempt does not count; the slot
            # checks the worker again, and reports it broken with the reason
            log.error("job %s: %s", job.id, exc)
            remove_tree(worker.inputs_dir / key)
            self.store.transition(job.id, JobStatus.QUEUED, attempts=max(0, job.attempts - 1), worker=None)
            self.notify()
            return False
        except (JobRefused, WorkerBusy, PoolError) as exc:  # PoolError: its limits could not be set
            self._lost(worker, job, str(exc))
            return False
        except TransportError as exc:
            # the job may have started before the connection failed: the worker, if still the same,
            # tells (the long-poll below finds it, or answers that it never came)
            if not self._still_there(worker, job, health, exc):
                return False
            status = None
        return self._follow(worker, job, health, status)

    def _say_unenforced(self, manifest: Manifest) -> None:
        """Once per daemon and key: a job asks for what this pool does not enforce (it still counts against
        workers.capacity), so that an operator is not left to believe it is a limit."""
        for key, value in (("memory", manifest.memory), ("cpus", manifest.cpus)):
            if value is not None and key not in self.pool.enforces and key not in self._unenforced_said:
                self._unenforced_said.add(key)
                log.warning("the %s pool does not enforce a job's `%s:`; it only counts against workers.capacity "
                            "(README: Per-job resources)", self.pool.kind, key)

    def _ended(self, worker: WorkerHandle, job: JobRecord) -> None:
        """After a job left the slot's hands: its room is freed and its worker's own limits lifted, unless the
        job still runs there (left running for the next start of the daemon)."""
        now = self.store.find(job.id)
        if now is not None and now.status is JobStatus.RUNNING and now.worker == worker.name:
            return
        manifest = Manifest.from_json(job.manifest) if job.manifest else None
        if manifest is not None and (manifest.memory is not None or manifest.cpus is not None):
            try:
                self.pool.lift_limits(worker.name)
            except PoolError as exc:  # the next job's apply_limits sets them again; until then the worker is idle
                log.warning("%s", exc)
        self._release(job.id)

    def _still_there(self, worker: WorkerHandle, job: JobRecord, health: Incarnation,
                     exc: TransportError) -> bool:
        """After a failed request: whether the same worker process answers again (else the job is lost)."""
        if self._stopping:
            self._lost(worker, job, "the daemon is shutting down")
            return False
        try:
            again = self.pool.ensure(worker.name)
        except ProtocolMismatch:
            again = None  # replaced by a worker of another version: not the one running the job
        if again is None or again.id != health.id:
            self._lost(worker, job, f"worker {worker.name} stopped answering ({exc})")
            return False
        return True

    def _follow(self, worker: WorkerHandle, job: JobRecord, health: Incarnation,
                status: Report | None = None) -> bool:
        """Long-poll the worker until the job ends (unless `status` says it has), then commit it."""
        key = self.outbox.key(job)
        while status is None or not status.done:
            try:
                status = worker.transport.status(key, wait=POLL_WAIT)
            except (UnknownJob, ProtocolMismatch) as exc:  # a mismatch: replaced by a worker of another version
                self._lost(worker, job, str(exc))
                return False
            except TransportError as exc:
                if not self._still_there(worker, job, health, exc):
                    return False
                status = None
        if status.outcome is Outcome.STOPPED:
            if not self._stopping:
                # let the pool learn from the engine why (restarted, or taken out of the pool on purpose)
                # before deciding whether the attempt counts; bounded, as a worker that neither comes back nor
                # leaves must not hold the job
                self.pool.ensure(worker.name, timeout=SETTLE_WAIT)
            self._lost(worker, job, "the worker was stopped")
            return False
        self._commit(worker, job, status)
        return True

    def _commit(self, worker: WorkerHandle, job: JobRecord, status: Report) -> None:
        manifest = Manifest.from_json(job.manifest) if job.manifest else None
        key = self.outbox.key(job)
        # the cause of a failure is most often the program's last words: keep them in the error
        outcome = outcome_of(status, manifest, last_words=last_line(worker.staging(key).stderr))
        if job.env is not None:
            # what the program ran with, for result.yaml: the versions are fixed for the environment's life
            record = self.store.env(job.env)
            outcome["environment"] = {"id": job.env, "packages": record.packages if record else None}
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
            try:
                self.committer.finish(job.id, outcome, staging=worker.staging(key), inputs=worker.inputs_dir / key)
            except sqlite3.OperationalError as exc:
                if "full" not in str(exc):
                    raise
                # The disk is full, most likely with what this job wrote (its staging shares the disk with the
                # database): its output goes, so that its outcome can be recorded at all, and the error says so.
                worker.staging(key).remove()
                error = "the job filled the disk: its output was removed so that its result could be recorded"
                outcome.update(status=JobStatus.FAILED.value, error=f"{outcome['error']}; {error}"
                               if outcome.get("error") else error)
                log.warning("job %s: %s", job.id, error)
                self.committer.finish(job.id, outcome, staging=worker.staging(key), inputs=worker.inputs_dir / key)
        except StoreError:
            log.exception("job %s: could not record its outcome", job.id)
            return
        if outcome.get("error"):  # a success needs no line of its own: the outbox logs the publish
            log.info("job %s: %s: %s", job.id, outcome["status"], outcome["error"])

    # --- losing a worker -----------------------------------------------------------------------

    def _lost(self, worker: WorkerHandle, job: JobRecord, reason: str) -> None:
        key = self.outbox.key(job)
        if self._stopping and self.pool.keeps_running(worker.name):
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
        job = self.store.get(job.id)
        if self.pool.left_on_purpose(worker.name):
            # scaled away or stopped by its operator (the engine said so; nothing a job does causes that): not
            # the job's fault, so this attempt does not count, and it runs again at once on another worker
            self.store.transition(job.id, JobStatus.QUEUED, attempts=max(0, job.attempts - 1), worker=None)
            log.info("job %s: its worker left the pool (%s); queued again", job.id, reason)
            self.notify()
            return
        self._retry_or_fail(job, reason)

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
        self.committer.finish(job.id, {
            "status": JobStatus.FAILED.value, "error": error, "exit_code": None, "finished_at": self._now()})

    def _stage_inputs(self, worker: WorkerHandle, job: JobRecord, manifest: Manifest) -> None:
        """Give the worker its own read-only view of the job's inputs (hard links, or copies)."""
        target = worker.inputs_dir / self.outbox.key(job)
        remove_tree(target)
        target.mkdir(parents=True, exist_ok=True)
        for rel in manifest.inputs:
            src = self.config.spool / job.spool_id / "inputs" / rel  # a task reads its array's inputs
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


def outcome_of(status: Report, manifest: Manifest | None, *, last_words: str | None = None) -> dict[str, Any]:
    """Turn a worker's report into the outcome recorded in the store and written to result.yaml.

    `last_words` (the last line of the program's stderr) ends the error of a program that exited
    non-zero or was killed by a signal, when the worker gave no reason of its own.
    """
    kind = status.outcome
    code = status.exit_code
    sig = status.signal
    error = status.error
    if kind is Outcome.EXITED and code == 0:
        final = JobStatus.SUCCEEDED
    elif kind is Outcome.TIMED_OUT:
        final = JobStatus.TIMED_OUT
        limit = manifest.timeout if manifest else None
        cause = f" ({error})" if error else ""
        error = f"the program ran longer than its timeout of {limit:g} seconds and was stopped{cause}"
    elif kind is Outcome.CANCELLED:
        final, error = JobStatus.CANCELLED, "the job was cancelled"
    elif kind is Outcome.OOM:
        final = JobStatus.FAILED  # the worker's error names the memory limit
    else:
        final = JobStatus.FAILED
        said = f": {last_words}" if last_words else ""
        if kind is Outcome.EXITED and sig:
            error = error or f"the program was killed by signal {_signal_name(sig)}{said}"
        elif kind is Outcome.EXITED and error:
            error = f"the program exited with code {code}: {error}"
        elif kind is Outcome.EXITED:
            error = f"the program exited with code {code}{said}"
    kept = {"exit_code": code, "signal": sig, "started_at": status.started_at, "finished_at": status.finished_at,
            "stdout_truncated": status.stdout_truncated, "stderr_truncated": status.stderr_truncated}
    outcome: dict[str, Any] = {k: v for k, v in kept.items() if v is not None}
    outcome.update(status=final.value, error=error, exit_code=code)
    if status.warm:
        outcome["warm"] = True
    if manifest and manifest.output:
        outcome["stdout_as"] = manifest.output
    return outcome


def _words(exc: BaseException) -> str:
    """An unexpected error in a line: its type (which says most) and its message."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)
