"""Watching the inbox with watchdog, and deciding when a dropped file is complete.

A file is complete when it was renamed into the inbox (from inside or outside it), or closed after
writing (inotify's IN_CLOSE_WRITE), so a person typing a manifest with `cat > inbox/x.yaml` is never
read early, however long they pause. `generate_full_events=True` is what lets a rename from outside
the inbox (IN_MOVED_TO with no partner) be told apart from a file created in place: watchdog reports
the first as a FileMovedEvent with an empty source, the second as a FileCreatedEvent.

Only the top level of the inbox is watched: that is where manifests are. Input files in
subfolders are taken once unchanged for the settle time.

Where inotify is unavailable (network filesystems, or inotify instances exhausted) the polling
observer is used, and a file counts as complete once unchanged for the settle time.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

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

#: called with (path relative to the inbox, complete): complete=False asks for the settle check
Listener = Callable[[str, bool], None]


class InboxWatcher(FileSystemEventHandler):
    def __init__(self, *, inbox: Path, mode: str, on_file: Listener) -> None:
        self.inbox = inbox
        self.mode = mode
        self._on_file = on_file
        self._writing: set[str] = set()
        self._since: dict[str, float] = {}
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
            with self._lock:
                self._writing.discard(src or "")
                self._since.pop(src or "", None)
            if dest is not None:
                self._on_file(dest, True)
            return
        rel = self._rel(event.src_path)
        if rel is None:
            return
        if isinstance(event, FileClosedEvent):
            with self._lock:
                self._writing.discard(rel)
                self._since.pop(rel, None)
            self._on_file(rel, True)
        elif isinstance(event, FileDeletedEvent):
            with self._lock:
                self._writing.discard(rel)
                self._since.pop(rel, None)
        elif self.has_close_events:
            if isinstance(event, FileCreatedEvent) and not _plain_file(event.src_path):
                # a symlink, FIFO, socket, device or hard link is made without a close event: it is
                # as complete as it will ever be
                self._on_file(rel, True)
                return
            self.mark_being_written(rel)  # created or modified: a writer has it open; its close will follow
        else:
            self._on_file(rel, False)

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


def _plain_file(path: str | bytes) -> bool:
    """A regular file with one link: the only kind a writer may still be filling."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_nlink == 1


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
