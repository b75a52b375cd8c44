"""Retention: published job folders removed from the outbox once past an age or a total size.

A removed folder's job stays in the store (marked pruned_at), so counts, `dropq jobs` and the metrics
still hold it; `dropq show` says it was pruned. Only published jobs are touched (a final status and
finished), never one being committed, and only a folder that is a real directory right in the outbox:
the name comes from the store, and a link someone put in its place is removed, never followed.
A folder's size is measured once, the first time retention looks at it, and kept in the store, so a
sweep costs a walk of the new folders only.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dropq.config import Config
from dropq.paths import remove_tree
from dropq.queue.jobs import JobStatus
from dropq.queue.store import JobRecord, Store
from dropq.units import human_size
from dropq_worker.trees import walk

log = logging.getLogger("dropq.retention")

PAGE = 500


@dataclass
class Pruned:
    """What a sweep removed (or, dry, would remove)."""

    jobs: list[tuple[JobRecord, int]] = field(default_factory=list)

    @property
    def freed(self) -> int:
        return sum(size for _, size in self.jobs)


class Retention:
    def __init__(self, *, config: Config, store: Store, now: Callable[[], float] = time.time) -> None:
        self.config = config
        self.store = store
        self._now = now
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def prune(self, *, max_age: float | None, max_bytes: int | None, statuses: Sequence[JobStatus] = (),
              dry_run: bool = False) -> Pruned:
        """Remove the folders of jobs finished more than `max_age` seconds ago, then the oldest others while
        the rest hold more than `max_bytes`; only jobs in `statuses` (any final one when empty)."""
        pruned = Pruned()
        if max_age is not None:
            for job in self._jobs(statuses, finished_before=self._now() - max_age):
                pruned.jobs.append((job, self._size(job)))
        if max_bytes is not None:
            gone = {job.id for job, _ in pruned.jobs}
            kept = [(job, self._size(job)) for job in self._jobs(statuses) if job.id not in gone]
            total = sum(size for _, size in kept)
            for job, size in kept:  # oldest first
                if total <= max_bytes:
                    break
                pruned.jobs.append((job, size))
                total -= size
        if not dry_run:
            for job, _size in pruned.jobs:
                self._remove(job)
        return pruned

    def _jobs(self, statuses: Sequence[JobStatus], *, finished_before: float | None = None) -> Iterator[JobRecord]:
        after = (0.0, 0)
        while True:
            page = self.store.retained(statuses=statuses, finished_before=finished_before, limit=PAGE, after=after)
            yield from page
            if len(page) < PAGE:
                return
            last = page[-1]
            after = (last.finished_at or 0.0, last.seq)

    def _folder(self, job: JobRecord) -> str | None:
        """The job's folder in the outbox, if it is a real directory there (never through a link)."""
        path = os.path.join(self.config.outbox, job.folder)
        if os.path.dirname(path) != str(self.config.outbox) or job.folder in ("", ".", ".."):
            return None
        try:
            return path if stat.S_ISDIR(os.lstat(path).st_mode) else None
        except FileNotFoundError:
            return None

    def _size(self, job: JobRecord) -> int:
        if job.folder_bytes is not None:
            return job.folder_bytes
        folder = self._folder(job)
        size = 0
        if folder is not None:
            size = sum(st.st_size for _path, st, _depth in walk(Path(folder), skip_errors=True)
                       if not stat.S_ISDIR(st.st_mode))
        self.store.set_folder_bytes(job.id, size)
        return size

    def _remove(self, job: JobRecord) -> None:
        folder = self._folder(job)
        if folder is not None:
            remove_tree(Path(folder))
        elif os.path.islink(os.path.join(self.config.outbox, job.folder)):
            os.unlink(os.path.join(self.config.outbox, job.folder))  # a link where the folder was: not followed
        if self.store.mark_pruned(job.id):
            log.info("job %s: outbox folder %s removed (retention)", job.id, job.folder)

    # --- the daemon's sweep -------------------------------------------------------------------------

    def start(self) -> None:
        if not self.config.retention.enabled:
            return
        self._thread = threading.Thread(target=self._loop, name="retention", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)

    def _loop(self) -> None:
        r = self.config.retention
        while not self._stop.wait(r.check_every):
            try:
                done = self.prune(max_age=r.age_seconds, max_bytes=r.size_limit)
            except OSError:
                log.exception("retention: a sweep failed; the next one tries again")
                continue
            if done.jobs:
                log.info("retention: removed %d job folder(s), %s freed", len(done.jobs), human_size(done.freed))
