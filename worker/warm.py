"""Warm interpreters: the worker's side of the fork servers (`forkserver.py`, which runs apart from it).

A Python job is forked from a fork server that already started its interpreter and imported its
preloads, instead of a fresh `python PROGRAM ARGS`. There is one server per interpreter (the job's
environment's, or the worker's `--python`), preload set and interpreter-start variables (PYTHON*,
LANG, LC_*, PATH: they shape how an interpreter starts, so a server serves only jobs that have the same
ones). Servers start lazily, at the first job that needs one; a worker keeps at most MAX_SERVERS,
dropping the least recently used.

A job runs fresh instead when its manifest says `fresh_interpreter: true`, its program says
`fresh-interpreter = true` under `[tool.dropq]`, it is not a `.py` program, it sets HOME, the worker
runs with `--no-warm`, or the server is not there to take it (it failed to start, or died): then the
server is dropped and started again for a later job. A start that fails half-way never runs twice:
see forkserver.py.

Under --job-uids the servers are started by the launcher (launcher.py), with a trusted interpreter in
isolated mode without site (`-I -S`): they hold SETUID, SETGID and SETPCAP, and each child takes its
job's uid before it runs the environment's `site` and the program. One server then serves every
environment of that interpreter: the environment is found in the child. Its sys.path is the standard
library alone (root's), so it can import nothing else; and of the preloads it takes only the worker's
own (--preload: the operator's `workers.preload`), never a program's `preload`, which a job's author
writes (even a standard-library name can do harm at import, as `antigravity` starts a browser): the
worker says once that it ignores those, and a worker preload outside the standard library fails as
"could not preload". A job
starts fresh there also when it sets an interpreter variable that `-I` would ignore (PYTHON* but
PYTHONDONTWRITEBYTECODE and PYTHONNOUSERSITE) or a locale other than the server's (LANG=C.UTF-8), or
when its interpreter is not one the worker trusts (launcher.check_interpreter).

Why not a server per job uid: it would outlive its job as that uid, which the next job of the uid could
reach (signal, ptrace): the clean-up that kills every process of a job's uid exists to rule that out.
"""

from __future__ import annotations

import logging
import marshal
import os
import re
import resource
import select
import shutil
import signal
import socket
import subprocess
import threading
import time
import tomllib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from . import procs
from .launcher import SERVER_ENV, Launcher, LauncherError

log = logging.getLogger("dropq.worker")

#: the server script, run by the job's interpreter
SERVER = Path(__file__).with_name("forkserver.py")
#: servers a worker keeps (one per interpreter, preloads and interpreter-start variables)
MAX_SERVERS = 4
#: seconds a server may take to start and import its preloads (the job waiting for it has not started yet:
#: its timeout does not run meanwhile)
READY_TIMEOUT = 60.0
#: seconds a server may take to fork and set up a child
FORK_TIMEOUT = 10.0
#: the longest wait, in seconds, before another server is tried for a key whose servers keep failing to start
RETRY_AFTER = 60.0
#: the largest request sent to a server (forkserver.MAX_REQUEST, less room); a larger one starts fresh
MAX_REQUEST = 200 * 1024
#: where a server's HOME points: no user site-packages, as a job's new output folder has none
NO_HOME = "/nonexistent"

_PRELOAD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_BLOCK = re.compile(r"(?m)^# /// (?P<type>[a-zA-Z0-9-]+)$\s(?P<content>(^#(| .*)$\s)+)^# ///$")


#: interpreter variables a server started `-I` honours in its children (forkserver._site)
UID_MODE_VARIABLES = frozenset({"PYTHONDONTWRITEBYTECODE", "PYTHONNOUSERSITE", "PATH"})


def starts_interpreter(name: str) -> bool:
    """Whether an environment variable shapes how an interpreter starts (its flags, sys.path, encodings)."""
    return name.startswith(("PYTHON", "LC_")) or name in ("LANG", "LANGUAGE", "PATH")


@dataclass(frozen=True)
class ProgramOptions:
    """What a program says about its warm interpreter, under `[tool.dropq]` in its PEP 723 block (a
    single-file program) or its folder's pyproject.toml."""

    fresh: bool = False
    preload: tuple[str, ...] = ()


class _OptionsCache:
    """Program options by file, read again only when the file changed (one stat per job otherwise)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._known: dict[str, tuple[tuple[int, int, int], ProgramOptions]] = {}

    def get(self, program: Path) -> ProgramOptions:
        # a folder program's main.py says it in its folder's pyproject.toml (as its dependencies)
        source = program.parent / "pyproject.toml" if program.name == "main.py" else program
        if source != program and not source.exists():
            source = program
        try:
            st = os.stat(source)
        except OSError:
            return ProgramOptions()
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        with self._lock:
            known = self._known.get(str(source))
        if known is not None and known[0] == stamp:
            return known[1]
        options = read_options(source)
        with self._lock:
            if len(self._known) > 1024:
                self._known.clear()
            self._known[str(source)] = (stamp, options)
        return options


def read_options(source: Path) -> ProgramOptions:
    """`[tool.dropq]` of a program's PEP 723 block or pyproject.toml; a malformed one is ignored, saying so."""
    try:
        with open(source, "rb") as fh:
            raw = fh.read(4 * 1024 * 1024)
    except OSError:
        return ProgramOptions()
    try:
        if source.suffix == ".toml":
            data = tomllib.loads(raw.decode("utf-8"))
        else:
            if b"# /// script" not in raw:
                return ProgramOptions()
            blocks = [m for m in _BLOCK.finditer(raw.decode("utf-8", "replace")) if m.group("type") == "script"]
            if len(blocks) != 1:
                return ProgramOptions()
            content = "".join(line[2:] if line.startswith("# ") else line[1:]
                              for line in blocks[0].group("content").splitlines(keepends=True))
            data = tomllib.loads(content)
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        log.warning("%s: its metadata is not valid TOML (%s); it runs with the default interpreter settings",
                    source, exc)
        return ProgramOptions()
    tool = data.get("tool", {}).get("dropq", {}) if isinstance(data.get("tool"), dict) else {}
    if not isinstance(tool, dict):
        return ProgramOptions()
    fresh = tool.get("fresh-interpreter", False)
    preload = tool.get("preload", [])
    if not isinstance(fresh, bool) or not isinstance(preload, list) or \
            not all(isinstance(p, str) and _PRELOAD_NAME.fullmatch(p) for p in preload):
        log.warning("%s: [tool.dropq] takes fresh-interpreter = true|false and preload = [\"module\", ...]; "
                    "ignored", source)
        return ProgramOptions()
    return ProgramOptions(fresh=fresh, preload=tuple(preload))


def check_preloads(names: list[str]) -> tuple[str, ...]:
    """Module names given on the worker's command line (--preload), each a dotted name."""
    for name in names:
        if not _PRELOAD_NAME.fullmatch(name):
            raise ValueError(f"--preload takes module names, not {name!r}")
    return tuple(names)


class ServerGone(Exception):
    """The fork server died, hung or refused: the job starts fresh, and the server is replaced."""


class ForkedProcess:
    """A job forked by a fork server, with what supervise uses of a Popen: pid, stdout, stderr, wait(),
    returncode. Its parent is the server; its status comes from the server, or, should the server die
    first, from the worker itself, to whom the kernel then re-parents it (the worker is a subreaper)."""

    def __init__(self, server: Server, pid: int, stdout: IO[bytes], stderr: IO[bytes]) -> None:
        self.server, self.pid, self.stdout, self.stderr = server, pid, stdout, stderr
        self.returncode: int | None = None
        self._released = False

    def wait(self) -> int:
        if self.returncode is None:
            self.returncode = self.server.exit_status(self.pid)
        return self.returncode

    def release(self) -> None:
        """The worker is done with the pid (its group killed): the server may reap the child now."""
        if self.returncode is not None and not self._released:
            self._released = True
            self.server.release()


class Server:
    """One fork server process and the worker's end of its socket."""

    proc: subprocess.Popen[bytes] | Launched

    def __init__(self, python: str, preload: tuple[str, ...], env: dict[str, str],
                 launcher: Launcher | None = None) -> None:
        self.python, self.preload = python, preload
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock = mine
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 2 * MAX_REQUEST)
        except OSError:
            log.debug("could not enlarge the fork server socket's send buffer")
        if launcher is not None:
            self._launched(launcher, theirs)
        else:
            self._popen(env, theirs)
        self.failed: list[str] = []
        try:
            reply = self._receive(READY_TIMEOUT)
        except ServerGone:
            self.close()
            raise
        if reply[0] != "ready":
            self.close()
            raise ServerGone(f"the fork server said {reply!r} at start")
        self.failed = list(reply[2])

    def _launched(self, launcher: Launcher, theirs: socket.socket) -> None:
        """Started by the launcher (job uids): a process the worker holds by a pidfd, not its child."""
        log_r, log_w = os.pipe()
        try:
            pid, pidfd = launcher.spawn(self.python, self.preload, theirs.fileno(), log_w)
        except LauncherError as exc:
            self.sock.close()
            os.close(log_r)
            raise ServerGone(str(exc)) from None
        finally:
            theirs.close()
            os.close(log_w)
        self.proc = Launched(pid, pidfd)
        threading.Thread(target=self._log, args=(open(log_r, "rb"),), name=f"forkserver-{pid}",
                         daemon=True).start()

    def _popen(self, env: dict[str, str], theirs: socket.socket) -> None:
        try:
            # started as `python SCRIPT`, exactly as a job would be (no flags), in the jobs' interpreter
            # variables: what it sets up at start (sys.flags, sys.path, encodings) is what the job finds
            proc = subprocess.Popen(
                [self.python, str(SERVER), str(theirs.fileno()), *self.preload], pass_fds=[theirs.fileno()],
                env={**env, "HOME": NO_HOME}, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, cwd="/")
        finally:
            theirs.close()
        self.proc = proc
        procs.spare(proc.pid)
        assert proc.stdout is not None
        threading.Thread(target=self._log, args=(proc.stdout,), name=f"forkserver-{proc.pid}",
                         daemon=True).start()

    def _log(self, pipe: IO[bytes]) -> None:
        with pipe:
            for line in pipe:
                log.warning("%s", line.decode("utf-8", "replace").rstrip())

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def _receive(self, timeout: float | None) -> tuple[Any, ...]:
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            raise ServerGone("the fork server did not answer in time") from None
        except OSError as exc:
            raise ServerGone(f"the fork server's socket failed: {exc}") from None
        if not data:
            raise ServerGone("the fork server is gone")
        message = marshal.loads(data)
        if not isinstance(message, tuple) or not message:
            raise ServerGone(f"the fork server said something unexpected: {message!r}")
        return message

    def fork(self, request: dict[str, Any]) -> ForkedProcess:
        """Have the server fork the job; ServerGone when it cannot, and then the job has not run."""
        payload = marshal.dumps(request, 4)
        if len(payload) > MAX_REQUEST:
            raise ServerGone("the job's arguments and environment are too large for the fork server")
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        go_r, go_w = os.pipe()
        pid = None
        try:
            try:
                self.sock.settimeout(FORK_TIMEOUT)
                self.sock.sendmsg([payload], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                               _fds(out_w, err_w, go_r))])
            except OSError as exc:
                raise ServerGone(f"could not reach the fork server: {exc}") from None
            for fd in (out_w, err_w, go_r):
                os.close(fd)
            out_w = err_w = go_r = -1
            reply = self._receive(FORK_TIMEOUT)
            if reply[0] == "error":
                # the child could not be set up (a cwd gone, a limit refused): the job fails to start, as it
                # would with Popen; the server lives on
                raise OSError(reply[1])
            if reply[0] != "pid":
                raise ServerGone(f"the fork server said {reply!r}")
            pid = int(reply[1])
            os.write(go_w, b"g")
        finally:
            for fd in (out_w, err_w, go_r, go_w):
                if fd >= 0:
                    os.close(fd)  # go_w closed without its byte: a child forked meanwhile leaves unrun
            if pid is None:
                os.close(out_r)
                os.close(err_r)
        return ForkedProcess(self, pid, open(out_r, "rb", buffering=0), open(err_r, "rb", buffering=0))

    def exit_status(self, pid: int) -> int:
        """The job's returncode, from the server; if the server died, from the kernel (it is ours now)."""
        try:
            while True:
                reply = self._receive(None)
                if reply[0] == "exit" and reply[1] == pid:
                    return int(reply[2])
        except ServerGone as exc:
            log.warning("fork server %d: %s while job process %d ran; the worker reaps it itself",
                        self.proc.pid, exc, pid)
        self.close()  # reaped: the kernel has re-parented the server's children to the worker by then
        _, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status)

    def release(self) -> None:
        try:
            self.sock.send(b"reap")
        except OSError as exc:  # gone: its children were the worker's to reap, and kill_leftovers did
            log.debug("fork server %d: %s", self.proc.pid, exc)

    def close(self) -> None:
        """Stop the server (a job it forked is a process group of its own and is not touched)."""
        try:
            self.sock.close()
        finally:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
            procs.unspare(self.proc.pid)


class Launched:
    """A fork server the launcher started: what Server uses of a Popen, through a pidfd (the launcher,
    its parent, reaps it; its status is not the worker's to know)."""

    def __init__(self, pid: int, pidfd: int) -> None:
        self.pid, self.pidfd = pid, pidfd
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None and self.pidfd >= 0 and select.select([self.pidfd], [], [], 0)[0]:
            self.returncode = -1
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.pidfd >= 0:
            try:
                signal.pidfd_send_signal(self.pidfd, sig)
            except ProcessLookupError:
                return

    def wait(self) -> int:
        if self.pidfd >= 0:
            select.select([self.pidfd], [], [])
            os.close(self.pidfd)
            self.pidfd = -1
            self.returncode = -1
        return -1


def _fds(*fds: int) -> bytes:
    import array
    return array.array("i", fds).tobytes()


class WarmPool:
    """The worker's fork servers, by key; used by one job at a time (the runner's)."""

    def __init__(self, *, enabled: bool = True, preload: tuple[str, ...] = (),
                 launcher: Launcher | None = None) -> None:
        self.enabled = enabled
        self.preload = preload
        #: with job uids: who starts the (privileged) servers; jobs with a uid start fresh without it
        self.launcher = launcher
        self._said_preloads = False
        self._servers: OrderedDict[tuple[Any, ...], Server] = OrderedDict()
        #: per key: failed starts in a row, and when the next may be tried
        self._failed: dict[tuple[Any, ...], tuple[int, float]] = {}
        self._options = _OptionsCache()
        self._lock = threading.Lock()

    def options(self, program: Path) -> ProgramOptions:
        return self._options.get(program)

    def launch(self, argv: list[str], *, fresh: bool, cwd: Path, env: dict[str, str],
               memory_rlimit: int | None, uid: int | None = None) -> ForkedProcess | None:
        """Fork the job (`argv`: interpreter, program, arguments; under `uid` if not None) from a warm
        interpreter, or None: start it fresh (it cannot be forked, or the server could not fork it;
        nothing of it ran)."""
        if not self.enabled or fresh or len(argv) < 2 or not argv[1].endswith(".py") or "HOME" in env and \
                env["HOME"] != str(cwd):
            return None
        program = Path(argv[1])
        options = self.options(program)
        if options.fresh:
            return None
        preload = tuple(sorted(set(self.preload) | set(options.preload if uid is None else ())))
        start_env = {k: v for k, v in env.items() if starts_interpreter(k)}
        rlimits = [] if memory_rlimit is None else [(resource.RLIMIT_DATA, memory_rlimit, memory_rlimit)]
        request: dict[str, Any] = {
            "argv": argv, "script": argv[1], "path0": os.path.dirname(os.path.realpath(argv[1])),
            "cwd": str(cwd), "env": env, "rlimits": rlimits, "uid": uid}
        python = argv[0]
        if uid is not None:
            found = self._uid_mode(argv[0], env, start_env, options.preload)
            if found is None:
                return None
            request["executable"], python = found
            start_env = {}
        key = (python, preload, tuple(sorted(start_env.items())), uid is not None)
        with self._lock:
            server = self._server(key, python, preload, start_env)
            if server is None:
                return None
            try:
                return server.fork(request)
            except ServerGone as exc:
                log.warning("fork server %d: %s; the job starts fresh, and the server is replaced",
                            server.proc.pid, exc)
                self._drop(key)
                return None

    def _uid_mode(self, interpreter: str, env: dict[str, str], start_env: dict[str, str],
                  ignored: tuple[str, ...]) -> tuple[str, str] | None:
        """For a job under a uid of its own: the interpreter as the job would see it (sys.executable)
        and the real one the server runs, or None when the job must start fresh."""
        if self.launcher is None:
            return None
        locale = {k: v for k, v in start_env.items() if not k.startswith("PYTHON") and k != "PATH"}
        if locale != {k: v for k, v in SERVER_ENV.items() if k != "PATH" and k != "HOME"} or \
                not set(start_env) <= UID_MODE_VARIABLES | {"LANG"}:
            return None  # what -I would ignore, or another locale: only a fresh start honours it
        exe = interpreter if "/" in interpreter else shutil.which(interpreter, path=env.get("PATH"))
        if exe is None:
            return None
        if ignored and not self._said_preloads:
            self._said_preloads = True
            log.warning("a program's own preloads (%s) are ignored for jobs under their own uids: the fork "
                        "server is privileged, and imports only the worker's preloads, from the standard "
                        "library (README: The warm interpreter)", ", ".join(ignored))
        exe = os.path.abspath(exe)
        return exe, os.path.realpath(exe)

    def _server(self, key: tuple[Any, ...], python: str, preload: tuple[str, ...],
                env: dict[str, str]) -> Server | None:
        server = self._servers.get(key)
        if server is not None and not server.alive:
            log.warning("fork server %d died (%s); a new one starts", server.proc.pid, server.proc.returncode)
            self._drop(key)
            server = None
        if server is not None:
            self._servers.move_to_end(key)
            return server
        failures, not_before = self._failed.get(key, (0, 0.0))
        if time.monotonic() < not_before:
            return None
        try:
            server = Server(python, preload, env, self.launcher if key[-1] else None)
        except (OSError, ServerGone) as exc:
            # the next job tries again at once (the server may have been killed from outside); a server
            # that keeps failing is tried after 1, 2, 4 ... RETRY_AFTER seconds, its jobs starting fresh
            delay = 0.0 if failures == 0 else min(RETRY_AFTER, 2.0 ** (failures - 1))
            log.warning("could not start a fork server for %s (%s); its jobs start fresh%s", python, exc,
                        f" for {delay:g} s" if delay else "")
            self._failed[key] = (failures + 1, time.monotonic() + delay)
            return None
        self._failed.pop(key, None)
        if server.failed:
            log.warning("fork server %d for %s could not preload %s", server.proc.pid, python,
                        ", ".join(server.failed))
        self._servers[key] = server
        while len(self._servers) > MAX_SERVERS:
            self._drop(next(iter(self._servers)))
        return server

    def _drop(self, key: tuple[Any, ...]) -> None:
        server = self._servers.pop(key, None)
        if server is not None:
            server.close()

    def servers(self) -> list[Server]:
        with self._lock:
            return list(self._servers.values())

    def close(self) -> None:
        with self._lock:
            while self._servers:
                self._drop(next(iter(self._servers)))
            if self.launcher is not None:
                self.launcher.close()
                procs.unspare(self.launcher.pid)
                self.launcher = None
