"""Watching the inbox with watchdog, and deciding when a dropped file is complete.

How a file arrives decides when it is complete (`Arrival`):

- **whole**: renamed into the inbox (from inside or outside it), or linked in by a name, as Qt's
  QSaveFile does (an unnamed `O_TMPFILE` written, then `linkat()` to its name): taken at once.
  `generate_full_events=True` is what lets a rename from outside the inbox (IN_MOVED_TO with no
  partner) be told apart from a file created in place: watchdog reports the first as a FileMovedEvent
  with an empty source, the second as a FileCreatedEvent.
- **closed**: written in place and closed (inotify's IN_CLOSE_WRITE), so a person typing a manifest
  with `cat > inbox/x.yaml` is never read early, however long they pause. It is taken after a quiet
  period (`QUIET_AFTER_CLOSE`) in which nothing touched it, because clients like `rsync --inplace` and
  `unzip` close the file and then set its times and mode by path: taken at the close, the file is
  gone under them and they fail (rsync exits 23).
- **changed**: seen changed where no close event tells (the polling observer, used on network
  filesystems or when inotify instances are exhausted): taken once unchanged for `intake.settle`.

Only the top level of the inbox is watched: that is where manifests are. Input files in
subfolders are taken once unchanged for the settle time.

The watcher reports; `completeness.Completeness` applies these rules to what it reports, through
`InboxView` (what the watcher knows about writers), so the intake only claims what is complete.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import threading
import time
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Protocol

from watchdog.events import (
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

log = logging.getLogger("dropq.watcher")


def _no_move_pairing_delay() -> None:
    """watchdog holds every IN_MOVED_FROM for 0.5 s, in a FIFO queue, hoping to pair it with its
    IN_MOVED_TO. Each claim renames a manifest out of the inbox, an IN_MOVED_FROM that never pairs,
    so every event behind it waited up to half a second: that was most of dropq's pick-up latency.
    dropq needs no pairing (any IN_MOVED_TO means "renamed in, complete"), so the delay is 0. The
    attribute lives on the move grouper in watchdog >= 7, and on the inotify buffer before."""
    for module, cls in (("watchdog.observers.inotify_move_event_grouper", "InotifyMoveEventGrouper"),
                        ("watchdog.observers.inotify_buffer", "InotifyBuffer")):
        try:
            owner = getattr(__import__(module, fromlist=[cls]), cls)
        except (ImportError, AttributeError):
            continue
        owner.delay = 0.0

#: seconds a file closed after writing in place must stay untouched before it is taken. Measured on
#: this project's CI machine (strace -f -ttt, 30 runs each; see the commit that introduced it): after
#: its close, `rsync -a --inplace` sets the times by path and the mode through a new open 0.18 ms
#: later (12 ms at most under strace), `unzip` sets the times by path 0.02 ms later (0.06 ms at
#: most), `cp -p` does everything through its open file before the close. Half a second leaves a wide
#: margin for a loaded machine and costs in-place writers only that much latency; renames stay instant.
QUIET_AFTER_CLOSE = 0.5

#: the name an unnamed file (opened with O_TMPFILE in the inbox) has in inotify's events: `#<inode>`
_UNNAMED = re.compile(r"#(\d+)")


class Arrival(StrEnum):
    """How a file came into the inbox, which decides when it is complete (see the module's docstring)."""

    #: renamed or linked in: complete at once
    WHOLE = "whole"
    #: closed after writing in place: complete once untouched for QUIET_AFTER_CLOSE seconds
    CLOSED = "closed"
    #: changed where no close event tells (polling): complete once unchanged for intake.settle seconds
    CHANGED = "changed"


#: called with (path relative to the inbox, how it arrived)
Listener = Callable[[str, Arrival], None]


class InboxView(Protocol):
    """What the watcher knows about the writers of the inbox's files, as the completeness rules ask it.
    `InboxWatcher` is the one real implementation; unit tests pass a small fake."""

    def being_written(self, rel: str) -> bool:
        """Whether a writer still has `rel` open, as far as the events seen so far tell."""
        ...

    def mark_being_written(self, rel: str) -> None:
        """A writer has `rel` open (found open at start): its close event will say when it is complete."""
        ...

    def release_abandoned(self) -> list[str]:
        """Forget "being written" marks no open file backs any more (a close event lost); the names."""
        ...

    def open_now(self) -> set[tuple[int, int]] | None:
        """(device, inode) of the files some process has open; None when that cannot be known."""
        ...


class InboxWatcher(FileSystemEventHandler):
    def __init__(self, *, inbox: Path, mode: str, on_file: Listener) -> None:
        self.inbox = inbox
        self.mode = mode
        self._on_file = on_file
        self._writing: set[str] = set()
        self._since: dict[str, float] = {}
        #: inodes of unnamed files (O_TMPFILE) a writer has open in the inbox: a name that appears
        #: with one of them was linked in whole
        self._unnamed: set[int] = set()
        self._lock = threading.Lock()
        self._observer: BaseObserver | None = None
        self.kind = "none"

    def start(self) -> None:
        if self.mode == "auto" and (fs := network_filesystem(self.inbox)):
            log.warning("the inbox is on a network filesystem (%s), where inotify misses other hosts' "
                        "writes; polling it instead", fs)
            self._start(PollingObserver(timeout=1.0), "polling")
            return
        if self.mode in ("auto", "inotify"):
            try:
                from watchdog.observers.inotify import InotifyObserver

                _no_move_pairing_delay()
                self._start(InotifyObserver(generate_full_events=True), "inotify")
                return
            except (ImportError, OSError) as exc:
                # EMFILE: out of inotify instances; ENOSPC: out of watches (fs.inotify.max_user_*)
                if self.mode == "inotify":
                    raise
                log.warning("inotify is unavailable (%s); polling the inbox instead", exc)
        self._start(PollingObserver(timeout=1.0), "polling")

    def _start(self, observer: BaseObserver, kind: str) -> None:
        filters = [FileCreatedEvent, FileModifiedEvent, FileClosedEvent, FileMovedEvent, FileDeletedEvent]
        # Top level only. A recursive watch makes watchdog synthesise IN_CREATE events for the files
        # it finds in a new subfolder, indistinguishable from a writer creating them, which would
        # hold such a file as "being written" for ever. Inputs in subfolders are settled by age.
        observer.schedule(self, str(self.inbox), recursive=False, event_filter=filters)
        observer.start()
        self._observer, self.kind = observer, kind
        log.info("watching %s with %s", self.inbox, self.kind)

    def stop(self) -> None:
        if self._observer is not None:
            # watchdog 7 logs an ERROR from its emitter thread when the observer is stopped while the
            # thread waits for events; it is the normal path of a shutdown, not an error
            logging.getLogger("watchdog.observers.inotify").addFilter(
                lambda record: "thread is inactive" not in record.getMessage())
            self._observer.stop()
            self._observer.join(timeout=10)
            self._observer = None

    @property
    def has_close_events(self) -> bool:
        return self.kind == "inotify"

    def being_written(self, rel: str) -> bool:
        """Whether a writer still has `rel` open, as far as the events seen so far tell."""
        with self._lock:
            return rel in self._writing

    def _rel(self, path: str | bytes) -> str | None:
        text = os.fsdecode(path)
        if not text:
            return None
        try:
            rel = Path(text).relative_to(self.inbox)
        except ValueError:
            return None
        return None if str(rel) == "." else str(rel)

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory:
            return
        if isinstance(event, FileMovedEvent):
            src, dest = self._rel(event.src_path), self._rel(event.dest_path)
            if src is not None:
                self._forget(src)
            if dest is not None:
                self._on_file(dest, Arrival.WHOLE)
            return
        rel = self._rel(event.src_path)
        if rel is None:
            return
        if ((unnamed := _UNNAMED.fullmatch(rel)) is not None and self.has_close_events
                and not os.path.lexists(self.inbox / rel)):
            self._on_unnamed(int(unnamed.group(1)), closed=isinstance(event, FileClosedEvent))
        elif isinstance(event, FileClosedEvent):
            self._forget(rel)
            self._on_file(rel, Arrival.CLOSED)
        elif isinstance(event, FileDeletedEvent):
            self._forget(rel)
        elif self.has_close_events:
            if isinstance(event, FileCreatedEvent) and self._arrived_whole(event.src_path):
                self._on_file(rel, Arrival.WHOLE)
                return
            self.mark_being_written(rel)  # created or modified: a writer has it open; its close will follow
        else:
            self._on_file(rel, Arrival.CHANGED)

    def _forget(self, rel: str) -> None:
        with self._lock:
            self._writing.discard(rel)
            self._since.pop(rel, None)

    def _arrived_whole(self, path: str | bytes) -> bool:
        """A file that appeared complete: a symlink, FIFO, socket, device or hard link is made without a
        close event (it is as complete as it will ever be), and a name linked to an unnamed file a
        writer filled first (QSaveFile) holds that file's whole content from its first instant."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return True  # gone already: let the intake find that out, rather than mark it for ever
        with self._lock:
            linked = st.st_ino in self._unnamed
        return linked or not stat.S_ISREG(st.st_mode) or st.st_nlink != 1

    def _on_unnamed(self, inode: int, *, closed: bool) -> None:
        """Events of an unnamed file (`#<inode>`): written, it is remembered, so that a name linked to it
        is taken at once; closed, any name already linked to it (marked as being written, if its
        writes came before we started watching) is closed too."""
        with self._lock:
            if not closed:
                self._unnamed.add(inode)
                return
            self._unnamed.discard(inode)
            names = list(self._writing)
        for rel in names:
            try:
                linked = os.lstat(self.inbox / rel).st_ino == inode
            except FileNotFoundError:
                continue
            if linked:
                self._forget(rel)
                self._on_file(rel, Arrival.CLOSED)

    def open_now(self) -> set[tuple[int, int]] | None:
        """(device, inode) of the files some process has open, for telling which of the files found in
        the inbox at start are still being written; None when that cannot be known: polling, where
        writers on other hosts are invisible, or processes whose open files we may not see (run as
        root, as the systemd unit does)."""
        return open_files() if self.has_close_events else None

    def mark_being_written(self, rel: str) -> None:
        """A writer has `rel` open (seen created or modified, or found open at start): its close event
        will say when it is complete."""
        with self._lock:
            self._writing.add(rel)
            self._since.setdefault(rel, time.monotonic())

    def release_abandoned(self, older_than: float = 60.0) -> list[str]:
        """Forget "being written" marks that no open file backs any more (a close event lost to an
        inotify overflow would otherwise hold a file for ever). Checked only for marks older than
        `older_than` seconds, and only against /proc, so a writer pausing for minutes keeps its mark."""
        now = time.monotonic()
        with self._lock:
            old = [rel for rel in self._writing if now - self._since.get(rel, now) >= older_than]
        released = []
        for rel in old:
            if not _held_open(self.inbox / rel):
                with self._lock:
                    self._writing.discard(rel)
                    self._since.pop(rel, None)
                released.append(rel)
        return released


def open_files(*, partial: bool = False) -> set[tuple[int, int]] | None:
    """(device, inode) of every file any process has open, from /proc. If some process's open files
    cannot be read (another user's, when not root): None, or with `partial`, those of the rest."""
    held: set[tuple[int, int]] = set()
    for proc in os.scandir("/proc"):
        if not proc.name.isdigit():
            continue
        try:
            fds = os.scandir(f"/proc/{proc.name}/fd")
        except PermissionError:
            if not partial:
                return None
            continue
        except OSError:
            continue  # it exited
        with fds:
            for fd in fds:
                try:
                    st = os.stat(fd.path)
                except OSError:
                    continue
                held.add((st.st_dev, st.st_ino))
    return held


def _held_open(path: Path) -> bool:
    """Whether any process we can see has `path` open (read from /proc; root sees every process)."""
    try:
        target = os.stat(path)
    except FileNotFoundError:
        return False
    return (target.st_dev, target.st_ino) in (open_files(partial=True) or set())


NETWORK_FILESYSTEMS = frozenset({"nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "ceph", "glusterfs", "afs",
                                 "lustre", "gpfs", "beegfs", "fuse.sshfs", "fuse.s3fs", "fuse.rclone"})


def network_filesystem(path: Path) -> str | None:
    """The filesystem type of `path`'s mount if it is a network filesystem, from /proc/self/mountinfo."""
    real = os.path.realpath(path)
    best, best_type = "", ""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        left, _, right = line.partition(" - ")
        point = left.split()[4].replace("\\040", " ")
        if (real == point or real.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
            best, best_type = point, right.split()[0]
    return best_type if best_type in NETWORK_FILESYSTEMS else None
