"""The daemon: wires config, store, pool, balancer, intake and watcher together, in the right order.

Start-up order matters: recovery runs before any thread, so that no job is claimed, dispatched or
committed twice; the committer starts next (what recovery rejected waits in its queue until then);
the pool is up before the balancer hands out jobs; the watcher starts after the intake's queue
exists, just before the intake's thread. Shutdown runs the other way round: the committer stops last,
once nothing can finish a job.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from dropq.config import Config
from dropq.envs.builder import Environments
from dropq.envs.install import index_settings
from dropq.errors import DaemonRunning, PoolError
from dropq.intake.claim import Intake, IntakeHooks
from dropq.intake.watcher import Arrival, InboxWatcher
from dropq.ops.disk import DiskGuard
from dropq.ops.metrics import Metrics
from dropq.ops.systemd import Notifier
from dropq.ops.web import WebServer
from dropq.ops.workspace import check_renames
from dropq.pools import Pool, find_staging
from dropq.publish.committer import Committer
from dropq.publish.notify import Notifications
from dropq.publish.outbox import Outbox, key_secret
from dropq.publish.owners import Ownership
from dropq.publish.retention import Retention
from dropq.queue.balancer import Balancer
from dropq.queue.jobs import JobStatus
from dropq.queue.store import JobRecord, Store

log = logging.getLogger("dropq.daemon")


def make_pool(config: Config, *, store: Store | None = None, key_of: Callable[[JobRecord], str] | None = None) -> Pool:
    """This host's pool, and with `agents:` the agents' pool beside it (or alone, with workers.count 0)."""
    own = host_pool(config) if config.workers.count > 0 else None
    if config.agents is None:
        assert own is not None  # the config refuses count 0 without agents
        return own
    assert store is not None and key_of is not None, "the agents' pool needs the store and the outbox's keys"
    from dropq.pools.agents import AgentPool
    from dropq.pools.combined import CombinedPool

    agents = AgentPool(config, store=store, key_of=key_of)
    return agents if own is None else CombinedPool(config, [own, agents])


def host_pool(config: Config) -> Pool:
    kind = config.workers.pool
    if kind in ("docker", "auto"):
        try:
            from dropq.pools.docker import DockerPool, docker_available
        except ImportError:
            if kind == "docker":
                raise PoolError("the docker pool is not available in this build") from None
        else:
            usable, why = docker_available(config)
            if usable and config.workers.docker.managed_by == "compose":
                from dropq.pools.compose import ComposePool

                log.info("worker pool: docker compose workers (workers.docker.managed_by: compose)")
                return ComposePool(config)
            if usable:
                log.info("worker pool: docker (%s)", why)
                return DockerPool(config)
            if kind == "docker":
                raise PoolError(f"workers.pool is docker, but {why}")
            log.info("worker pool: local processes, because %s", why)
    from dropq.pools.local import LocalPool

    if kind == "local":
        log.info("worker pool: local processes (workers.pool: local)")
    return LocalPool(config)


class Daemon:
    def __init__(self, config: Config, *, pool: Pool | None = None, notifier: Notifier | None = None) -> None:
        self.config = config
        for folder in (config.inbox, config.outbox, config.state, config.spool, config.workers_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self._lock_fd = lock_state(config.state)
        try:
            # once, before any job moves: a workspace split over mounts fails here with one line, not job by job
            check_renames(config)
        except BaseException:
            os.close(self._lock_fd)
            raise
        self.notifier = notifier or Notifier()
        self.store = Store(config.database)
        self.metrics = Metrics(self.store)
        # bound before anything starts, so a port in use stops the daemon at once with a clear message
        self.web = WebServer(config, self.metrics) if config.http.enabled else None
        self.outbox = Outbox(root=config.outbox, spool=config.spool, store=self.store,
                             secret=key_secret(config.state),
                             on_published=self._published, ownership=Ownership.from_config(config))
        # every finished job reaches the outbox through this one committer: results, rejections, cancels
        self.committer = Committer(outbox=self.outbox)
        #: removes published folders past retention.max_age / max_bytes (a thread only when one is set)
        self.retention = Retention(config=config, store=self.store)
        #: webhooks manifests ask for, and notify.command (threads only when configured)
        self.notifications = Notifications(config=config, store=self.store)
        self.pool = pool or make_pool(config, store=self.store, key_of=self.outbox.key)
        self.balancer = Balancer(config=config, store=self.store, pool=self.pool, committer=self.committer)
        self.envs = Environments(config=config, store=self.store, committer=self.committer,
                                 installer=self.pool.env_installer(index_settings(config)), notify=self.balancer.notify)
        self.watcher = InboxWatcher(inbox=config.inbox, mode=config.intake.watch, on_file=self._on_file)
        # the loop turns at least twice per ping interval, so no ping is ever later than 3/4 of the timeout
        every = min(5.0, (self.notifier.watchdog_interval or 10.0) / 2)
        self.disk = DiskGuard([config.outbox, config.state], min_free=config.disk.min_free_bytes)
        hooks = IntakeHooks(notify=self.balancer.notify, cancel=self.balancer.cancel, heartbeat=self._heartbeat,
                            heartbeat_every=every, place=self.envs.place, disk_low=self.disk.low)
        self.intake = Intake(config=config, store=self.store, committer=self.committer, inbox=self.watcher,
                             hooks=hooks, capacity=self.balancer.capacity)
        self._stop = threading.Event()
        self._next_status = 0.0
        self._trouble_logged = False

    def status_line(self) -> str:
        counts = self.store.active_counts()
        line = (f"{counts.get('queued', 0)} queued, {counts.get('running', 0)} running; "
                f"{len(self.pool.workers())} {self.pool.kind} worker(s)")
        # Manifests that cannot be claimed leave the daemon degraded, not unhealthy: it still serves the
        # others, and a restart cannot cure a file's permissions or a full disk, so the watchdog stays fed;
        # the status line (and `dropq status`) says what is wrong instead of looking healthy. So does a worker
        # slot being repaired: the daemon cures that itself, with one worker fewer meanwhile.
        trouble = "; ".join(t for t in (self.intake.trouble(), self.balancer.degraded(), self.disk.low()) if t)
        return f"degraded: {trouble}; {line}" if trouble else line

    def _heartbeat(self) -> None:
        """From the intake's loop: feed the systemd watchdog while the daemon can do its work."""
        trouble = self.balancer.trouble() or self.committer.trouble()
        if trouble is not None:
            # no more WATCHDOG=1: systemd restarts the daemon (WatchdogSec), which is the cure
            if not self._trouble_logged:
                log.error("%s; no longer feeding the systemd watchdog, so that the service is restarted", trouble)
                self.notifier.status(f"unhealthy: {trouble}")
                self._trouble_logged = True
            return
        self.notifier.watchdog()
        now = time.monotonic()
        if self.notifier.enabled and now >= self._next_status:
            self._next_status = now + 2.0
            self.notifier.status(self.status_line())

    def _published(self, job: JobRecord) -> None:
        """Every job the outbox publishes: counted, and the jobs that run after it (a pipeline) look again."""
        self.metrics.observe(job)
        self.intake.published(job)
        self.notifications.published(job)

    def _on_file(self, rel: str, arrival: Arrival) -> None:
        self.intake.offer(rel, arrival)

    def recover(self) -> None:
        """Bring every job the last run left half-way to a consistent state, before any thread starts."""
        committing = self.store.with_status(JobStatus.COMMITTING)
        for job in committing:
            # the docker pool's staging is not under workers/<name>/jobs, so ask where it is
            staging = find_staging(self.config, job.worker, self.outbox.key(job)) if job.worker else None
            log.info("job %s: finishing the commit an earlier run began", job.id)
            self.outbox.finish(job, staging=staging)
        # arrays whose last task ended (or whose max_failures was reached) just before the crash go on
        self.committer.settle_arrays()
        pending = {j.id for j in self.store.with_status(JobStatus.COMMITTING)}
        for name in self.outbox.clean_stale(keep=pending):
            log.info("removed the stale temporary folder %s from the outbox", name)
        self.intake.recover()

    def start(self) -> None:
        # before the intake's recovery, which queues resumed jobs in their environments
        self.envs.start()
        self.recover()
        self.notifications.start()  # before the committer: a delivery pending from the last run goes out too
        self.committer.start()
        self.retention.start()
        self.pool.start()
        self.balancer.start()
        # the watcher before the intake's thread: what it reports waits in the intake's queue, and the
        # intake's first scan then knows whether close events will come (see InboxWatcher.open_now)
        self.watcher.start()
        self.intake.start()
        self.store.set_meta("pool", self.pool.describe())
        self.store.set_meta("watcher", self.watcher.kind)
        self.store.set_meta("pid", str(os.getpid()))
        # for the CLI: on a shared host it tells a user at once that another's job is not theirs to cancel
        self.store.set_meta("results_owned", "1" if self.outbox.ownership.active else "")
        if self.outbox.ownership.active:
            log.info("running as root: each job's outbox folder is given to whoever dropped its manifest, mode %04o "
                     "(results.mode)", self.outbox.ownership.mode)
        self.store.set_meta("started_at", f"{time.time():.3f}")
        if self.web is not None:
            self.web.start()
        self.store.set_meta("http", self.web.url if self.web is not None else "")
        log.info("dropq is running: inbox %s, outbox %s, %d %s worker(s)", self.config.inbox,
                 self.config.outbox, len(self.pool.workers()), self.pool.describe())
        self.notifier.ready(self.status_line())

    def stop(self) -> None:
        log.info("shutting down")
        self.notifier.stopping()
        self.retention.stop()
        self.watcher.stop()
        self.intake.stop()
        self.envs.stop()
        self.balancer.stop()
        # stopping the pool ends the long-polls of slots still following a job; they requeue it
        self.pool.stop()
        self.balancer.join()
        self.envs.join()
        self.committer.stop()  # after the slots and the builds: every outcome they recorded is published first
        self.notifications.stop()  # deliveries not yet sent stay in the store for the next start
        if self.web is not None:
            self.web.stop()
        self.store.set_meta("pid", "")
        self.store.set_meta("disk_low", "")
        self.store.set_meta("http", "")
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


def lock_state(state: Path) -> int:
    """Hold the state directory as its one daemon (or as a command that must not run beside one); returns
    the lock's file descriptor, or raises DaemonRunning."""
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
