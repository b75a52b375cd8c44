"""The dashboard's Unix socket (http.socket): made so that only the daemon's user and one group can connect."""

from __future__ import annotations

import errno
import grp
import os
import socket
import stat
from pathlib import Path

from dropq.errors import ConfigError

#: the Unix socket's mode: the daemon's user and the socket's group may connect, nobody else
SOCKET_MODE = 0o660


def listen_unix(path: Path, group: str | int | None) -> socket.socket:
    """A listening Unix socket at `path`, mode 0660, of `group`. Its mode and group are set before
    listen(): until then a connect() is refused, so there is no moment when anyone else could connect.
    ConfigError for every reason it cannot be made."""
    gid = _gid(group)
    _clear_stale_socket(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot serve the dashboard on the socket {path}: {exc.strerror or exc}") from None
    try:
        os.chmod(path, SOCKET_MODE)
        if gid is not None:
            os.chown(path, -1, gid)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        path.unlink(missing_ok=True)
        if exc.errno == errno.EPERM:
            raise ConfigError(f"cannot give the socket {path} the group {group}: the daemon's user must be root "
                              "or a member of http.socket_group") from None
        raise ConfigError(f"cannot serve the dashboard on the socket {path}: {exc.strerror or exc}") from None
    return sock


def _gid(group: str | int | None) -> int | None:
    if group is None or isinstance(group, int):
        return group
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        if group.isdigit():
            return int(group)
        raise ConfigError(f"http.socket_group: there is no group {group!r} on this host") from None


def _clear_stale_socket(path: Path) -> None:
    """Remove a socket left at `path` by an earlier run; refuse a socket another server answers on, and
    anything that is not a socket."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ConfigError(f"http.socket {path} exists and is not a socket; remove it or choose another path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink(missing_ok=True)  # nobody listens: left by a daemon that was killed
        return
    finally:
        probe.close()
    raise ConfigError(f"http.socket {path}: another server answers on it; stop it or choose another path")


def remove_socket(path: Path, inode: int) -> None:
    """Remove the socket at `path` if it is still the one made (inode `inode`), not one a later daemon made."""
    try:
        ours = os.lstat(path).st_ino == inode
    except FileNotFoundError:
        return
    if ours:
        path.unlink(missing_ok=True)
