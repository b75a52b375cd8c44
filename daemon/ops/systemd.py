"""systemd integration: the sd_notify protocol (READY, STATUS, WATCHDOG, STOPPING) and the unit file.

The protocol is one datagram per message to the socket named by $NOTIFY_SOCKET (sd_notify(3)); it is
short enough to speak directly rather than depend on a binding. Without $NOTIFY_SOCKET (not started by
systemd) every call does nothing.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import dropq
from dropq.config import Config
from dropq.errors import DropqError
from dropq.ops import workspace

log = logging.getLogger("dropq.systemd")

UNIT_DIR = Path("/etc/systemd/system")
HOME_LIKE = (Path("/home"), Path("/root"), Path("/run/user"))


def checkout_readme(package: Path | None = None) -> Path | None:
    """The README of the checkout this runs from (an editable install), which has the service's section.

    Installed from a wheel, the package is site-packages/dropq/ and there is no checkout: whatever
    README.md lies in site-packages is another project's, so none is named."""
    package = Path(dropq.__file__).resolve().parent if package is None else package
    readme = package.parent / "README.md"
    in_checkout = package.name == "daemon" and (package.parent / "pyproject.toml").is_file()
    return readme if in_checkout and readme.is_file() else None


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        # an abstract socket is written "@name" and means a leading NUL byte
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self._sock: socket.socket | None = None
        if self._address:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        # WATCHDOG_PID names the process meant to ping; a child that inherited the variables is not it
        wanted = usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid()))
        #: how often WATCHDOG=1 must be sent; half the timeout systemd will wait, as sd_watchdog_enabled(3) advises
        self.watchdog_interval: float | None = int(usec) / 1e6 / 2 if wanted else None
        self._clock = clock
        self._last_ping = float("-inf")
        self._lock = threading.Lock()
        self._last_status = ""

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, *fields: str) -> None:
        if self._sock is None:
            return
        try:
            self._sock.sendto("\n".join(fields).encode(), self._address)
        except OSError as exc:
            # systemd gone or the socket unreadable: the daemon works on, only unsupervised
            log.warning("could not notify systemd at %s: %s", self._address.replace("\0", "@"), exc.strerror)

    def ready(self, status: str) -> None:
        self._last_status = status
        self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, text: str) -> None:
        if text != self._last_status:
            self._last_status = text
            self.send(f"STATUS={text}")

    def watchdog(self) -> None:
        """Ping the watchdog if it is due; cheap to call from a loop that turns often."""
        if self.watchdog_interval is None:
            return
        now = self._clock()
        with self._lock:
            if now - self._last_ping < self.watchdog_interval:
                return
            self._last_ping = now
        self.send("WATCHDOG=1")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=shutting down")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


# --- the unit file ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class UnitPaths:
    """What the unit opens in a filesystem that ProtectSystem=strict makes read-only."""

    #: the workspace: inbox, outbox and state in one bind mount, so that renames between them work
    workspace: Path
    #: read-only inside the workspace: the programs and the configuration file
    protected: tuple[Path, ...]
    #: outside the workspace, needed to run: the config's folder, the programs, the virtualenv, the
    #: interpreter it was made from, and the source of an editable install
    readable: tuple[Path, ...]

    @classmethod
    def of(cls, config: Config, *, exe: Path) -> UnitPaths:
        if config.source is None:
            raise DropqError("the unit needs the configuration's file (Config.load sets it)")
        ws = workspace.root(config)
        inside = [p for p in (config.programs, config.source) if p.is_relative_to(ws)]
        needed = [config.programs, config.source.parent, _install_root(exe), *_runtime_roots()]
        outside = [p for p in needed if not p.is_relative_to(ws)]
        return cls(workspace=ws, protected=tuple(_unique(inside)), readable=tuple(_outermost(outside)))

    def everything(self) -> list[Path]:
        return [self.workspace, *self.protected, *self.readable]


def unit_text(config: Config, *, exe: Path, user: str | None = None, watchdog_sec: int = 30) -> str:
    """A unit for `dropq run` on `config`, sandboxed to the workspace it names."""
    paths = UnitPaths.of(config, exe=exe)
    assert config.source is not None  # UnitPaths.of checked it
    readme = checkout_readme()
    lines = [
        "# Installed by `dropq service install`. Re-run that command after changing paths in the config.",
        "[Unit]",
        f"Description=dropq drop-folder batch processor ({config.source})",
        # the docker pool wants the engine up first; with the local pool this orders nothing
        "After=network.target docker.service",
        *([f"Documentation=file://{readme}"] if readme else []),
        "",
        "[Service]",
        # READY=1 is sent once the inbox is watched and the pool is up; WATCHDOG=1 comes from the intake
        # loop, so a daemon whose loop is stuck stops pinging and is restarted
        "Type=notify",
        "NotifyAccess=main",
        f"ExecStart={shlex.join([str(exe), '--config', str(config.source), 'run'])}",
        f"WorkingDirectory={paths.workspace}",
        "Restart=on-failure",
        "RestartSec=2",
        # exit 3 is a configuration error (a bad key, a workspace split over mounts): restarting cannot
        # cure it, so the unit fails at once with the reason in the journal instead of looping
        "RestartPreventExitStatus=3",
        f"WatchdogSec={watchdog_sec}",
        # building or adopting worker containers can take a while at the first start
        "TimeoutStartSec=180",
        # a running job is requeued or left for adoption on SIGTERM; give the slots time to say so
        f"TimeoutStopSec={int(max(30, config.jobs.kill_grace + 20))}",
        # SIGTERM goes to the daemon alone, which stops its local workers itself and leaves docker
        # containers running for the next start to adopt (they are in dockerd's cgroup, not ours);
        # only what is still in our cgroup when the stop times out is killed
        "KillMode=mixed",
        "Environment=PYTHONUNBUFFERED=1",
    ]
    if user:
        lines.append(f"User={user}")
        if _group_exists("docker"):
            lines.append("SupplementaryGroups=docker")  # the docker pool talks to the engine's socket
    lines += [
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        # ONE writable path: systemd makes each entry a bind mount of its own, and rename() across two
        # mounts fails (EXDEV) even on one filesystem, which would break every claim and every commit
        "ReadWritePaths=" + _quote(paths.workspace),
    ]
    if paths.protected:
        lines.append("ReadOnlyPaths=" + " ".join("-" + _quote(p) for p in paths.protected))
    lines += _socket_lines(config, paths.workspace)
    sock = [config.http.socket] if config.http.enabled and config.http.socket is not None else []
    if any(_is_under_tmp(p) for p in [*paths.everything(), *sock]):
        # PrivateTmp=yes would mount a fresh /tmp over the workspace (226/NAMESPACE at start)
        lines.append("# PrivateTmp is off: the workspace is under a temporary folder")
    else:
        lines.append("PrivateTmp=yes")
    lines += [
        "ProtectKernelTunables=yes",
        "ProtectControlGroups=yes",
        "RestrictSUIDSGID=yes",
        "LockPersonality=yes",
    ]
    if any(_is_under_home(p) for p in paths.everything()):
        # ProtectHome=yes would hide them; a tmpfs over the homes with what is needed bound back in keeps
        # every other home out of reach
        lines.append("ProtectHome=tmpfs")
        if _is_under_home(paths.workspace):
            lines.append("BindPaths=" + _quote(paths.workspace))
        ro = [p for p in paths.readable if _is_under_home(p)]
        if ro:
            lines.append("BindReadOnlyPaths=" + " ".join(_quote(p) for p in ro))
    else:
        lines.append("ProtectHome=yes")
    lines += ["", "[Install]", "WantedBy=multi-user.target", ""]
    return "\n".join(lines)


def install(config: Config, *, name: str = "dropq", unit_dir: Path = UNIT_DIR, user: str | None = None,
            exe: Path | None = None, start: bool = False) -> list[str]:
    """Check what can be checked, make the workspace's folders, write the unit; with `start`, also reload
    systemd, enable the unit and start it, and undo the enabling if it does not come up.

    Returns what was done, a line each. Raises DropqError with a sentence rather than install a unit
    that cannot work."""
    exe = exe or dropq_executable()
    text = unit_text(config, exe=exe, user=user)  # refuses a workspace with no folder of its own
    owner = _user_ids(user) if user else None
    said: list[str] = []
    if not config.programs.is_dir():
        raise DropqError(f"the programs folder {config.programs} does not exist; make it (programs jobs may "
                         "run go there) and run this again")
    for folder in (config.inbox, config.outbox, config.state, config.spool, config.workers_dir):
        # systemd sets up the namespace before dropq runs: a missing folder would fail with 226/NAMESPACE
        made = _make(folder, owner)
        if made and folder in (config.inbox, config.outbox, config.state):
            said.append(f"made {folder}")
    workspace.check_renames(config)
    if any(_is_under_tmp(p) for p in (config.inbox, config.outbox, config.state)):
        said.append(f"warning: the workspace {workspace.root(config)} is under a temporary folder, which the "
                    "system may clean (systemd-tmpfiles removes old files in /tmp); prefer /srv or /var/lib")
    unit_dir.mkdir(parents=True, exist_ok=True)
    path = unit_dir / f"{name}.service"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    said.append(f"wrote {path}")
    if start:
        _start(name)
        said.append(f"started {name}.service; follow it with: journalctl -u {name} -f")
    else:
        said.append(f"start it with: systemctl daemon-reload && systemctl enable --now {name}")
    return said


def _make(folder: Path, owner: tuple[int, int] | None) -> bool:
    """mkdir -p, giving each folder it makes to `owner` (the service's user must write in them)."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    for path in reversed(missing):
        path.mkdir()
        if owner is not None:
            os.chown(path, *owner)
    return bool(missing)


def _start(name: str) -> None:
    systemctl = shutil.which("systemctl")
    if systemctl is None:
        raise DropqError("systemctl is not on PATH; the unit is written, but cannot be started here")
    unit = f"{name}.service"
    for argv in ([systemctl, "daemon-reload"], [systemctl, "enable", unit]):
        _systemctl(argv)
    # Type=notify: restart returns once the daemon said READY=1, or fails if it exited first
    started = subprocess.run([systemctl, "restart", unit], capture_output=True, text=True, check=False)
    if started.returncode == 0:
        return
    # an enabled unit that cannot start would restart for ever and start again at every boot
    subprocess.run([systemctl, "disable", "--now", unit], capture_output=True, check=False)
    journal = subprocess.run(["journalctl", "-u", unit, "-n", "8", "--no-pager", "-o", "cat"],
                             capture_output=True, text=True, check=False).stdout.strip()
    raise DropqError(f"{unit} did not start, so it was stopped and disabled again; its last log lines:\n"
                     f"{journal or started.stderr.strip()}")


def _systemctl(argv: list[str]) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise DropqError(f"{shlex.join(argv)} failed: {done.stderr.strip() or done.returncode}")


def _user_ids(user: str) -> tuple[int, int]:
    import pwd

    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise DropqError(f"there is no user {user!r} on this system; create it or leave out --user") from None
    return entry.pw_uid, entry.pw_gid


def _runtime_roots() -> list[Path]:
    """Where the code that runs lives: the interpreter a virtualenv points at (pyenv's is under /root, which
    ProtectHome hides), and the source folders of an editable install (the checkout, possibly in a home)."""
    import dropq_worker

    roots = [Path(sys.base_prefix).resolve()]
    for package in (Path(dropq.__file__), Path(dropq_worker.__file__)):
        roots.append(package.resolve().parent.parent)
    return roots


def dropq_executable() -> Path:
    """The `dropq` script of the environment this runs in (the unit must not depend on PATH)."""
    candidate = Path(sys.executable).parent / "dropq"
    if candidate.exists():
        return candidate
    found = shutil.which("dropq")
    if found is None:
        raise DropqError("cannot find the dropq command to put in the unit; pass --exe")
    return Path(found).resolve()


def _install_root(exe: Path) -> Path:
    # .venv/bin/dropq -> .venv: the interpreter and the packages must stay readable
    return exe.parent.parent if exe.parent.name == "bin" else exe.parent


def _is_under_home(path: Path) -> bool:
    return any(path.is_relative_to(home) for home in HOME_LIKE)


def _socket_lines(config: Config, ws: Path) -> list[str]:
    """Where the dashboard's Unix socket (http.socket) may be made under ProtectSystem=strict: under /run,
    a RuntimeDirectory (made for the daemon's user at start, removed at stop; 0755, since the socket's
    own mode 0660 decides who connects); elsewhere outside the workspace, its folder writable."""
    sock = config.http.socket
    if not config.http.enabled or sock is None or sock.is_relative_to(ws):
        return []
    if sock.parent.is_relative_to("/run") and sock.parent != Path("/run"):
        return [f"RuntimeDirectory={_quote(sock.parent.relative_to('/run'))}", "RuntimeDirectoryMode=0755"]
    return ["ReadWritePaths=-" + _quote(sock.parent)]


def _is_under_tmp(path: Path) -> bool:
    return any(path.is_relative_to(tmp) for tmp in (Path("/tmp"), Path("/var/tmp")))


def _outermost(paths: list[Path]) -> list[Path]:
    """The paths with any inside another one left out (a bind of the outer one covers it)."""
    unique = _unique(paths)
    return [p for p in unique if not any(p != q and p.is_relative_to(q) for q in unique)]


def _unique(paths: list[Path]) -> list[Path]:
    out: list[Path] = []
    for p in paths:
        if p not in out:
            out.append(p)
    return out


def _quote(path: Path) -> str:
    # systemd splits these lists on spaces; it takes C-style quotes around a path that has one
    text = str(path)
    return f'"{text}"' if any(c.isspace() for c in text) else text


def _group_exists(group: str) -> bool:
    import grp

    try:
        grp.getgrnam(group)
    except KeyError:
        return False
    return True
