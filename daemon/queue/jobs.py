"""Job states, and the only place that says which transitions between them are allowed."""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    #: claimed from the inbox; waiting for the input files it names to arrive
    WAITING = "waiting"
    #: ready to run; the balancer gives it to the next idle worker
    QUEUED = "queued"
    #: handed to a worker, which runs (or ran) its program
    RUNNING = "running"
    #: the outcome is known and recorded; its outbox folder is being written
    COMMITTING = "committing"
    #: the program exited 0
    SUCCEEDED = "succeeded"
    #: the program exited non-zero, was killed, or its workers kept dying
    FAILED = "failed"
    #: the program ran past its timeout and was killed
    TIMED_OUT = "timed_out"
    #: cancelled by a person before it finished
    CANCELLED = "cancelled"
    #: the manifest could not be run (bad YAML, unknown key, missing program or input, unsafe path)
    REJECTED = "rejected"

    @property
    def is_final(self) -> bool:
        return self in FINAL


FINAL = frozenset(
    {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.TIMED_OUT, JobStatus.CANCELLED, JobStatus.REJECTED}
)

#: Every transition the store performs is checked against this table.
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.WAITING: frozenset({JobStatus.QUEUED, JobStatus.COMMITTING}),
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.COMMITTING}),
    # RUNNING -> QUEUED: the worker was lost (a retry) or the daemon shut down mid-job.
    JobStatus.RUNNING: frozenset({JobStatus.QUEUED, JobStatus.COMMITTING}),
    JobStatus.COMMITTING: FINAL,
}


def sources_of(target: JobStatus) -> tuple[JobStatus, ...]:
    """The states a job may be in for a transition into `target` to be allowed."""
    return tuple(src for src, dests in TRANSITIONS.items() if target in dests)
