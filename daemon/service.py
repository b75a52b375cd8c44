"""The daemon: wires config, store, pool, balancer, intake and watcher together, in the right order.

Start-up order matters: recovery runs before any thread, so that no job is claimed, dispatched or
committed twice; the pool is up before the balancer hands out jobs; the watcher starts last, after
the intake can take what it reports. Shutdown runs the other way round.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import threading
from pathlib import Path
from types import FrameType

from .balancer import Balancer
from .config import Config
from .errors import DaemonRunning, PoolError
from .intake import Intake
from .jobs import JobStatus
from .outbox import Outbox, job_key
from .pools import Pool
from .store import Store
from .watcher import InboxWatcher

log = logging.getLogger("dropq.daemon")


def make_pool(config: Config) -> Pool:
    kind = config.workers.pool
    if kind in ("docker", "auto"):
        try:
            from .pools.docker import DockerPool, docker_available
        except ImportError:
            if kind == "docker":
                raise PoolError("the docker pool is not available in this build") from None
        else:
            usable, why = docker_available(config)
            if usable and config.workers.docker.managed_by == "compose":
                from .pools.compose import ComposePool

                log.info("worker pool: docker compose workers (workers.docker.managed_by: compose)")
                return ComposePool(config)
            if usable:
                log.info("worker pool: docker (%s)", why)
                return DockerPool(config)
            if kind == "docker":
                raise PoolError(f"workers.pool is docker, but {why}")
            log.info("worker pool: local processes, because %s", why)
    from .pools.local import LocalPool

    if kind == "local":
        log.info("worker pool: local processes (workers.pool: local)")
    return LocalPool(config)


class Daemon:
    def __init__(self, config: Config, *, pool: Pool | None = None) -> None:
        self.config = config
        for folder in (config.inbox, config.outbox, config.state, config.spool, config.workers_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self._lock_fd = _lock_state(config.state)
        self.store = Store(config.database)
        self.outbox = Outbox(root=config.outbox, spool=config.spool, store=self.store)
        self.pool = pool or make_pool(config)
        self.balancer = Balancer(config=config, store=self.store, pool=self.pool, outbox=self.outbox)
        self.watcher = InboxWatcher(inbox=config.inbox, mode=config.intake.watch, on_file=self._on_file)
        self.intake = Intake(config=config, store=self.store, outbox=self.outbox,
                             notify=self.balancer.notify, being_written=self.watcher.being_written,
                             cancel=self.balancer.cancel, release_abandoned=self.watcher.release_abandoned)
        self._stop = threading.Event()

    def _on_file(self, rel: str, complete: bool) -> None:
        self.intake.offer(rel, complete)

    def recover(self) -> None:
        """Bring every job the last run left half-way to a consistent state, before any thread starts."""
        committing = self.store.with_status(JobStatus.COMMITTING)
        for job in committing:
            staging = None
            if job.worker:
                staging = self.config.workers_dir / job.worker / "jobs" / job_key(job)
            log.info("job %s: finishing the commit an earlier run began", job.id)
            self.outbox.finish(job, staging=staging)
        pending = {j.id for j in self.store.with_status(JobStatus.COMMITTING)}
        for name in self.outbox.clean_stale(keep=pending):
            log.info("removed the stale temporary folder %s from the outbox", name)
        self.intake.recover()

    def start(self) -> None:
        self.recover()
        self.pool.start()
        self.balancer.start()
        self.intake.start()
        self.watcher.start()
        self.store.set_meta("pool", self.pool.describe())
        self.store.set_meta("watcher", self.watcher.kind)
        self.store.set_meta("pid", str(os.getpid()))
        log.info("dropq is running: inbox %s, outbox %s, %d %s worker(s)", self.config.inbox,
                 self.config.outbox, len(self.pool.workers()), self.pool.describe())

    def stop(self) -> None:
        log.info("shutting down")
        self.watcher.stop()
        self.intake.stop()
        self.balancer.stop()
        # stopping the pool ends the long-polls of slots still following a job; they requeue it
        self.pool.stop()
        self.balancer.join()
        self.store.set_meta("pid", "")
        self.store.close()
        os.close(self._lock_fd)
        log.info("stopped")

    def request_stop(self) -> None:
        self._stop.set()

    def run_forever(self) -> None:
        self.start()
        try:
            self._stop.wait()
        finally:
            self.stop()


def _lock_state(state: Path) -> int:
    fd = os.open(state / "daemon.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise DaemonRunning(f"another dropq daemon is already running on {state}") from None
    return fd


def run(config: Config) -> int:
    daemon = Daemon(config)

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s", signal.Signals(signum).name)
        daemon.request_stop()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    daemon.run_forever()
    return 0
