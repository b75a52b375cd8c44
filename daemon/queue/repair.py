"""The rules for repairing balancer slots: how long a failed slot waits before it serves again, and when
the daemon stops trying and asks to be restarted.

A slot that fails waits 1 s, then 2, 4 ... up to 60 s with each further failure in a row; a job it
completes ends the run. After workers.repair_max_failures failures in a row the slot is broken: the
daemon reports it (trouble()), stops feeding the systemd watchdog, and systemd restarts it. What a repair
does (replace the worker, give its job back) is the balancer's; this module only keeps the count.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

#: seconds a slot waits after its first failure; doubled at each failure in a row, up to REPAIR_MAX_DELAY
REPAIR_DELAY = 1.0
REPAIR_MAX_DELAY = 60.0


def repair_delay(failures: int) -> float:
    """The back-off before a slot that failed `failures` times in a row serves again: 1, 2, 4 ... 60 s."""
    return min(REPAIR_MAX_DELAY, REPAIR_DELAY * 2 ** max(0, failures - 1))


@dataclass(frozen=True)
class Verdict:
    """What to do about one failure of a slot."""

    #: failures in a row, this one included
    failures: int
    #: seconds to wait before the slot serves again; None when it is not repaired any more (broken)
    delay: float | None


class Repairs:
    """Each slot's failures in a row, and which slots wait for a repair or are broken. Slot threads
    write it; the daemon's heartbeat reads it."""

    def __init__(self, *, max_failures: int) -> None:
        self.max_failures = max_failures
        self._lock = threading.Lock()
        self._failures: dict[str, int] = {}
        self._waiting: set[str] = set()
        self._broken: set[str] = set()

    def failed(self, name: str) -> Verdict:
        """Count a failure of slot `name` (of the slot's loop, or of a repair): how long it waits, or that
        it is broken from now on."""
        with self._lock:
            failures = self._failures[name] = self._failures.get(name, 0) + 1
            if failures >= self.max_failures:
                self._broken.add(name)
                return Verdict(failures=failures, delay=None)
            return Verdict(failures=failures, delay=repair_delay(failures))

    def gave_up(self, name: str) -> None:
        """Slot `name` ended without the count saying so (its repair itself failed): only a restart helps."""
        with self._lock:
            self._broken.add(name)

    @contextmanager
    def waiting(self, name: str) -> Iterator[None]:
        """While slot `name` waits for its next attempt (the daemon is degraded meanwhile)."""
        with self._lock:
            self._waiting.add(name)
        try:
            yield
        finally:
            with self._lock:
                self._waiting.discard(name)

    def completed(self, name: str) -> None:
        """Slot `name` completed a job: it works, and a later failure starts the back-off anew."""
        with self._lock:
            self._failures.pop(name, None)
            self._broken.discard(name)

    def trouble(self) -> str | None:
        """Why the daemon must be restarted, or None: slots no longer repaired."""
        with self._lock:
            if not self._broken:
                return None
            names = ", ".join(sorted(self._broken))
        # how often, and why, is in `dropq workers` and the log
        return f"the slot of worker(s) {names} failed and could not be repaired"

    def degraded(self) -> str | None:
        """What is being repaired (the daemon works on, with fewer workers meanwhile), or None."""
        with self._lock:
            if not self._waiting:
                return None
            names = ", ".join(sorted(self._waiting))
        return f"repairing the slot of worker(s) {names}"
