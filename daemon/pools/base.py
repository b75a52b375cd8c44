"""The pool interface: a fixed set of named worker slots, each kept alive by its pool.

Every pool (local processes, docker containers, ...) passes the same contract tests
(tests/test_pool_contract.py).
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dropq.config import Config
from dropq.envs.install import IndexSettings, Installer
from dropq.errors import PoolError, ProtocolMismatch, TransportError
from dropq.pools.transport import Transport
from dropq_worker.protocol import PROTOCOL, Health, Staging, mismatch

log = logging.getLogger("dropq.pool")


@dataclass(frozen=True)
class WorkerHandle:
    """One worker slot as the balancer sees it."""

    name: str
    transport: Transport
    #: host path of the worker's staging folder; a job's files are there as `Staging` says
    jobs_dir: Path
    #: host path of the folder the worker reads inputs from; a job's inputs go in inputs_dir/<key>/
    inputs_dir: Path

    def staging(self, key: str) -> Staging:
        return Staging(self.jobs_dir, key)


@dataclass(frozen=True, kw_only=True)
class Incarnation:
    """One life of a worker, as `Pool.ensure` finds it: its health answer, and what tells this life from
    the next (a worker that restarted is another incarnation under the same name, and a job it was
    running is lost)."""

    health: Health
    #: the worker's process id (local pool) or container id (docker, compose)
    id: str


def check_protocol(name: str, health: Health, *, todo: str | None = None) -> None:
    """Refuse a worker that speaks another protocol: it would read a job, or lay out its files, differently.
    `todo` says how to bring an older worker up to date, when the general advice does not fit."""
    if health.protocol != PROTOCOL:
        older = health.protocol < PROTOCOL
        raise ProtocolMismatch(mismatch(name, worker_protocol=health.protocol, daemon_protocol=PROTOCOL,
                                        todo=todo if older else None))


def staging_dirs(config: Config, worker: str) -> list[Path]:
    """Where a worker's jobs_dir is under each pool kind (local, docker, compose), for readers that have no
    pool: recovery at start, and `dropq logs` or the dashboard showing a running job's output. Worker
    names never collide across kinds' layouts; the pool contract test checks that every pool's handles
    are listed here."""
    return [config.workers_dir / worker / "jobs", config.workers_dir / worker / "work" / "jobs",
            config.compose_dir / "work" / worker / "jobs"]


def find_staging(config: Config, worker: str, key: str) -> Staging | None:
    """The staged files of the job attempt `key` on `worker`, if they are there."""
    for folder in staging_dirs(config, worker):
        staging = Staging(folder, key)
        if staging.exists():
            return staging
    return None


class Pool(ABC):
    kind: str = "abstract"
    #: True when stop() leaves the workers running: a job running at shutdown then stays assigned to
    #: its worker, and the next start re-attaches to it instead of running it again
    keeps_jobs_running: bool = False
    config: Config

    def __init__(self) -> None:
        self._changed: Callable[[], None] = lambda: None
        self._stopping = threading.Event()

    def on_change(self, callback: Callable[[], None]) -> None:
        """`callback` is called whenever a worker appears, dies or is replaced."""
        self._changed = callback

    @abstractmethod
    def start(self) -> None:
        """Start (or adopt) every worker; returns once they answer, or raises PoolError."""

    @abstractmethod
    def workers(self) -> list[WorkerHandle]:
        """The worker slots, in a stable order."""

    @abstractmethod
    def ensure(self, name: str, *, timeout: float | None = None) -> Incarnation | None:
        """Block until worker `name` answers its health check, replacing it if it is dead or hung.

        Returns its incarnation (so a caller can tell a worker that restarted from one that merely
        hiccuped), or None if the pool is stopping or the timeout passed. Raises ProtocolMismatch if
        the worker answers with another protocol version and the pool cannot replace it by one that
        speaks this daemon's.
        """

    @abstractmethod
    def stop(self) -> None:
        """Stop supervising; stop or leave the workers as the pool's configuration says."""

    def replace(self, name: str) -> None:
        """Put a new worker in slot `name`, whatever the old one is doing: what a failed balancer slot asks
        for before it serves again. Returns once the new worker answers; raises PoolError when that cannot be
        done (the balancer tries again later). By default, for a pool that does not make its workers
        (compose does), it can only wait, within workers.health_timeout, for the worker to answer;
        RestartingPool makes a new one."""
        if self.ensure(name, timeout=self.config.workers.health_timeout) is None:
            raise PoolError(f"worker {name} does not answer; it is restarted by {self.kind}, not by dropq")

    def keeps_running(self, name: str) -> bool:
        """Whether worker `name` goes on running its job when the daemon stops (keeps_jobs_running, for a pool
        whose workers all do; a pool of several kinds answers per worker)."""
        return self.keeps_jobs_running

    def left_on_purpose(self, name: str) -> bool:
        """Whether worker `name` was taken out of the pool on purpose (a compose scale-down, or its operator
        stopped it, as the engine reported) rather than failing. A job it was running is then not to blame,
        and the attempt is not counted against the job's retries. Pools whose workers only ever fail (or are
        replaced by the pool itself) say False."""
        return False

    def detail(self, name: str, health: Incarnation) -> str:
        """What `dropq workers` and the dashboard show to tell this incarnation of worker `name` apart."""
        return f"pid {health.id}"

    def describe(self) -> str:
        return self.kind

    #: what the pool enforces of a job's `memory:` and `cpus:` requests (README: Per-job resources); a request
    #: not enforced still counts against workers.capacity
    enforces: tuple[str, ...] = ()

    def apply_limits(self, name: str, *, memory: int | None, cpus: float | None) -> int | None:
        """Give worker `name`, idle, the limits of the job it is about to run (None: its standing ones). Returns
        the RLIMIT_DATA its worker is to set in the program's process (JobSpec.memory_rlimit), for a pool whose
        workers have no memory limit of their own to change; None otherwise. Raises PoolError when the limits
        cannot be applied. By default nothing is applied (compose: its file sets its containers' limits)."""
        return None

    def lift_limits(self, name: str) -> None:
        """Give worker `name` its standing limits back, once the job that had its own has ended: the worker is
        idle then, as lowering a container's memory below what it uses would fail. Raises PoolError."""
        return None

    def env_installer(self, index: IndexSettings) -> Installer | None:
        """What builds programs' environments for this pool's workers; None when its workers cannot run
        jobs in one (they do not mount the environments folder)."""
        return None


class RestartingPool(Pool):
    """A pool that replaces a worker itself when it fails its health check (local processes and
    daemon-managed containers; compose-managed workers are restarted by compose instead)."""

    _handles: dict[str, WorkerHandle]
    _ready: dict[str, threading.Event]
    #: what to do about a worker of an older protocol, when the general advice does not fit this pool
    _protocol_todo: str | None = None

    @abstractmethod
    def _restart(self, name: str) -> None:
        """Replace worker `name` and wait until the new one answers (or give up, logging why)."""

    @abstractmethod
    def _make_folders(self, handle: WorkerHandle) -> None:
        """Make the worker's folders (staging, inputs) where missing, with the modes and owners it needs;
        raises PoolError if one cannot be made."""

    def replace(self, name: str) -> None:
        handle = self._handles[name]
        # made again first: a new worker (a container's bind mounts above all) needs them to start
        self._make_folders(handle)
        self._restart(name)  # stops the old worker, and with it whatever job it still ran
        try:
            health = handle.transport.health(timeout=self.config.workers.health_timeout)
        except TransportError as exc:
            raise PoolError(f"worker {name} was replaced, but the new one does not answer ({exc})") from None
        check_protocol(name, health, todo=self._protocol_todo)

    def _incarnation(self, name: str, health: Health) -> Incarnation:
        """What ensure() returns for a healthy worker: by default its process id names its incarnation."""
        return Incarnation(health=health, id=str(health.pid))

    def ensure(self, name: str, *, timeout: float | None = None) -> Incarnation | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        handle = self._handles[name]
        while not self._stopping.is_set():
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return None
            # a bounded wait, so that a stop is noticed within a second
            if not self._ready[name].wait(min(remaining, 1.0) if remaining is not None else 1.0):
                continue
            try:
                health = handle.transport.health(timeout=self.config.workers.health_timeout)
            except TransportError as exc:
                if self._stopping.is_set():
                    return None
                log.warning("worker %s: failed its health check (%s); replacing it", name, exc)
                self._restart(name)
                continue
            check_protocol(name, health, todo=self._protocol_todo)
            return self._incarnation(name, health)
        return None


def warm_flags(config: Config) -> list[str]:
    """The worker's command-line flags for its warm interpreters (workers.warm, workers.preload)."""
    if not config.workers.warm:
        return ["--no-warm"]
    return ["--preload", ",".join(config.workers.preload)] if config.workers.preload else []


def make_folders(worker: str, *folders: Path) -> None:
    """Make a worker's folders where missing. Nothing that stands in the way is removed (it may be
    someone's file); the error names it, for `dropq workers` and the log."""
    for folder in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise PoolError(f"worker {worker}: its folder {folder} cannot be made ({exc.strerror or exc}"
                            f"{'; something that is not a folder stands there' if folder.exists() else ''})") from None


def worker_token(path: Path) -> str:
    """The bearer token for one worker, kept in a 0600 file outside every mount a job can see, so a
    restarted daemon can still talk to the workers it adopts."""
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token)
    return token


def wait_answering(transport: Transport, deadline: float, *, give_up: Callable[[], bool] = lambda: False,
                   max_delay: float = 0.25) -> bool:
    """Poll a starting worker's health, backing off, until it answers (True) or the deadline passes or
    `give_up()` says to stop (False). Start-up only: the worker is importing Python and Flask."""
    delay = 0.01
    while time.monotonic() < deadline and not give_up():
        try:
            transport.health(timeout=2.0)
            return True
        except TransportError:
            time.sleep(delay)
            delay = min(delay * 2, max_delay)
    return False
