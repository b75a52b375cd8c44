"""The workspace: the one folder that holds the inbox, the outbox and the state, and the renames within it.

dropq moves a job by rename() only: inbox -> spool at the claim, staging -> spool -> outbox at the commit.
rename() fails with EXDEV across mount points, even two bind mounts of one filesystem (which is what
systemd makes of each `ReadWritePaths=` entry). So the daemon checks once at start, with a probe file,
that each of those renames works, and refuses to start with one line naming the two paths when one
does not, rather than failing job by job. The unit `dropq service install` writes binds the whole
workspace as one path for the same reason.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from dropq.config import Config
from dropq.errors import LayoutError

#: the probe's file name; a dotfile, so the intake never takes it for a manifest
PROBE_PREFIX = ".dropq-probe-"

#: folders that must never become the service's writable workspace: that would open the system to it
SYSTEM_FOLDERS = frozenset(Path(p) for p in ("/", "/bin", "/boot", "/dev", "/etc", "/lib", "/lib64", "/opt",
                                             "/proc", "/run", "/sbin", "/srv", "/sys", "/tmp", "/usr",
                                             "/var", "/var/tmp", "/home", "/root", "/mnt", "/media"))


def root(config: Config) -> Path:
    """The deepest folder holding the inbox, the outbox and the state: the service's one writable path."""
    common = Path(os.path.commonpath([config.inbox, config.outbox, config.state]))
    if common in SYSTEM_FOLDERS:
        raise LayoutError(
            f"the inbox ({config.inbox}), outbox ({config.outbox}) and state ({config.state}) have no folder "
            f"in common but {common}; dropq moves jobs between them by rename, so put all three in one "
            "workspace folder (for example inbox, outbox and state beside config.yaml)")
    return common


def check_renames(config: Config) -> None:
    """Raise LayoutError unless a file can be renamed inbox -> spool -> outbox and staging -> outbox.

    Each folder must exist. Leftover probes of an earlier run that died mid-probe are removed first."""
    steps = [("inbox", config.inbox, "spool", config.spool),
             ("spool", config.spool, "outbox", config.outbox),
             ("the workers' staging", config.workers_dir, "outbox", config.outbox)]
    for folder in {config.inbox, config.spool, config.outbox, config.workers_dir}:
        _remove_stale_probes(folder)
    name = f"{PROBE_PREFIX}{os.getpid()}"
    for src_what, src_dir, dst_what, dst_dir in steps:
        src, dst = src_dir / name, dst_dir / name
        fd = os.open(src, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        os.close(fd)
        try:
            os.rename(src, dst)
        except OSError as exc:
            os.unlink(src)
            if exc.errno == errno.EXDEV:
                raise LayoutError(
                    f"{src_what} ({src_dir}) and {dst_what} ({dst_dir}) are on different mounts, so a job "
                    "cannot be moved between them by rename; put them on one filesystem, and under systemd "
                    "give the unit one ReadWritePaths= for the whole workspace (as `dropq service install` "
                    "does)") from None
            raise LayoutError(f"a test file could not be moved from {src_what} ({src_dir}) to {dst_what} "
                              f"({dst_dir}): {exc.strerror}") from None
        os.unlink(dst)


def _remove_stale_probes(folder: Path) -> None:
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.startswith(PROBE_PREFIX) and entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
