"""The rules of slot repair (dropq.queue.repair): the back-off, when a slot is given up, what resets it.
The repairs themselves, on real daemons and workers, are in test_slot_repair.py and test_systemd.py."""

from __future__ import annotations

from dropq.queue.repair import Repairs, Verdict, repair_delay


def test_the_back_off_doubles_from_a_second_to_a_minute() -> None:
    assert [repair_delay(n) for n in range(1, 10)] == [1, 2, 4, 8, 16, 32, 60, 60, 60]


def test_a_slot_is_broken_at_the_last_failure_allowed_and_only_that_slot() -> None:
    repairs = Repairs(max_failures=3)
    assert [repairs.failed("w1") for _ in range(2)] == [Verdict(failures=1, delay=1.0), Verdict(failures=2, delay=2.0)]
    assert repairs.failed("w2") == Verdict(failures=1, delay=1.0)
    assert repairs.trouble() is None
    assert repairs.failed("w1") == Verdict(failures=3, delay=None)
    assert repairs.trouble() == "the slot of worker(s) w1 failed and could not be repaired"


def test_a_completed_job_starts_the_count_anew_and_clears_a_broken_slot() -> None:
    repairs = Repairs(max_failures=2)
    repairs.failed("w1")
    repairs.completed("w1")
    assert repairs.failed("w1") == Verdict(failures=1, delay=1.0)
    assert repairs.failed("w1").delay is None
    repairs.completed("w1")
    assert repairs.trouble() is None


def test_one_failure_allowed_gives_up_at_once_as_before() -> None:
    repairs = Repairs(max_failures=1)
    assert repairs.failed("w1") == Verdict(failures=1, delay=None)


def test_a_slot_waiting_for_its_repair_degrades_the_daemon_only_meanwhile() -> None:
    repairs = Repairs(max_failures=5)
    assert repairs.degraded() is None
    with repairs.waiting("w2"), repairs.waiting("w1"):
        assert repairs.degraded() == "repairing the slot of worker(s) w1, w2"
    assert repairs.degraded() is None and repairs.trouble() is None


def test_a_slot_given_up_outside_the_count_is_broken() -> None:
    repairs = Repairs(max_failures=5)
    repairs.gave_up("w3")
    assert repairs.trouble() == "the slot of worker(s) w3 failed and could not be repaired"
