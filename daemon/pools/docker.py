"""The docker pool: each worker is a hardened container the daemon creates, or adopts, by label.

A container gets exactly four mounts: programs/ read-only, its own inputs folder read-only, the programs'
environments (state/envs/) read-only, and its own work folder read-write (its staging folder, and the
Unix socket its API listens on). It runs with
no network at all, so the daemon reaches it only through that socket on the shared mount and never
connects to a container address. Deaths are learnt from the engine's event stream (no polling); a
worker that hangs is caught by the health check before each job and replaced.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from dropq.config import Config
from dropq.envs.install import IN_ENVS, ContainerInstaller, IndexSettings, Installer
from dropq.errors import DaemonRunning, EngineUnavailable, PoolError, ProtocolMismatch, TransportError
from dropq.pools.base import (
    Incarnation,
    RestartingPool,
    WorkerHandle,
    check_protocol,
    make_folders,
    wait_answering,
    warm_flags,
    worker_token,
)
from dropq.pools.engine import engine_client, update_resources
from dropq.pools.transport import Transport
from dropq.units import human_size
from dropq_worker.isolation import PER_WORKER
from dropq_worker.protocol import PROTOCOL, Health

log = logging.getLogger("dropq.pool.docker")

LABEL_ROLE = "io.dropq.role"
LABEL_INSTANCE = "io.dropq.instance"
LABEL_WORKER = "io.dropq.worker"
LABEL_STATE = "io.dropq.state"
IN_PROGRAMS, IN_INPUTS, IN_WORK = "/dropq/programs", "/dropq/inputs", "/dropq/work"
#: what a worker that runs each job under its own uid needs, and nothing more (SECURITY.md says why):
#: SETUID/SETGID start a job as its uid; SETPCAP empties the bounding set the jobs inherit; CHOWN gives
#: a job its folder and takes it back; FOWNER closes folders it does not own; DAC_OVERRIDE reads and
#: removes what a job left with any mode; KILL stops a job's processes, which are not the worker's uid
WORKER_CAPS = ("SETUID", "SETGID", "SETPCAP", "CHOWN", "FOWNER", "DAC_OVERRIDE", "KILL")


def docker_available(config: Config) -> tuple[bool, str]:
    """Whether the docker pool can run here, and why (or why not), in words for the log."""
    import docker.errors

    try:
        client = engine_client(timeout=5)
    except EngineUnavailable as exc:  # whatever the reason, there is no engine: use local
        return False, str(exc)
    image = config.workers.docker.image
    try:
        client.images.get(image)
    except docker.errors.ImageNotFound:
        return False, f"the worker image {image} does not exist (build it with `dropq image build`)"
    finally:
        client.close()
    return True, f"a Docker engine answers and the image {image} exists"


def instance_id(config: Config) -> str:
    """Containers belong to one daemon: the one whose state directory is this one."""
    return hashlib.sha256(str(config.state).encode()).hexdigest()[:12]


def isolates_jobs(config: Config) -> bool:
    """Whether the daemon's containers run each job under a uid of its own (compose's replicas run as
    the compose file says)."""
    return config.workers.job_uids is not None and config.workers.docker.managed_by == "daemon"


def container_user(config: Config) -> str:
    if isolates_jobs(config):
        # root in the container, with WORKER_CAPS only, to start each job under a uid of its own
        return "0:0"
    if config.workers.docker.user:
        return config.workers.docker.user
    # as root: an unprivileged uid; otherwise the daemon's own, so it can read what jobs write
    return "65534:65534" if os.geteuid() == 0 else f"{os.geteuid()}:{os.getegid()}"


def _build_user(config: Config) -> str:
    """The uid:gid environment builds run as: never root, and the daemon's own when it is not root (so it
    can remove what the build wrote)."""
    user = container_user(config)
    return "65534:65534" if user.split(":")[0] == "0" else user


def remove_workers(config: Config) -> list[str]:
    """Stop and remove the worker containers of the daemon on this state directory (`dropq workers remove`):
    with `on_shutdown: leave` they outlive the daemon. Only containers labelled with this state's instance
    are touched, never compose's replicas or another daemon's. Refuses while a daemon runs on the state
    directory (it would only make new ones). Returns one line per container removed."""
    import docker
    import docker.errors

    from dropq.ops.service import lock_state

    try:
        # no state directory: no daemon can be running on it, but its containers may still be there
        lock = lock_state(config.state) if config.state.is_dir() else None
    except DaemonRunning:
        raise DaemonRunning(f"a dropq daemon is running on {config.state}: stop it first "
                            f"(while it runs, it replaces any worker container removed)") from None
    removed = []
    try:
        client = docker.from_env(timeout=60)
        try:
            instance = instance_id(config)
            found = client.containers.list(all=True, filters={"label": [f"{LABEL_ROLE}=worker",
                                                                        f"{LABEL_INSTANCE}={instance}"]})
            for container in found:
                # the instance is a hash of the state path: check the path itself too
                if container.labels.get(LABEL_STATE) != str(config.state):
                    continue
                was = container.status
                if was == "running":
                    container.stop(timeout=int(config.jobs.kill_grace) + 5)  # its worker stops its job first
                container.remove(force=True)
                removed.append(f"worker {container.labels.get(LABEL_WORKER, '?')}: "
                               f"removed container {container.id[:12]} (it was {was})")
        finally:
            client.close()
    except docker.errors.DockerException as exc:
        raise PoolError(f"could not remove the worker containers: {exc}") from None
    finally:
        if lock is not None:
            os.close(lock)
    return removed


class DockerPool(RestartingPool):
    kind = "docker"

    def __init__(self, config: Config) -> None:
        super().__init__()
        import docker

        self.config = config
        self.settings = config.workers.docker
        self.instance = instance_id(config)
        self.client = docker.from_env(timeout=60)
        self._names = [f"w{i + 1}" for i in range(config.workers.count)]
        self._handles = {name: self._handle(name) for name in self._names}
        self._ids: dict[str, str] = {}
        #: the limits each container has now, by container id (known once made, or set, by this daemon; an
        #: adopted container may still have its last job's, so it is set before its first job here)
        self._limits: dict[str, tuple[int, int]] = {}
        self._ready = {name: threading.Event() for name in self._names}
        self._restarting = {name: threading.Lock() for name in self._names}
        self._events: Any = None
        self._watcher: threading.Thread | None = None
        self.keeps_jobs_running = self.settings.on_shutdown == "leave"
        # containers are made from the image only when replaced, so a rebuild needs a restart to take
        self._protocol_todo = (f"the image {self.settings.image} is out of date: rebuild it with "
                               "`dropq image build`, then restart dropq")

    def env_installer(self, index: IndexSettings) -> Installer | None:
        # an sdist's build runs in the build container, never on the host: allowed here
        return ContainerInstaller(image=self.settings.image, envs=self.config.envs_dir,
                                  index=dataclasses.replace(index, sdists=True),
                                  cache=self.config.envs_dir / ".cache", state=self.config.state,
                                  user=_build_user(self.config))

    def describe(self) -> str:
        return f"docker ({self.settings.image})"

    def _handle(self, name: str) -> WorkerHandle:
        folder = self.config.workers_dir / name
        work = folder / "work"
        transport = Transport(socket_path=str(work / "worker.sock"), token=worker_token(folder / "token"))
        return WorkerHandle(name=name, transport=transport, jobs_dir=work / "jobs", inputs_dir=folder / "inputs")

    def workers(self) -> list[WorkerHandle]:
        return [self._handles[n] for n in self._names]

    def labels(self, name: str) -> dict[str, str]:
        return {LABEL_ROLE: "worker", LABEL_INSTANCE: self.instance, LABEL_WORKER: name,
                LABEL_STATE: str(self.config.state)}

    def container_name(self, name: str) -> str:
        return f"dropq-{self.instance}-{name}"

    # --- start, adopt, create ------------------------------------------------------------------

    def start(self) -> None:
        for handle in self._handles.values():
            self._make_folders(handle)
        self._adopt_or_clear()
        for name in self._names:
            if name not in self._ids:
                self._create(name)
        deadline = time.monotonic() + 60
        for name in self._names:
            self._wait_answering(name, deadline)
        import docker

        mine = {"type": "container", "event": ["die"], "label": [f"{LABEL_INSTANCE}={self.instance}"]}
        self._events = docker.from_env(timeout=None).events(decode=True, filters=mine)
        self._watcher = threading.Thread(target=self._watch_events, name="docker-events", daemon=True)
        self._watcher.start()

    def _make_folders(self, handle: WorkerHandle) -> None:
        work = handle.jobs_dir.parent
        make_folders(handle.name, handle.jobs_dir, handle.inputs_dir)
        os.chmod(handle.inputs_dir, 0o755)
        uid, _, gid = container_user(self.config).partition(":")
        if isolates_jobs(self.config):
            # job uids may pass through to their own folders, never list them (nor other jobs' keys)
            for path in (work, handle.jobs_dir, handle.inputs_dir):
                os.chmod(path, 0o711)
        elif os.geteuid() == 0 and uid.isdigit():
            for path in (work, handle.jobs_dir):
                os.chown(path, int(uid), int(gid or uid))
            os.chmod(work, 0o700)

    def _adopt_or_clear(self) -> None:
        found = self.client.containers.list(all=True, filters={"label": f"{LABEL_INSTANCE}={self.instance}"})
        for container in found:
            name = container.labels.get(LABEL_WORKER, "")
            handle = self._handles.get(name)
            if handle is not None and container.status == "running" and name not in self._ids:
                try:
                    health = handle.transport.health(timeout=3.0)
                except TransportError:
                    pass
                else:
                    if health.protocol != PROTOCOL:  # left by the dropq this one replaced
                        log.info("worker %s: container %s speaks protocol %d, this daemon %d; replacing it",
                                 name, container.short_id, health.protocol, PROTOCOL)
                        container.remove(force=True)
                        continue
                    self._ids[name] = container.id
                    self._ready[name].set()
                    log.info("worker %s: adopted running container %s", name, container.short_id)
                    continue
            log.info("removing container %s (%s)", container.short_id, container.status)
            container.remove(force=True)

    def _create(self, name: str) -> None:
        import docker.errors
        from docker.types import Mount

        handle = self._handles[name]
        sock = Path(handle.transport.socket_path or "")
        if sock.exists() or sock.is_symlink():
            sock.unlink()
        s = self.settings
        try:
            old = self.client.containers.get(self.container_name(name))
            old.remove(force=True)
        except docker.errors.NotFound:
            pass
        except docker.errors.DockerException as exc:
            # e.g. 409, its removal already in progress (by someone else, or a restart this one raced): a
            # PoolError, so that the restart is tried again later rather than its thread ending with the
            # worker never marked ready
            raise PoolError(f"could not remove the old container of worker {name}: {exc}") from None
        self.config.envs_dir.mkdir(parents=True, exist_ok=True)  # a bind mount's source must exist
        mounts = [
            Mount(IN_PROGRAMS, str(self.config.programs), type="bind", read_only=True),
            Mount(IN_INPUTS, str(handle.inputs_dir), type="bind", read_only=True),
            Mount(IN_WORK, str(handle.jobs_dir.parent), type="bind", read_only=False),
            Mount(IN_ENVS, str(self.config.envs_dir), type="bind", read_only=True),
        ]
        command = ["--socket", f"{IN_WORK}/worker.sock", "--programs", IN_PROGRAMS, "--inputs", IN_INPUTS,
                   "--envs", IN_ENVS,
                   "--jobs", f"{IN_WORK}/jobs", "--name", name,
                   "--max-file-bytes", str(self.config.jobs.max_file_bytes),
                   "--max-disk-bytes", str(self.config.jobs.max_disk_bytes), *warm_flags(self.config)]
        caps: list[str] = []
        if self.config.workers.job_uids is not None and isolates_jobs(self.config):
            first = self.config.workers.job_uids + self._names.index(name) * PER_WORKER
            command += ["--job-uids", f"{first}:{PER_WORKER}", "--owner", f"{os.geteuid()}:{os.getegid()}"]
            caps = list(WORKER_CAPS)
        try:
            container = self.client.containers.run(
                s.image, detach=True, name=self.container_name(name), hostname=name, labels=self.labels(name),
                command=command, user=container_user(self.config), read_only=True,
                tmpfs={"/tmp": f"rw,nosuid,nodev,size={s.tmpfs_size},mode=1777"},
                cap_drop=["ALL"], cap_add=caps or None, security_opt=["no-new-privileges"], pids_limit=s.pids_limit,
                mem_limit=s.memory, memswap_limit=s.memory, nano_cpus=int(s.cpus * 1e9),
                network_mode=s.network, runtime=s.runtime, mounts=mounts, restart_policy={"Name": "no"},
                environment={"DROPQ_WORKER_TOKEN": worker_token(handle.jobs_dir.parent.parent / "token")},
            )
        except docker.errors.DockerException as exc:
            raise PoolError(f"could not start worker container {name} from {s.image}: {exc}") from None
        self._ids[name] = container.id
        self._limits[container.id] = self._standing()
        log.info("worker %s: started container %s", name, container.short_id)

    # --- per-job limits (README: Per-job resources) --------------------------------------------

    #: both, by the engine's update of the running container: no container is started per job
    enforces = ("memory", "cpus")

    def _standing(self) -> tuple[int, int]:
        """The limits a worker container is made with: memory (swap none) and nano-CPUs."""
        return self.settings.memory_bytes, int(self.settings.cpus * 1e9)

    def apply_limits(self, name: str, *, memory: int | None, cpus: float | None) -> int | None:
        standing_memory, standing_cpus = self._standing()
        # the worker process shares the container's memory with its job: it keeps its own share on top
        target = (standing_memory if memory is None else memory + self.settings.worker_memory_bytes,
                  standing_cpus if cpus is None else int(cpus * 1e9))
        self._set_limits(name, target)
        return None

    def lift_limits(self, name: str) -> None:
        self._set_limits(name, self._standing())

    def _set_limits(self, name: str, target: tuple[int, int]) -> None:
        cid = self._ids.get(name)
        if cid is None or self._limits.get(cid) == target:
            return  # as it is already (a container is made with the standing limits): no request to the engine
        import docker.errors

        try:
            update_resources(self.client, cid, memory=target[0], nano_cpus=target[1])
        except (docker.errors.DockerException, OSError) as exc:  # OSError: requests' errors (the engine is gone)
            raise PoolError(f"worker {name}: could not set its container's limits to {human_size(target[0])} of "
                            f"memory and {target[1] / 1e9:g} CPUs: {exc}") from None
        self._limits[cid] = target
        log.debug("worker %s: limits %s of memory, %g CPUs", name, human_size(target[0]), target[1] / 1e9)

    def _wait_answering(self, name: str, deadline: float) -> None:
        transport = self._handles[name].transport
        if wait_answering(transport, deadline):
            check_protocol(name, transport.health(timeout=5.0), todo=self._protocol_todo)
            self._ready[name].set()
            return
        logs = self._container_logs(name)
        raise PoolError(f"worker container {name} did not answer within 60 seconds{logs}")

    def _container_logs(self, name: str) -> str:
        try:
            text = self.client.containers.get(self._ids[name]).logs(tail=10).decode(errors="replace")
        except Exception:  # noqa: BLE001 - only to enrich an error message
            return ""
        return f"; its last log lines:\n{text}" if text else ""

    # --- supervision ---------------------------------------------------------------------------

    def _watch_events(self) -> None:
        try:
            for event in self._events:
                if self._stopping.is_set():
                    return
                attrs = event.get("Actor", {}).get("Attributes", {})
                name = attrs.get(LABEL_WORKER)
                if name in self._ids and self._ids[name] == event.get("id"):
                    log.warning("worker %s: container %s died (exit code %s); replacing it", name,
                                str(event.get("id"))[:12], attrs.get("exitCode"))
                    threading.Thread(target=self._restart, args=(name,), daemon=True).start()
        except Exception as exc:  # noqa: BLE001 - the stream ends with an error when closed at stop
            if not self._stopping.is_set():
                log.error("lost the Docker event stream (%s); deaths are now noticed by health checks", exc)

    def _incarnation(self, name: str, health: Health) -> Incarnation:
        return Incarnation(health=health, id=self._ids.get(name, ""))  # the container id names it

    def detail(self, name: str, health: Incarnation) -> str:
        return f"container {self._ids.get(name, '?')[:12]}"  # the full 64-character id overflows the dashboard

    def _restart(self, name: str) -> None:
        lock = self._restarting[name]
        if not lock.acquire(blocking=False):
            with lock:
                return
        try:
            self._ready[name].clear()
            if self._stopping.is_set():
                return
            self._create(name)
            self._wait_answering(name, time.monotonic() + 60)
        except PoolError as exc:
            # a mismatch names the worker already; ensure() then meets it and the slot reports it
            if isinstance(exc, ProtocolMismatch):
                log.error("%s", exc)
            else:
                log.error("worker %s: %s", name, exc)
            time.sleep(5)  # do not spin against a broken engine or image; ensure() will try again
            self._ready[name].set()
            return
        finally:
            lock.release()
        self._changed()

    def stop(self) -> None:
        if self._stopping.is_set():
            return  # stopped already
        self._stopping.set()
        if self._events is not None:
            self._events.close()
        for handle in self._handles.values():
            handle.transport.abort()
        if self.settings.on_shutdown == "remove":
            for name, cid in list(self._ids.items()):
                try:
                    container = self.client.containers.get(cid)
                    container.stop(timeout=int(self.config.jobs.kill_grace) + 5)
                    container.remove(force=True)
                except Exception as exc:  # noqa: BLE001 - stopping the rest matters more
                    log.warning("worker %s: could not remove its container: %s", name, exc)
        else:
            log.info("leaving %d worker container(s) running for the next start to adopt", len(self._ids))
        self.client.close()
