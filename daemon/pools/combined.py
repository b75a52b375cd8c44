"""Several pools serving one daemon: this host's own workers and the agents' (README: More than one host).

The balancer sees one pool: the workers of all, each request passed to the pool its worker belongs to.
Worker names never collide: local workers are w<N> (containers dropq-w<N>), an agent's are <agent>-w<N>.
"""

from __future__ import annotations

from collections.abc import Callable

from dropq.config import Config
from dropq.envs.install import IndexSettings, Installer
from dropq.pools.base import Incarnation, Pool, WorkerHandle


class CombinedPool(Pool):
    def __init__(self, config: Config, pools: list[Pool]) -> None:
        super().__init__()
        self.config = config
        self.pools = pools
        self.kind = "+".join(p.kind for p in pools)
        #: what this host's pool enforces of a job's resources (an agent's pool enforces its own)
        self.enforces = pools[0].enforces

    def on_change(self, callback: Callable[[], None]) -> None:
        super().on_change(callback)
        for pool in self.pools:
            pool.on_change(callback)

    def _of(self, name: str) -> Pool:
        for pool in self.pools:
            if any(h.name == name for h in pool.workers()):
                return pool
        return self.pools[-1]  # a worker that left (an agent that registered with fewer): asked of the agents

    def start(self) -> None:
        for pool in self.pools:
            pool.start()

    def stop(self) -> None:
        for pool in self.pools:
            pool.stop()

    def workers(self) -> list[WorkerHandle]:
        return [h for pool in self.pools for h in pool.workers()]

    def ensure(self, name: str, *, timeout: float | None = None) -> Incarnation | None:
        return self._of(name).ensure(name, timeout=timeout)

    def replace(self, name: str) -> None:
        self._of(name).replace(name)

    def keeps_running(self, name: str) -> bool:
        return self._of(name).keeps_running(name)

    def left_on_purpose(self, name: str) -> bool:
        return self._of(name).left_on_purpose(name)

    def detail(self, name: str, health: Incarnation) -> str:
        return self._of(name).detail(name, health)

    def describe(self) -> str:
        return " + ".join(p.describe() for p in self.pools)

    def apply_limits(self, name: str, *, memory: int | None, cpus: float | None) -> int | None:
        return self._of(name).apply_limits(name, memory=memory, cpus=cpus)

    def lift_limits(self, name: str) -> None:
        self._of(name).lift_limits(name)

    def env_installer(self, index: IndexSettings) -> Installer | None:
        return self.pools[0].env_installer(index)
