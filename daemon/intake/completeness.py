"""When a file dropped into the inbox is complete: from how the watcher saw it arrive (`watcher.Arrival`),
the watcher's "being written" marks (`watcher.InboxView`) and the file's own times.

A manifest is complete
- renamed or linked in (WHOLE): at once;
- closed after writing in place (CLOSED): once nothing has touched it for the quiet period
  (`watcher.QUIET_AFTER_CLOSE`), because rsync --inplace and unzip set its times and mode by path right
  after their close;
- seen changed where no close event tells (CHANGED: polling), or found by a rescan: once unchanged for
  `intake.settle` seconds;
- found by the first rescan at start: at once, unless some process has it open (then its close tells).

An input is taken with the same care: one closed in place waits for its quiet period too, and one in a
subfolder (no event tells of it) once unchanged for the settle time.

The rules keep a little state (what is settling, what is in its quiet period) but run no thread: the
intake's thread drives them (`arrived`, `due`, `next_times`), so a decision and the claim that follows
it never race. Every time is measured from a file's last change, mtime or ctime (`touched`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Container
from pathlib import Path

from dropq.escape import printable
from dropq.intake.watcher import QUIET_AFTER_CLOSE, Arrival, InboxView

# the intake's logger: these lines are part of the intake's story in the log
log = logging.getLogger("dropq.intake")


def touched(st: os.stat_result) -> float:
    """When a file last changed: its content (mtime) or its inode (ctime: chmod, utime, a link)."""
    return max(st.st_mtime, st.st_ctime)


class Completeness:
    """Decides when each file the watcher reports (or a rescan finds) is complete; see the module."""

    def __init__(self, *, inbox: Path, view: InboxView, settle: float, input_grace: float,
                 quiet: float = QUIET_AFTER_CLOSE, now: Callable[[], float] = time.time) -> None:
        self.inbox = inbox
        self._view = view
        self._settle_time = settle
        self._input_grace = input_grace
        self._quiet_period = quiet
        self._now = now
        #: manifests settling by age: name -> ((size, mtime, ctime) when last looked at, when to look again)
        self._settling: dict[str, tuple[tuple[int, int, int], float]] = {}
        #: manifests closed after writing in place, and when to look whether they stayed untouched
        self._quiet: dict[str, float] = {}
        #: other files (inputs, perhaps) closed after writing in place, and the end of their quiet period
        self._closed_inputs: dict[str, float] = {}

    # --- manifests -----------------------------------------------------------------------------

    def arrived(self, name: str, arrival: Arrival) -> bool:
        """A manifest the watcher reported: whether it is complete now (else `due` says when it is)."""
        if arrival is Arrival.WHOLE:
            self._settling.pop(name, None)
            self._quiet.pop(name, None)
            return True
        if arrival is Arrival.CLOSED:
            self._settling.pop(name, None)
            self._quiet[name] = self._now() + self._quiet_period
            return False
        return self.settled(name)

    def pending(self, name: str) -> bool:
        """Whether `name` is being written, settling or in its quiet period: it comes due by itself (its
        close, `due`), so a rescan leaves it alone."""
        return self._view.being_written(name) or name in self._settling or name in self._quiet

    def being_written(self, name: str) -> bool:
        return self._view.being_written(name)

    def settled(self, name: str, *, held: set[tuple[int, int]] | None = None) -> bool:
        """Whether `name` has been unchanged for the settle time (where no close event tells); if not,
        `due` looks again. With `held`, the files some process has open (the first rescan at start), it
        is complete at once unless it is one of them (then it is marked as being written)."""
        try:
            st = os.lstat(self.inbox / name)
        except FileNotFoundError:
            self._settling.pop(name, None)
            return False
        if held is not None:
            if (st.st_dev, st.st_ino) in held:
                self._view.mark_being_written(name)
                return False
            return self._quiet_over(name)  # at once, unless something touched it a moment ago
        # ctime, not only mtime: `rsync -t`, `cp -p` and `unzip` give a fresh copy an old mtime, but
        # no client can set the ctime, which every write, chmod and utime moves to now
        sig = (st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        settle = self._settle_time
        now = self._now()
        previous = self._settling.get(name)
        if (previous is not None and previous[0] == sig and previous[1] <= now) or touched(st) + settle <= now:
            self._settling.pop(name, None)
            return True
        self._settling[name] = (sig, now + settle)
        return False

    def _quiet_over(self, name: str) -> bool:
        """Whether `name`, closed after writing, has been untouched for the quiet period: a client may
        still set its times or mode by path right after the close (rsync --inplace, unzip)."""
        try:
            st = os.lstat(self.inbox / name)
        except FileNotFoundError:
            self._quiet.pop(name, None)
            return False
        if self._view.being_written(name):
            self._quiet.pop(name, None)  # opened for writing again: its next close offers it again
            return False
        due = touched(st) + self._quiet_period
        if due > self._now():
            self._quiet[name] = max(due, self._quiet.get(name, 0.0))
            return False
        self._quiet.pop(name, None)
        return True

    def due(self, now: float) -> list[str]:
        """The manifests whose settle time or quiet period has come due by `now` and that are complete."""
        ready: dict[str, None] = {}  # ordered, and each name once
        for name, (_, due) in list(self._settling.items()):
            if due <= now and self.settled(name):
                ready[name] = None
        for name, due in list(self._quiet.items()):
            if due <= now and self._quiet_over(name):
                ready[name] = None
        return list(ready)

    def next_times(self) -> list[float]:
        """When `due` may next have something to say about a manifest."""
        return [*(due for _, due in self._settling.values()), *self._quiet.values()]

    def untouched_for(self, name: str, seconds: float) -> bool:
        """Whether inbox/`name` has been unchanged for `seconds` (False if it is gone)."""
        try:
            return touched(os.lstat(self.inbox / name)) + seconds <= self._now()
        except FileNotFoundError:
            return False

    # --- what the watcher knows about writers, at a rescan ---------------------------------------

    def release_abandoned(self) -> None:
        """Take files marked as being written that nothing has open any more (a close event was lost)."""
        for rel in self._view.release_abandoned():
            log.warning("%s was marked as being written, but nothing has it open: taking it", printable(rel))

    def open_now(self) -> set[tuple[int, int]] | None:
        """(device, inode) of the files some process has open; None when that cannot be known."""
        return self._view.open_now()

    # --- inputs --------------------------------------------------------------------------------

    def input_arrived(self, rel: str, arrival: Arrival) -> None:
        """Any file other than a manifest: one closed in place waits for its quiet period too (rsync
        --inplace copies the data before the manifest)."""
        if arrival is Arrival.CLOSED:
            self._closed_inputs[rel] = self._now() + self._quiet_period
        else:
            self._closed_inputs.pop(rel, None)

    def input_complete(self, rel: str, st: os.stat_result) -> bool:
        """Whether input `rel` (a regular file; `st` its lstat) may be taken: no writer has it open, it
        is past the quiet period after its close, and in a subfolder (which raises no event) it has been
        unchanged for the settle time."""
        if self._view.being_written(rel) or not self._input_quiet(rel, st):
            return False
        return "/" not in rel or touched(st) + self._settle_time <= self._now()

    def _input_quiet(self, rel: str, st: os.stat_result) -> bool:
        """Whether input `rel` is past the quiet period after its close (or was not closed in place)."""
        due = self._closed_inputs.get(rel)
        if due is None:
            return True
        now = self._now()
        if due > now or touched(st) + self._quiet_period > now:
            return False
        del self._closed_inputs[rel]
        return True

    def inputs_due(self, now: float, wanted: Container[str]) -> list[str]:
        """The `wanted` inputs whose quiet period has ended by `now`. Closed files no manifest named
        within the input grace are forgotten."""
        ready = []
        for rel, due in list(self._closed_inputs.items()):
            if due <= now and rel in wanted:
                ready.append(rel)
            elif due + self._input_grace < now:
                del self._closed_inputs[rel]  # a data file no manifest named (yet): forget it
        return ready

    def input_times(self, wanted: Container[str]) -> list[float]:
        """When the quiet period of each `wanted` input closed in place ends."""
        return [due for rel, due in self._closed_inputs.items() if rel in wanted]
