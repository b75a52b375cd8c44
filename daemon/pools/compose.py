"""Workers managed by docker compose (docker-compose.yml at the repository root), adopted by the daemon.

Compose owns these containers: it creates, scales and restarts them; the daemon never creates or
removes one. It adopts every running replica whose /dropq/work mount is this daemon's
`state/compose/work` folder, follows the engine's start/kill/die/destroy events to learn of replicas that
appear, restart or go, and gives each its own balancer slot. A replica that dies or is removed leaves the
pool at once (and comes back with its next start: compose's restart policy, `compose up`). When the
engine was asked to stop or kill it (a scale-down, `compose stop`, `docker stop`), the job it ran is
queued again without costing an attempt; after a crash, the attempt counts.
Replicas share their mounts, each using the subfolder named by its hostname; that is weaker isolation
between jobs than daemon-managed containers, which is why those are the default.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from dropq.config import Config
from dropq.errors import ProtocolMismatch, TransportError
from dropq.pools.base import Incarnation, Pool, WorkerHandle, check_protocol, wait_answering, worker_token
from dropq.pools.docker import IN_WORK, container_user
from dropq.pools.transport import Transport

log = logging.getLogger("dropq.pool.compose")

COMPOSE_ROLE = "compose-worker"
#: what to do about a replica of an older protocol: compose, not the daemon, makes the replicas
_PROTOCOL_TODO = "rebuild its image with `dropq image build` and recreate the compose service"


class ComposePool(Pool):
    kind = "compose"
    keeps_jobs_running = True

    def __init__(self, config: Config) -> None:
        super().__init__()
        import docker

        self.config = config
        self.work = config.compose_dir / "work"
        self.inputs = config.compose_dir / "inputs"
        self.client = docker.from_env(timeout=60)
        # one token for all replicas; docker-compose.yml passes it to them through env_file
        self.token = worker_token(config.compose_dir / "token")
        self._lock = threading.Lock()
        self._handles: dict[str, WorkerHandle] = {}
        self._ids: dict[str, str] = {}
        self._ready: dict[str, threading.Event] = {}
        #: replicas taken out of the pool on purpose (stopped or killed through the engine), until they start
        self._retired: set[str] = set()
        #: containers the engine was asked to signal, whose die is then an operator's act, not a crash
        self._killed: set[str] = set()
        self._events: Any = None
        self._watcher: threading.Thread | None = None

    def describe(self) -> str:
        return "docker compose"

    def start(self) -> None:
        for folder in (self.work, self.inputs):
            folder.mkdir(parents=True, exist_ok=True)
        env_file = self.config.compose_dir / "worker.env"
        fd = os.open(env_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(f"DROPQ_WORKER_TOKEN={self.token}\n")
        uid, _, gid = container_user(self.config).partition(":")
        if os.geteuid() == 0 and uid.isdigit():
            os.chown(self.work, int(uid), int(gid or uid))  # replicas make their own subfolders in it
        os.chmod(self.inputs, 0o755)
        for container in self.client.containers.list(filters={"label": f"io.dropq.role={COMPOSE_ROLE}"}):
            self._adopt(container)
        if not self._handles:
            log.warning("no compose workers yet: start them with `docker compose up -d --scale worker=N`")
        import docker

        wanted = {"type": "container", "event": ["start", "kill", "die", "destroy"],
                  "label": [f"io.dropq.role={COMPOSE_ROLE}"]}
        self._events = docker.from_env(timeout=None).events(decode=True, filters=wanted)
        self._watcher = threading.Thread(target=self._watch_events, name="compose-events", daemon=True)
        self._watcher.start()

    def _mine(self, container: Any) -> bool:
        for mount in container.attrs.get("Mounts", []):
            if mount.get("Destination") == IN_WORK:
                return os.path.realpath(mount.get("Source", "")) == os.path.realpath(self.work)
        return False

    def _adopt(self, container: Any) -> None:
        container.reload()
        if container.status != "running" or not self._mine(container):
            return
        host = container.attrs["Config"]["Hostname"]
        with self._lock:
            if host not in self._handles:
                (self.inputs / host).mkdir(exist_ok=True)
                os.chmod(self.inputs / host, 0o755)
                self._handles[host] = WorkerHandle(
                    name=host, transport=Transport(socket_path=str(self.work / host / "worker.sock"), token=self.token),
                    jobs_dir=self.work / host / "jobs", inputs_dir=self.inputs / host)
                self._ready[host] = threading.Event()
            self._ids[host] = container.id
            self._retired.discard(host)
            self._killed.discard(container.id)
        log.info("worker %s: adopted compose container %s", host, container.short_id)
        threading.Thread(target=self._mark_ready, args=(host,), name=f"adopt-{host}", daemon=True).start()

    def _mark_ready(self, host: str, limit: float = 60.0) -> None:
        """Ready once it answers: a container's start event comes before its worker listens."""
        with self._lock:
            handle, ready = self._handles.get(host), self._ready.get(host)
        if handle is None or ready is None:
            return
        gone = lambda: self._stopping.is_set() or host not in self._handles  # noqa: E731
        if wait_answering(handle.transport, time.monotonic() + limit, give_up=gone, max_delay=0.5):
            try:
                check_protocol(host, handle.transport.health(timeout=5.0), todo=_PROTOCOL_TODO)
            except TransportError as exc:
                log.error("worker %s: %s", host, exc)
                return
            except ProtocolMismatch as exc:
                # ready all the same: its slot's ensure() meets the mismatch too, and reports the worker
                # broken with this reason where `dropq workers` and the dashboard show it
                log.error("%s", exc)
            ready.set()
            self._changed()
        elif not gone():
            log.error("worker %s: its compose container never answered on its socket", host)

    def workers(self) -> list[WorkerHandle]:
        with self._lock:
            return [self._handles[n] for n in sorted(self._handles)]

    def _watch_events(self) -> None:
        try:
            for event in self._events:
                if self._stopping.is_set():
                    return
                self._on_event(event)
        except Exception as exc:  # noqa: BLE001 - the stream ends with an error when closed at stop
            if not self._stopping.is_set():
                log.error("lost the Docker event stream (%s); new compose workers will not be seen", exc)

    def _on_event(self, event: dict[str, Any]) -> None:
        import docker.errors

        action, cid = event.get("Action") or event.get("status"), event.get("id", "")
        if action == "start":
            try:
                self._adopt(self.client.containers.get(cid))
            except docker.errors.NotFound:
                pass  # removed again before we looked: its destroy event follows
            return
        with self._lock:
            host = next((h for h, i in self._ids.items() if i == cid), None)
            if host is None:
                return
            if action == "kill":
                # the engine signals a container only when asked through its API (a scale-down, compose stop
                # or down, docker stop or kill); a crash, or anything a job does, sends no kill event. The
                # kill comes before the die in the stream (the engine holds the container while it signals).
                self._killed.add(cid)
                return
            # it died or was removed: it leaves the pool now, and comes back with its next start event (a
            # restart policy, compose up, docker start)
            on_purpose = cid in self._killed
            self._killed.discard(cid)
            del self._handles[host], self._ids[host]
            if on_purpose:
                self._retired.add(host)
            self._ready.pop(host).set()  # wake its slot, which then finds it gone
        if on_purpose:
            log.info("worker %s: compose container %s was stopped; it leaves the pool", host, cid[:12])
        else:
            log.warning("worker %s: compose container %s %s; it leaves the pool until it starts again", host,
                        cid[:12], "died" if action == "die" else "was removed")
        self._changed()

    def left_on_purpose(self, name: str) -> bool:
        with self._lock:
            return name in self._retired

    def detail(self, name: str, health: Incarnation) -> str:
        with self._lock:
            return f"container {self._ids.get(name, '?')[:12]}"

    def ensure(self, name: str, *, timeout: float | None = None) -> Incarnation | None:
        while not self._stopping.is_set():
            with self._lock:
                handle, ready = self._handles.get(name), self._ready.get(name)
            if handle is None or ready is None:
                return None  # scaled away
            if not ready.wait(timeout if timeout is not None else 1.0):
                if timeout is not None:
                    return None
                continue
            try:
                health = handle.transport.health(timeout=self.config.workers.health_timeout)
            except TransportError as exc:
                with self._lock:
                    if name not in self._handles:
                        return None  # it failed because it left the pool meanwhile: nothing to wait for
                # compose, not the daemon, restarts its containers: wait for its next start event
                log.warning("worker %s: failed its health check (%s); waiting for compose to restart it",
                            name, exc)
                ready.clear()
                continue
            check_protocol(name, health, todo=_PROTOCOL_TODO)
            return Incarnation(health=health, id=self._ids.get(name, ""))  # the container id names it
        return None

    def stop(self) -> None:
        if self._stopping.is_set():
            return
        self._stopping.set()
        if self._events is not None:
            self._events.close()
        for handle in self.workers():
            handle.transport.abort()
        self.client.close()
