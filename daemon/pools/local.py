"""The local pool: worker processes on this host, each serving the worker app on a Unix socket.

Workers run in their own session, so a Ctrl-C meant for the daemon does not reach them; the daemon
stops them in order. A daemon killed with SIGKILL leaves them running: the next daemon adopts them by
their socket (they may still be running a job, which it then collects instead of re-running).
Processes are supervised through pidfds, which work for adopted workers too (they are not our
children), so a dead worker is noticed at once, without polling.
"""

from __future__ import annotations

import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from dropq.config import Config
from dropq.envs.install import HostInstaller, IndexSettings, Installer
from dropq.errors import PoolError, ProtocolMismatch, TransportError
from dropq.pools.base import (
    RestartingPool,
    WorkerHandle,
    check_protocol,
    make_folders,
    wait_answering,
    warm_flags,
    worker_token,
)
from dropq.pools.transport import Transport
from dropq_worker.isolation import PER_WORKER

log = logging.getLogger("dropq.pool.local")

_SOCKET_MAX = 107  # sun_path is 108 bytes with its NUL


class _Proc:
    def __init__(self, pid: int, popen: subprocess.Popen[bytes] | None) -> None:
        self.pid = pid
        self.popen = popen
        self.fd = os.pidfd_open(pid)
        self.started = time.monotonic()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def signal(self, sig: int) -> None:
        if self.fd < 0:
            return  # closed once the process was seen to exit: nothing left to signal
        try:
            signal.pidfd_send_signal(self.fd, sig)
        except ProcessLookupError:
            pass


class LocalPool(RestartingPool):
    kind = "local"

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self._names = [f"w{i + 1}" for i in range(config.workers.count)]
        self._procs: dict[str, _Proc] = {}
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        self._supervisor: threading.Thread | None = None
        self._ready = {name: threading.Event() for name in self._names}
        self._restarts: dict[str, int] = dict.fromkeys(self._names, 0)
        self._restarting = {name: threading.Lock() for name in self._names}
        self._python = config.workers.python
        self._version = "?"
        self._handles = {name: self._handle(name) for name in self._names}
        #: the first job uid of w1 when jobs run under uids of their own (see _job_uids), else None
        self._job_uids: int | None = None

    def _handle(self, name: str) -> WorkerHandle:
        folder = self.config.workers_dir / name
        sock = folder / "worker.sock"
        if len(str(sock)) > _SOCKET_MAX:
            raise PoolError(f"the worker socket path {sock} is longer than the {_SOCKET_MAX} bytes a Unix "
                            "socket allows; use a shorter state directory")
        transport = Transport(socket_path=str(sock), token=worker_token(folder / "token"))
        return WorkerHandle(name=name, transport=transport, jobs_dir=folder / "jobs", inputs_dir=folder / "inputs")

    def workers(self) -> list[WorkerHandle]:
        return [self._handles[n] for n in self._names]

    def start(self) -> None:
        self._python, self._version = _real_interpreter(self.config.workers.python)
        self._job_uids = self._job_uid_base()
        for handle in self._handles.values():
            self._make_folders(handle)
        for name in self._names:
            if not self._adopt(name):
                self._spawn(name)
        deadline = time.monotonic() + 30
        for name in self._names:
            self._wait_answering(name, deadline)
        self._supervisor = threading.Thread(target=self._supervise, name="local-pool", daemon=True)
        self._supervisor.start()

    def _make_folders(self, handle: WorkerHandle) -> None:
        make_folders(handle.name, handle.jobs_dir, handle.inputs_dir)
        if self._job_uids is not None:
            # job uids pass through to their own folders, and can neither list nor write these
            for path in (handle.jobs_dir.parent, handle.jobs_dir, handle.inputs_dir):
                os.chmod(path, 0o711)

    def _job_uid_base(self) -> int | None:
        """workers.job_uids, where local jobs can run under uids of their own: only a daemon running as
        root may switch uids, and only folders other users can pass through are reachable by them."""
        base = self.config.workers.job_uids
        if base is None or os.geteuid() != 0:
            return None  # jobs run as the daemon's own user (SECURITY.md: what the local pool isolates)
        needed = [self.config.programs, self.config.workers_dir, Path(self._python)]
        closed = [str(p) for p in needed if not _passable(p)]
        if closed:
            log.warning("local jobs run as root, not under their own uids: other users cannot pass through "
                        "the folders of %s (every folder above them needs o+x)", ", ".join(closed))
            return None
        return base

    #: memory only: a job's `memory:` becomes its program's RLIMIT_DATA, so an allocation past it fails (Python
    #: raises MemoryError). `cpus:` is not enforced: the worker processes share the host's CPUs
    enforces = ("memory",)

    def apply_limits(self, name: str, *, memory: int | None, cpus: float | None) -> int | None:
        return memory

    def describe(self) -> str:
        # which interpreter programs run with, so that `pool: auto` never changes it unseen
        return f"local (Python {self._version}, {self._python})"

    def env_installer(self, index: IndexSettings) -> Installer | None:
        return HostInstaller(self._python, index=index, cache=self.config.envs_dir / ".cache")

    def _adopt(self, name: str) -> bool:
        handle = self._handles[name]
        if not os.path.exists(handle.transport.socket_path or ""):
            return False
        try:
            health = handle.transport.health(timeout=2.0)
            proc = _Proc(health.pid, None)
        except (TransportError, ProcessLookupError):
            return False
        try:
            check_protocol(name, health)
        except ProtocolMismatch as exc:  # left by the dropq this one replaced: ours speaks our protocol
            log.warning("%s; replacing its process %d by one of this version", exc, proc.pid)
            proc.signal(signal.SIGTERM)
            proc.close()
            return False
        with self._lock:
            self._procs[name] = proc
        self._ready[name].set()
        log.info("worker %s: adopted running worker process %d", name, proc.pid)
        return True

    def _spawn(self, name: str) -> None:
        handle = self._handles[name]
        sock = Path(handle.transport.socket_path or "")
        with self._lock:  # out of the list first: the supervisor then takes its death for no failure
            old = self._procs.pop(name, None)
        if old is not None:
            old.signal(signal.SIGKILL)
        if sock.exists() or sock.is_symlink():
            sock.unlink()
        argv = [sys.executable, "-m", "dropq_worker", "--socket", str(sock), "--name", name,
                "--programs", str(self.config.programs), "--inputs", str(handle.inputs_dir),
                "--jobs", str(handle.jobs_dir), "--python", self._python, "--envs", str(self.config.envs_dir),
                "--max-file-bytes", str(self.config.jobs.max_file_bytes),
                "--max-disk-bytes", str(self.config.jobs.max_disk_bytes), *warm_flags(self.config)]
        if self._job_uids is not None:
            # each worker its own range: local workers share the host's processes, and a job's clean-up
            # kills every process of its uid
            first = self._job_uids + self._names.index(name) * PER_WORKER
            argv += ["--job-uids", f"{first}:{PER_WORKER}", "--owner", f"{os.geteuid()}:{os.getegid()}"]
        env = {**os.environ, "DROPQ_WORKER_TOKEN": worker_token(sock.parent / "token")}
        popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True, env=env)
        with self._lock:
            self._procs[name] = _Proc(popen.pid, popen)
        log.info("worker %s: started process %d", name, popen.pid)

    def _wait_answering(self, name: str, deadline: float) -> None:
        handle = self._handles[name]

        def exited() -> bool:
            proc = self._procs.get(name)
            return bool(proc and proc.popen is not None and proc.popen.poll() is not None)

        if wait_answering(handle.transport, deadline, give_up=exited, max_delay=0.2):
            self._ready[name].set()
            return
        proc = self._procs.get(name)
        if proc and proc.popen is not None and proc.popen.returncode is not None:
            raise PoolError(f"worker {name} exited at start with code {proc.popen.returncode}")
        raise PoolError(f"worker {name} did not answer on {handle.transport.socket_path} within 30 seconds")

    def _restart(self, name: str) -> None:
        lock = self._restarting[name]
        if not lock.acquire(blocking=False):
            with lock:  # the supervisor and a failed health check may both ask: one restart serves both
                return
        try:
            self._restart_locked(name)
        finally:
            lock.release()

    def _restart_locked(self, name: str) -> None:
        with self._lock:
            self._ready[name].clear()
            self._restarts[name] += 1
            n = self._restarts[name]
            proc = self._procs.get(name)
        if proc is not None and time.monotonic() - proc.started < 5:
            # a worker that dies at once again and again: back off instead of spinning
            time.sleep(min(30.0, 0.5 * 2 ** min(n, 6)))
        if self._stopping.is_set():
            return
        try:
            self._spawn(name)
            self._wait_answering(name, time.monotonic() + 30)
        except PoolError as exc:
            log.error("worker %s: %s", name, exc)
            return
        os.write(self._wake_w, b"x")  # the supervisor must watch the new process
        self._changed()

    def _supervise(self) -> None:
        while not self._stopping.is_set():
            with self._lock:
                watched = {p.fd: (n, p) for n, p in self._procs.items() if p.fd >= 0}
            readable, _, _ = select.select([self._wake_r, *watched], [], [])
            for fd in readable:
                if fd == self._wake_r:
                    os.read(fd, 512)
                    continue
                name, proc = watched[fd]
                if proc.popen is not None:
                    proc.popen.poll()
                with self._lock:
                    replaced = self._procs.get(name) is not proc
                proc.close()
                if replaced:  # killed by _spawn, which starts its successor: nothing more to do
                    continue
                if self._stopping.is_set():
                    return
                log.warning("worker %s: process %d exited; starting a new one", name, proc.pid)
                threading.Thread(target=self._restart, args=(name,), name=f"restart-{name}", daemon=True).start()

    def stop(self) -> None:
        if self._stopping.is_set():
            return  # stopped already
        self._stopping.set()
        os.write(self._wake_w, b"x")
        if self._supervisor is not None:
            self._supervisor.join(timeout=5)
        with self._lock:
            procs = list(self._procs.values())
        for proc in procs:
            proc.signal(signal.SIGTERM)
        for proc in procs:
            self._reap(proc)
        for handle in self._handles.values():
            handle.transport.abort()
        os.close(self._wake_r)
        os.close(self._wake_w)

    @staticmethod
    def _reap(proc: _Proc, grace: float = 15.0) -> None:
        if proc.popen is not None:
            try:
                proc.popen.wait(grace)
            except subprocess.TimeoutExpired:
                proc.signal(signal.SIGKILL)
                proc.popen.wait()
        elif proc.fd >= 0:
            if not select.select([proc.fd], [], [], grace)[0]:
                proc.signal(signal.SIGKILL)
        proc.close()


def _real_interpreter(name: str) -> tuple[str, str]:
    """The interpreter's real path, and its version. Version managers put shell-script shims on PATH
    (pyenv's costs ~30 ms a start), so ask the interpreter once where it lives instead of paying that per
    job."""
    found = shutil.which(name)
    if found is None:
        raise PoolError(f"workers.python: {name!r} was not found on PATH")
    try:
        out = subprocess.run([found, "-c", "import platform, sys; print(platform.python_version(), sys.executable)"],
                             capture_output=True, text=True, timeout=30, check=True).stdout.strip()
    except (subprocess.SubprocessError, OSError) as exc:
        raise PoolError(f"workers.python: {found} does not run: {exc}") from None
    version, _, path = out.partition(" ")
    return path or found, version


def _passable(path: Path) -> bool:
    """Whether every folder above `path` (after symlinks) lets any user pass through (o+x)."""
    real = Path(os.path.realpath(path))
    return all(os.stat(folder).st_mode & 0o001 for folder in real.parents)
