"""The capacity rule of per-job resources (dropq.queue.capacity), with a fake clock; and the store's pick that
offers the ready jobs to it, on a real SQLite database."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from dropq.config import Config
from dropq.queue.capacity import Capacity, Request, host_memory
from dropq.queue.store import Store

GIB = 1024**3


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


NOTHING = Request(0, 0)


def capacity(clock: Clock, *, starve_after: float = 30.0, default: Request = NOTHING) -> Capacity:
    return Capacity(total=Request(4 * GIB, 2000), default=default, starve_after=starve_after, now=clock)


def test_the_first_job_starts_when_it_fits() -> None:
    cap = capacity(Clock())
    assert cap.choose([("a", 3 * GIB, None), ("b", GIB, None)]) == "a"


def test_two_jobs_of_three_quarters_never_run_together() -> None:
    cap = capacity(Clock())
    cap.reserve("a", 3 * GIB, 1.5)
    assert cap.choose([("b", 3 * GIB, 1.5)]) is None
    assert cap.release("a")
    assert cap.choose([("b", 3 * GIB, 1.5)]) == "b"


def test_cpus_count_as_well_as_memory() -> None:
    cap = capacity(Clock())
    cap.reserve("a", None, 1.5)
    assert cap.choose([("b", None, 0.6)]) is None
    assert cap.choose([("b", None, 0.5)]) == "b"


def test_tenths_of_cpus_add_up_exactly() -> None:
    cap = Capacity(total=Request(GIB, 300), default=Request(0, 0), starve_after=0)
    for job in ("a", "b"):
        cap.reserve(job, None, 0.1)
    assert cap.choose([("c", None, 0.1)]) == "c"  # 0.1 + 0.1 + 0.1 is 0.30000000000000004 in floats


def test_small_jobs_start_behind_a_large_one_only_until_it_has_waited_starve_after() -> None:
    clock = Clock()
    cap = capacity(clock, starve_after=30)
    cap.reserve("running", 2 * GIB, None)
    queue = [("large", 3 * GIB, None), ("small", GIB, None)]
    assert cap.choose(queue) == "small"  # the large one would not fit anyway: the small one does not delay it
    cap.reserve("small", GIB, None)
    clock.t += 29
    assert cap.choose([("large", 3 * GIB, None), ("small2", GIB // 2, None)]) == "small2"
    cap.reserve("small2", GIB // 2, None)
    clock.t += 1
    assert cap.choose([("large", 3 * GIB, None), ("small3", GIB // 4, None)]) is None  # waited long enough
    cap.release("running")
    assert cap.choose([("large", 3 * GIB, None), ("small3", GIB // 4, None)]) is None  # the small ones still run
    cap.release("small")
    assert cap.choose([("large", 3 * GIB, None), ("small3", GIB // 4, None)]) == "large"


def test_the_wait_is_counted_for_the_job_at_the_head_not_for_whoever_was_there() -> None:
    clock = Clock()
    cap = capacity(clock, starve_after=10)
    cap.reserve("running", 2 * GIB, None)
    assert cap.choose([("large", 3 * GIB, None), ("small", GIB, None)]) == "small"
    clock.t += 60
    # "large" was cancelled meanwhile; "large2" is now first, and has only just been found not to fit
    assert cap.choose([("large2", 3 * GIB, None), ("small2", GIB // 2, None)]) == "small2"


def test_a_job_of_higher_priority_going_ahead_does_not_restart_the_wait() -> None:
    clock = Clock()
    cap = capacity(clock, starve_after=10)
    cap.reserve("running", 2 * GIB, None)
    assert cap.choose([("large", 3 * GIB, None), ("small", GIB // 4, None)]) == "small"
    cap.reserve("small", GIB // 4, None)
    clock.t += 5
    assert cap.choose([("urgent", GIB // 4, None), ("large", 3 * GIB, None)]) == "urgent"
    cap.reserve("urgent", GIB // 4, None)
    clock.t += 5  # "large" has now waited 10 seconds in all
    assert cap.choose([("large", 3 * GIB, None), ("small2", GIB // 4, None)]) is None


def test_starve_after_zero_keeps_the_queue_strictly_in_order() -> None:
    cap = capacity(Clock(), starve_after=0)
    cap.reserve("running", 2 * GIB, None)
    assert cap.choose([("large", 3 * GIB, None), ("small", GIB, None)]) is None


def test_a_job_without_a_request_counts_as_the_configured_default() -> None:
    cap = capacity(Clock(), default=Request(GIB, 1000))
    cap.reserve("a", None, None)
    cap.reserve("b", None, None)
    assert cap.used == Request(2 * GIB, 2000)
    assert cap.choose([("c", None, None)]) is None


def test_a_job_larger_than_the_capacity_can_never_fit() -> None:
    cap = capacity(Clock())
    assert "workers.capacity.memory" in (cap.never_fits(5 * GIB, None) or "")
    assert "workers.capacity.cpus" in (cap.never_fits(None, 2.5) or "")
    assert cap.never_fits(4 * GIB, 2.0) is None


def test_the_default_capacity_is_the_hosts(tmp_path: Path) -> None:
    config = Config.from_mapping({}, base=tmp_path)
    cap = Capacity.from_config(config)
    assert cap.total.memory == host_memory() > 0
    assert cap.total.millicpus >= 1000
    sized = Capacity.from_config(Config.from_mapping(
        {"workers": {"capacity": {"memory": "2g", "cpus": 1.5, "job_memory": "256m", "job_cpus": 0.5}}},
        base=tmp_path))
    assert (sized.total, sized.default) == (Request(2 * GIB, 1500), Request(256 * 1024**2, 500))


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "q.sqlite3")
    yield s
    s.close()


def _queue(store: Store, job_id: str, manifest: str) -> None:
    store.add(job_id, source=f"{job_id}.yaml")
    store.set_manifest(job_id, manifest, priority=0, retries=0, deadline=None)
    store.queue_job(job_id)


def test_the_store_offers_the_ready_jobs_with_their_requests_in_queue_order(store: Store) -> None:
    _queue(store, "big", '{"program": "x.py", "memory": 3221225472, "cpus": 1.5}')
    _queue(store, "plain", '{"program": "x.py"}')
    offered: list[tuple[str, int | None, float | None]] = []

    def second(ready: Iterable[tuple[str, int | None, float | None]]) -> str:
        offered.extend(ready)
        return offered[1][0]

    job = store.take_next("w1", choose=second, window=10)
    assert job is not None and job.id == "plain" and job.worker == "w1"
    assert offered == [("big", 3221225472, 1.5), ("plain", None, None)]
    assert store.take_next("w2", choose=lambda ready: None, window=10) is None
    assert store.get("big").status.value == "queued"
