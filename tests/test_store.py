"""Unit tests of the SQLite job store: ordering, transitions, retries' due times, durability."""

from __future__ import annotations

from pathlib import Path

import pytest

from dropq.errors import StoreError
from dropq.queue.jobs import FINAL, TRANSITIONS, JobStatus
from dropq.queue.store import Store


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path: Path, clock: Clock) -> Store:
    s = Store(tmp_path / "db.sqlite3", now=clock)
    yield s
    s.close()


def queue(store: Store, job_id: str, priority: int = 0) -> None:
    store.add(job_id, source=f"{job_id}.yaml")
    store.set_manifest(job_id, "{}", priority=priority, retries=1, deadline=None)
    store.transition(job_id, JobStatus.QUEUED)


def test_highest_priority_first_then_fifo(store: Store) -> None:
    for job_id, priority in [("a", 0), ("b", 5), ("c", 0), ("d", 5), ("e", -1)]:
        queue(store, job_id, priority)
    taken = []
    while (job := store.take_next("w1")) is not None:
        taken.append(job.id)
    assert taken == ["b", "d", "a", "c", "e"]


def test_take_marks_running_with_worker_and_attempt(store: Store, clock: Clock) -> None:
    queue(store, "a")
    job = store.take_next("w7")
    assert job is not None
    assert (job.status, job.worker, job.attempts, job.started_at) == (JobStatus.RUNNING, "w7", 1, clock.t)
    assert store.take_next("w8") is None, "a running job is not given out twice"


def test_a_retry_waits_for_its_backoff(store: Store, clock: Clock) -> None:
    queue(store, "a")
    store.take_next("w1")
    store.transition("a", JobStatus.QUEUED, not_before=clock.t + 5, worker=None)
    assert store.take_next("w1") is None
    assert store.next_due() == clock.t + 5
    clock.t += 5
    job = store.take_next("w1")
    assert job is not None and job.attempts == 2


def test_transitions_outside_the_table_are_refused(store: Store) -> None:
    store.add("a", source="a.yaml")
    with pytest.raises(StoreError, match="cannot go from waiting to running"):
        store.transition("a", JobStatus.RUNNING)
    with pytest.raises(StoreError, match="cannot go from waiting to succeeded"):
        store.transition("a", JobStatus.SUCCEEDED)
    with pytest.raises(StoreError, match="missing"):
        store.transition("nope", JobStatus.QUEUED)


def test_every_final_state_is_reached_only_through_committing() -> None:
    for source, targets in TRANSITIONS.items():
        if source is not JobStatus.COMMITTING:
            assert not (targets & FINAL), source
    assert all(not TRANSITIONS.get(s) for s in FINAL), "a final state is final"


def test_outcome_round_trips_as_json(store: Store) -> None:
    queue(store, "a")
    store.take_next("w1")
    job = store.transition("a", JobStatus.COMMITTING, outcome={"status": "succeeded", "exit_code": 0})
    assert job.outcome == {"status": "succeeded", "exit_code": 0}


def test_state_survives_reopening(tmp_path: Path, clock: Clock) -> None:
    path = tmp_path / "db.sqlite3"
    first = Store(path, now=clock)
    queue(first, "a", priority=3)
    first.close()
    second = Store(path, now=clock)
    job = second.get("a")
    assert (job.status, job.priority) == (JobStatus.QUEUED, 3)
    reader = Store(path, readonly=True)
    assert reader.counts() == {"queued": 1}
    reader.close()
    second.close()


def test_a_readonly_store_on_a_missing_database_says_so(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="has the daemon ever run"):
        Store(tmp_path / "none.sqlite3", readonly=True)


def test_by_source_finds_the_newest_job_after_a_mark(store: Store) -> None:
    store.add("x", source="x.yaml")
    mark = store.last_seq()
    assert store.by_source("x.yaml", after_seq=mark) is None
    store.add("x-2", source="x.yaml")
    found = store.by_source("x.yaml", after_seq=mark)
    assert found is not None and found.id == "x-2"
