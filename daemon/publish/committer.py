"""The one path by which a finished job reaches the outbox, whatever ended it: a result from a worker, a
rejection by the intake, a cancel before it ran, a job given up after its worker was lost.

`Committer.finish` records the job's outcome (the job is committing from that instant, so a restart
finishes the commit if this run cannot) and queues it; the committer's thread then publishes it with
`Outbox.finish`. Publishing (moves, fsyncs) is thus off the threads that claim and dispatch: a worker
starts its next job, and the intake claims the next manifest, as soon as the outcome is recorded.

A publish that fails leaves its job committing and makes the daemon unhealthy (`trouble`): the systemd
watchdog is no longer fed, and the restart retries the commit (or, if the workspace cannot take renames,
refuses to start, saying why). That holds for every kind of finished job, as they share this path.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dropq.errors import StoreError
from dropq.intake.manifest import Manifest
from dropq.paths import remove_tree
from dropq.publish.outbox import Outbox
from dropq.queue.jobs import JobStatus
from dropq.queue.store import JobRecord
from dropq_worker.protocol import Staging

log = logging.getLogger("dropq.outbox")


@dataclass(frozen=True)
class _Commit:
    job: JobRecord
    #: where the worker left the job's output (None: it never ran)
    staging: Staging | None
    #: the worker's view of the job's inputs, removed once the job is published
    inputs: Path | None


#: the statuses of a task that count against its array's max_failures
_FAILED_STATES = (JobStatus.FAILED, JobStatus.TIMED_OUT, JobStatus.REJECTED)
_FAILURES = frozenset(state.value for state in _FAILED_STATES)


class Committer:
    def __init__(self, *, outbox: Outbox, now: Callable[[], float] = time.time) -> None:
        self.outbox = outbox
        self._now = now
        self.store = outbox.store
        self._queue: queue.SimpleQueue[_Commit | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._failed: str | None = None
        #: each running array's max_failures, by id (read from its manifest once)
        self._max_failures: dict[str, int | None] = {}
        #: guards _max_failures: failures are counted on the slots' threads too
        self._lock = threading.Lock()

    def finish(self, job_id: str, outcome: dict[str, Any], *, staging: Staging | None = None,
               inputs: Path | None = None) -> JobRecord:
        """Record that the job ended with `outcome` (its "status" one of the final JobStatus values), then
        queue it for publishing. Raises StoreError when the job cannot end from where it is (it ended, or
        a worker took it, a moment ago)."""
        # error and finished_at as publishing will record them: the committing job already shows them
        job = self.store.transition(job_id, JobStatus.COMMITTING, outcome=outcome, error=outcome.get("error"),
                                    finished_at=outcome.get("finished_at"))
        self._queue.put(_Commit(job, staging, inputs))
        if job.parent is not None and outcome.get("status") in _FAILURES:
            # at once, on the thread of the slot that ran it, before that slot takes its next job: a task that
            # fails in milliseconds (a forked interpreter) must not let the array's next tasks start while its
            # commit waits on the committer's thread
            self._stop_after_failures(job.parent)
        return job

    def settle_arrays(self) -> None:
        """At start: arrays whose last tasks ended before a crash, or whose max_failures was reached, are taken
        on from where they were (their publish queued for the committer's thread)."""
        for array in self.store.arrays_running():
            self.array_step(array.id)

    def array_step(self, array_id: str) -> None:
        """After one of its tasks was committed: cancel the array's tasks not yet started once max_failures
        have failed, and, when every task has ended, finish the array itself (published by one rename). Runs
        on the committer's thread (or at start, before it), so two tasks ending together finish it once."""
        array = self.store.find(array_id)
        if array is None or array.status is not JobStatus.RUNNING or array.tasks is None or not array.manifest:
            return
        limit = self._stop_after_failures(array_id, array)
        if self.store.open_tasks(array_id):
            return
        with self._lock:
            self._max_failures.pop(array_id, None)
        self.finish(array_id, array_outcome(array, self.store.task_counts(array_id), limit=limit, now=self._now()))

    def _stop_after_failures(self, array_id: str, array: JobRecord | None = None) -> int | None:
        """Cancel the array's tasks not yet started once max_failures of them have failed (counting those whose
        failure is recorded and not yet committed); returns the array's max_failures."""
        array = array or self.store.find(array_id)
        if array is None or array.status is not JobStatus.RUNNING or not array.manifest:
            return None
        with self._lock:
            if array_id not in self._max_failures:  # read once: an array over 10,000 files has a long manifest
                self._max_failures[array_id] = Manifest.from_json(array.manifest).max_failures
            limit = self._max_failures[array_id]
        if limit is None:
            return None
        counts = self.store.task_counts(array_id)
        failed = sum(counts.get(s.value, 0) for s in _FAILED_STATES)
        failed += sum(1 for task in self.store.tasks_of(array_id, statuses=(JobStatus.COMMITTING,))
                      if (task.outcome or {}).get("status") in _FAILURES)
        if failed >= limit:
            reason = (f"the task was cancelled before it ran: {failed} task(s) of the array had failed "
                      f"(max_failures: {limit})")
            for task in self.store.tasks_of(array_id, statuses=(JobStatus.QUEUED, JobStatus.WAITING)):
                try:
                    self.finish(task.id, {"status": JobStatus.CANCELLED.value, "error": reason, "exit_code": None,
                                          "finished_at": self._now()})
                except StoreError:
                    continue  # a worker took it a moment ago: it runs to its end
        return limit

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="committer", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Publish every job finished so far, then stop. Called after the intake and the balancer's slots
        have stopped, so that no outcome they recorded is left for the next start."""
        self._stopping = True
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout)
            self._thread = None

    def run_pending(self) -> None:
        """Publish what is queued, on the caller's thread: drives the committer without its thread
        (unit tests)."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                self._publish(item)

    def trouble(self) -> str | None:
        """Why the daemon cannot go on by itself (and should be restarted), or None."""
        if self._thread is not None and not self._thread.is_alive() and not self._stopping:
            return "the committer thread ended"
        return self._failed

    def _loop(self) -> None:
        while (item := self._queue.get()) is not None:
            self._publish(item)

    def _publish(self, item: _Commit) -> None:
        job = item.job
        try:
            if item.inputs is not None:
                # no DELETE to make the worker forget the job: keys are per attempt, and the worker keeps
                # only its last 64 results anyway; one request less per job. Removed before publishing: the
                # job has ended, and its staged hard links would otherwise make each input look shared with
                # a file elsewhere, which the outbox never gives to the job's owner (owners.Ownership.give)
                remove_tree(item.inputs)
            self.outbox.finish(job, staging=item.staging)
            if job.parent is not None:
                self.array_step(job.parent)
        except Exception as exc:  # the job stays committing; the next start publishes it
            log.exception("job %s: publishing failed; it will be retried at the next start", job.id)
            self._failed = f"publishing job {job.id} failed ({exc}); a restart retries it"


def array_outcome(array: JobRecord, counts: dict[str, int], *, limit: int | None, now: float) -> dict[str, Any]:
    """An array's outcome once every task has ended: succeeded when all did; failed when any failed (or timed
    out); else cancelled."""
    total = array.tasks or 0
    succeeded = counts.get(JobStatus.SUCCEEDED.value, 0)
    failed = sum(counts.get(s.value, 0) for s in (JobStatus.FAILED, JobStatus.TIMED_OUT, JobStatus.REJECTED))
    cancelled = counts.get(JobStatus.CANCELLED.value, 0)
    if succeeded == total:
        status, error = JobStatus.SUCCEEDED, None
    elif failed:
        status = JobStatus.FAILED
        error = f"{failed} of {total} task(s) failed"
        if cancelled:
            error += f"; {cancelled} cancelled" + (f" (max_failures: {limit})" if limit is not None else "")
    else:
        status, error = JobStatus.CANCELLED, f"the array was cancelled: {cancelled} of {total} task(s) did not finish"
    return {"status": status.value, "error": error, "exit_code": None, "started_at": array.started_at,
            "finished_at": now, "task_counts": counts}
