"""The one process that may start fork servers able to switch uids (warm interpreters under --job-uids).

A worker that runs jobs under uids of their own empties its bounding set at start, so nothing it
executes holds a capability: a fork server it started itself would be root without any, unable to
become a job's uid. So, just before the worker empties its bounding set, it forks this launcher. The
launcher keeps in its bounding set only SETUID, SETGID and SETPCAP, and does one thing: on the worker's
request it executes a fork server (forkserver.py, `-I -S`: isolated, no site, so only the standard
library, root's) with a trusted interpreter, which then holds exactly those three capabilities. Each
job the server forks empties its bounding set, takes the job's uid and gid with no supplementary
groups, checks that it holds no capability any more, and only then runs the environment's `site`
(its `.pth` files) and the program: no code of an environment ever runs with a privilege.

Trusted interpreter: the real path of the job's interpreter must be one of the worker's own (its
`--python`, or the interpreter the worker runs on), owned by root in folders only root may write.
An environment's `bin/python` was made by its build, which ran packages' code: the server never
executes it, nor reads its `pyvenv.cfg` (the child finds the environment as the job's uid, in
`site.venv`). A job whose interpreter fails the check starts fresh.

    worker -> launcher   marshal (INTERPRETER, PRELOADS) with two descriptors: the server's end of its socket,
                         and where its log lines go
    launcher -> worker   marshal ("pid", PID) with the server's pidfd, or ("error", TEXT)
"""

from __future__ import annotations

import ctypes
import marshal
import os
import shutil
import signal
import socket
import stat
import sys
from pathlib import Path

#: the fork server's script (as warm.SERVER)
SERVER = Path(__file__).with_name("forkserver.py")

_PR_CAPBSET_DROP = 24
#: CAP_SETGID, CAP_SETUID, CAP_SETPCAP: what a fork server needs to make each child a job's uid
KEPT = (6, 7, 8)
#: the fork server's whole environment (never the job's: the server is privileged)
SERVER_ENV = {"LANG": "C.UTF-8", "PATH": "/usr/bin:/bin", "HOME": "/nonexistent"}


class LauncherError(RuntimeError):
    """The launcher cannot start a fork server (gone, or the interpreter is not trusted)."""


def trusted_interpreters(python: str) -> frozenset[str]:
    """The real paths of the interpreters the worker itself trusts: its --python and its own."""
    found = {os.path.realpath(sys.executable)}
    exe = python if "/" in python else shutil.which(python)
    if exe:
        found.add(os.path.realpath(exe))
    return frozenset(found)


def check_interpreter(real: str, trusted: frozenset[str]) -> str | None:
    """Why `real` may not run as a privileged fork server, or None when it may."""
    if real not in trusted:
        return f"{real} is not one of the worker's own interpreters"
    try:
        st = os.stat(real)
    except OSError as exc:
        return f"{real}: {exc.strerror}"
    if not stat.S_ISREG(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
        return f"{real} is not a file only root may change"
    for folder in Path(real).parents:
        st = os.stat(folder)
        if st.st_uid != 0 or st.st_mode & 0o022:
            return f"{folder} is not a folder only root may change"
    return None


class Launcher:
    """The worker's end: a socket to the launcher process, which it forked at start."""

    def __init__(self, pid: int, sock: socket.socket) -> None:
        self.pid, self.sock = pid, sock

    @classmethod
    def start(cls, python: str) -> Launcher:
        """Fork the launcher; call before the worker empties its bounding set, while it is one thread."""
        trusted = trusted_interpreters(python)
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the launcher's own loop; it never returns
            code = 0
            try:
                mine.close()
                _serve(theirs, trusted)
            except BaseException as exc:  # noqa: BLE001 - a forked child must never return into the worker
                os.write(2, f"dropq launcher: {type(exc).__name__}: {exc}\n".encode())
                code = 1
            os._exit(code)
        theirs.close()
        return cls(pid, mine)

    def spawn(self, python: str, preload: tuple[str, ...], server_end: int, log_w: int) -> tuple[int, int]:
        """Have the launcher start a fork server with `python`, importing the standard library's `preload`
        modules (the worker's own): its pid and a pidfd of it."""
        try:
            self.sock.settimeout(30)
            self.sock.sendmsg([marshal.dumps((python, list(preload)))],
                              [(socket.SOL_SOCKET, socket.SCM_RIGHTS, _ints(server_end, log_w))])
            data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(4))
        except OSError as exc:
            raise LauncherError(f"the launcher is not answering: {exc}") from None
        fds = _received(ancillary)
        if not data:
            raise LauncherError("the launcher is gone")
        reply = marshal.loads(data)
        if reply[0] != "pid" or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise LauncherError(str(reply[1]) if reply[0] == "error" else f"the launcher said {reply!r}")
        return int(reply[1]), fds[0]

    def close(self) -> None:
        """The launcher leaves when its socket closes; it is the worker's child, reaped here."""
        self.sock.close()
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass  # reaped already (kill_leftovers at the worker's end)


def _ints(*fds: int) -> bytes:
    import array
    return array.array("i", fds).tobytes()


def _received(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    import array
    fds: list[int] = []
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % 4
            fds.extend(array.array("i", data[:usable]))
    return fds


def _serve(sock: socket.socket, trusted: frozenset[str]) -> None:  # pragma: no cover - in the launcher
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in range(64):
        if cap in KEPT:
            continue
        if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            if ctypes.get_errno() == 22:  # EINVAL: past the last capability the kernel knows
                break
            raise OSError(ctypes.get_errno(), f"could not drop capability {cap}")
    _clear_inheritable(libc)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a ^C to the worker's group is the worker's to handle
    keep = sock.fileno()
    os.closerange(3, keep)
    os.closerange(keep + 1, 1 << 16)
    sock.settimeout(10)
    while True:
        _reap()
        try:
            data, ancillary, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(8))
        except TimeoutError:
            continue
        fds = _received(ancillary)
        if not data:
            return  # the worker closed its end
        _answer(sock, data, fds, trusted)


def _answer(sock: socket.socket, data: bytes, fds: list[int],
            trusted: frozenset[str]) -> None:  # pragma: no cover - in the launcher
    """Start the server one request asks for, and say its pid (with a pidfd) or why not."""
    try:
        request = marshal.loads(data)
        python, preload = str(request[0]), [str(name) for name in request[1]]
        if len(fds) != 2:
            raise LauncherError("a request without its two descriptors")
        why = check_interpreter(python, trusted)
        if why is not None:
            raise LauncherError(why)
        pid = _start_server(python, preload, fds[0], fds[1])
        pidfd = os.pidfd_open(pid)
    except (OSError, LauncherError, ValueError, EOFError, TypeError, IndexError) as exc:
        sock.sendmsg([marshal.dumps(("error", str(exc)))])
    else:
        sock.sendmsg([marshal.dumps(("pid", pid))], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, _ints(pidfd))])
        os.close(pidfd)
    finally:
        for fd in fds:
            os.close(fd)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _clear_inheritable(libc: ctypes.CDLL) -> None:  # pragma: no cover - in the launcher
    """No inheritable or ambient capability: a server holds only what the bounding set leaves it (an
    engine that gives containers inheritable capabilities would otherwise pass them on)."""
    header = _CapHeader(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
    data = (_CapData * 2)()
    if libc.capget(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capget failed")
    data[0].inheritable = data[1].inheritable = 0
    if libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset failed")
    libc.prctl(47, 4, 0, 0, 0)  # PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL


def _reap() -> None:  # pragma: no cover - in the launcher
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _start_server(python: str, preload: list[str], server_end: int,
                  log_w: int) -> int:  # pragma: no cover - in the launcher
    pid = os.fork()
    if pid == 0:
        try:
            null = os.open("/dev/null", os.O_RDWR)
            os.dup2(null, 0)
            os.dup2(log_w, 1)
            os.dup2(log_w, 2)
            os.dup2(server_end, 3)
            os.closerange(4, 1 << 16)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.chdir("/")
            # -I -S: no PYTHON* variables, no user site, no site at all (no .pth file), no script folder
            # (its sys.path is then the standard library alone: a preload can be nothing else)
            os.execve(python, [python, "-I", "-S", str(SERVER), "3", "--job-uids", *preload], SERVER_ENV)
        except BaseException as exc:  # noqa: BLE001 - a forked child must never return into the launcher
            os.write(2, f"dropq launcher: could not start a fork server: {exc}\n".encode())
        os._exit(127)
    return pid
