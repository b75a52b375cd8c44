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
import threading
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

#: called with (path relative to the inbox, complete): complete=False asks for the settle check
Listener = Callable[[str, bool], None]


class InboxWatcher(FileSystemEventHandler):
    def __init__(self, *, inbox: Path, mode: str, on_file: Listener) -> None:
        self.inbox = inbox
        self.mode = mode
        self._on_file = on_file
        self._writing: set[str] = set()
        self._lock = threading.Lock()
        self._observer: BaseObserver | None = None
        self.kind = "none"

    def start(self) -> None:
        observer, self.kind = self._make_observer()
        filters = [FileCreatedEvent, FileModifiedEvent, FileClosedEvent, FileMovedEvent, FileDeletedEvent]
        # Top level only. A recursive watch makes watchdog synthesise IN_CREATE events for the files
        # it finds in a new subfolder, indistinguishable from a writer creating them, which would
        # hold such a file as "being written" for ever. Inputs in subfolders are settled by age.
        observer.schedule(self, str(self.inbox), recursive=False, event_filter=filters)
        observer.start()
        self._observer = observer
        log.info("watching %s with %s", self.inbox, self.kind)

    def _make_observer(self) -> tuple[BaseObserver, str]:
        if self.mode in ("auto", "inotify"):
            try:
                from watchdog.observers.inotify import InotifyObserver

                return InotifyObserver(generate_full_events=True), "inotify"
            except (ImportError, OSError) as exc:
                if self.mode == "inotify":
                    raise
                log.warning("inotify is unavailable (%s); polling the inbox instead", exc)
        return PollingObserver(timeout=1.0), "polling"

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
            if dest is not None:
                self._on_file(dest, True)
            return
        rel = self._rel(event.src_path)
        if rel is None:
            return
        if isinstance(event, FileClosedEvent):
            with self._lock:
                self._writing.discard(rel)
            self._on_file(rel, True)
        elif isinstance(event, FileDeletedEvent):
            with self._lock:
                self._writing.discard(rel)
        elif self.has_close_events:
            with self._lock:  # created or modified: a writer has it open; its close event will follow
                self._writing.add(rel)
        else:
            self._on_file(rel, False)
