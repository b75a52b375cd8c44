"""Per-job resources on the balancer's side: the sum of the running jobs' requests (their manifests' `memory:`
and `cpus:`) is kept within `workers.capacity`, so that one large job and many small ones share a host safely.

The rule for which queued job starts (`Capacity.choose`, given the ready jobs in queue order):
- the first job in the queue starts as soon as it fits;
- while it does not fit, a job behind it that fits may start instead ("backfill"), but only for
  `workers.capacity.starve_after` seconds counted from when the first job was first found not to fit. Past
  that no job behind it starts until it has started: the running jobs end, room is made, and it runs. So a
  large job waits at most `starve_after` seconds plus the longest running job's time, however many small
  jobs keep arriving.
A job that can never fit (asks for more than the whole capacity) is rejected at claim time.

The balancer calls `choose` and `reserve` under its one lock, in the same critical section as the store's
pick, and `release` when the job has ended: two slots never both count the same room.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from dropq.config import Config
from dropq.units import human_size, parse_size

log = logging.getLogger("dropq.capacity")

#: jobs looked at behind the first of the queue for one that fits (a bound on the work of one pick)
BACKFILL_WINDOW = 200


@dataclass(frozen=True)
class Request:
    """What a job counts as against the capacity: bytes of memory and thousandths of a CPU (whole numbers,
    so that sums of 0.1 CPUs add up exactly)."""

    memory: int
    millicpus: int

    @classmethod
    def of(cls, memory: int | None, cpus: float | None, *, default: Request) -> Request:
        return cls(memory=default.memory if memory is None else memory,
                   millicpus=default.millicpus if cpus is None else round(cpus * 1000))

    def __add__(self, other: Request) -> Request:
        return Request(self.memory + other.memory, self.millicpus + other.millicpus)

    def within(self, total: Request) -> bool:
        return self.memory <= total.memory and self.millicpus <= total.millicpus

    def __str__(self) -> str:
        return f"{human_size(self.memory)} and {self.millicpus / 1000:g} CPUs"


def host_memory(meminfo: Path = Path("/proc/meminfo")) -> int:
    """The host's memory in bytes (MemTotal)."""
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise OSError(f"{meminfo} has no MemTotal line")


class Capacity:
    """The room the running jobs take, and the rule that picks the next job (see the module's docstring)."""

    def __init__(self, *, total: Request, default: Request, starve_after: float,
                 now: Callable[[], float] = time.monotonic) -> None:
        #: what all running jobs together may ask for
        self.total = total
        #: what a job that asks for nothing counts as
        self.default = default
        self.starve_after = starve_after
        self._now = now
        self._running: dict[str, Request] = {}
        #: the first job of the queue while it does not fit, and since when
        self._blocked: tuple[str, float] | None = None

    @classmethod
    def from_config(cls, config: Config) -> Capacity:
        c = config.workers.capacity
        memory = host_memory() if c.memory is None else parse_size(c.memory)
        cpus = float(os.cpu_count() or 1) if c.cpus is None else c.cpus
        return cls(total=Request(memory, round(cpus * 1000)),
                   default=Request(c.job_memory_bytes, round(c.job_cpus * 1000)), starve_after=c.starve_after)

    def request(self, memory: int | None, cpus: float | None) -> Request:
        return Request.of(memory, cpus, default=self.default)

    def never_fits(self, memory: int | None, cpus: float | None) -> str | None:
        """Why a job asking for this can never run here (more than the whole capacity), or None."""
        asked = self.request(memory, cpus)
        if asked.memory > self.total.memory:
            return (f"the job asks for {human_size(asked.memory)} of memory, more than all jobs together may use "
                    f"({human_size(self.total.memory)}, workers.capacity.memory): it could never run")
        if asked.millicpus > self.total.millicpus:
            return (f"the job asks for {asked.millicpus / 1000:g} CPUs, more than all jobs together may use "
                    f"({self.total.millicpus / 1000:g}, workers.capacity.cpus): it could never run")
        return None

    @property
    def used(self) -> Request:
        used = Request(0, 0)
        for request in self._running.values():
            used = used + request
        return used

    def fits(self, request: Request) -> bool:
        return (self.used + request).within(self.total)

    def choose(self, ready: Iterable[tuple[str, int | None, float | None]]) -> str | None:
        """The id of the job to start now among `ready` (id, memory, cpus in queue order), or None."""
        used = self.used
        for index, (job_id, memory, cpus) in enumerate(ready):
            if index > BACKFILL_WINDOW:
                return None
            fits = (used + self.request(memory, cpus)).within(self.total)
            if index == 0:
                if fits:
                    if self._blocked is not None and self._blocked[0] == job_id:
                        self._blocked = None
                    # else a job of higher priority went ahead: the one that waits keeps its time waited
                    return job_id
                if self._blocked is None or self._blocked[0] != job_id:
                    self._blocked = (job_id, self._now())
                    log.info("job %s waits for room: it asks for %s, %s of %s are taken", job_id,
                             self.request(memory, cpus), used, self.total)
                if self._now() - self._blocked[1] >= self.starve_after:
                    return None  # it has waited long enough: nothing overtakes it any more
            elif fits:
                return job_id
        return None

    def reserve(self, job_id: str, memory: int | None, cpus: float | None) -> None:
        self._running[job_id] = self.request(memory, cpus)

    def release(self, job_id: str) -> bool:
        """The job ended (or left its worker): its room is free again. Whether it held any."""
        return self._running.pop(job_id, None) is not None

    def holds(self, job_id: str) -> bool:
        return job_id in self._running
