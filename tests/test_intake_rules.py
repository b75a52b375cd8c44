"""The intake's and the watcher's rules, in milliseconds: an Intake driven without its thread
(`run_pending`) on a clock the test moves, a real Store on a temporary SQLite file, real files; the
watcher fed the events watchdog would deliver. The end-to-end versions, with a real daemon and real
clients, are in test_inbox_clients.py."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from watchdog.events import FileClosedEvent, FileCreatedEvent, FileDeletedEvent, FileModifiedEvent, FileMovedEvent

from dropq.config import Config
from dropq.intake import claim as intake_module
from dropq.intake import inputs as inputs_module
from dropq.intake.claim import Intake, IntakeHooks
from dropq.intake.claims import MAX_ID_BYTES, printable, safe_id
from dropq.intake.manifest import is_manifest_name
from dropq.intake.watcher import QUIET_AFTER_CLOSE, Arrival, InboxWatcher
from dropq.publish.committer import Committer
from dropq.publish.outbox import Outbox
from dropq.queue.store import Store

ROOT = Path(__file__).resolve().parent.parent


class Clock:
    """The intake's clock, moved by the test. It starts at the real time, because file times (the ctime
    a quiet period or a settle time is measured from) are real."""

    def __init__(self) -> None:
        import time

        self.t = time.time()

    def __call__(self) -> float:
        return self.t


class Writers:
    """The watcher's view of writers (watcher.InboxView), set by the test: the names in `written` are
    being written; no process is known to hold any file open."""

    def __init__(self) -> None:
        self.written: set[str] = set()

    def being_written(self, rel: str) -> bool:
        return rel in self.written

    def mark_being_written(self, rel: str) -> None:
        self.written.add(rel)

    def release_abandoned(self) -> list[str]:
        return []

    def open_now(self) -> set[tuple[int, int]] | None:
        return None


def no_cancel(job_id: str) -> str:
    raise AssertionError(f"no test here cancels, but job {job_id} was")


class Rig:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.clock = Clock()
        self.writers = Writers()
        self.written = self.writers.written
        self.config = Config.from_mapping({"intake": {"settle": 2, "rescan": 30}}, base=root)
        for folder in (self.config.inbox, self.config.outbox, self.config.spool):
            folder.mkdir(parents=True)
        shutil.copytree(ROOT / "programs", self.config.programs)
        self.store = Store(self.config.database)
        self.outbox = Outbox(root=self.config.outbox, spool=self.config.spool, store=self.store)
        self.committer = Committer(outbox=self.outbox)
        self.intake = Intake(config=self.config, store=self.store, committer=self.committer, inbox=self.writers,
                             hooks=IntakeHooks(notify=lambda: None, cancel=no_cancel), now=self.clock)

    def write(self, name: str | bytes, text: str = "program: echo\n") -> Path:
        raw = os.fsencode(self.config.inbox) + b"/" + os.fsencode(name)
        fd = os.open(raw, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        return Path(os.fsdecode(raw))

    def jobs(self) -> dict[str, str]:
        """job id -> the manifest's name, of every job claimed"""
        return {j.id: j.source for j in self.store.recent(1000)}

    def ctime(self, path: Path) -> float:
        return os.lstat(path).st_ctime


@pytest.fixture
def rig() -> Iterator[Rig]:
    root = Path(tempfile.mkdtemp(prefix="dq-rules-"))
    r = Rig(root)
    r.intake.run_pending()  # the start-up rescan, of an empty inbox
    yield r
    r.store.close()
    shutil.rmtree(root, ignore_errors=True)


# --- which names are manifests, and the ids they get -------------------------------------------------

@pytest.mark.parametrize(("name", "expected"), [
    ("7.yml", True), ("x.yml", True), ("x.yaml", True), ("-.yaml", True), (".yml", False), (".yaml", False),
    (".7.yml", False), ("7.yml~", False),
])
def test_any_stem_makes_a_manifest_but_a_dotfile_does_not(name: str, expected: bool) -> None:
    assert is_manifest_name(name) is expected


def test_safe_ids_keep_printable_utf8_and_replace_what_is_not() -> None:
    assert safe_id("report 2024-é") == "report 2024-é"
    assert safe_id(os.fsdecode(b"caf\xe9")) == "caf\ufffd"
    assert safe_id("two\nlines\ttab") == "two\ufffdlines\ufffdtab"
    assert printable(os.fsdecode(b"caf\xe9.yaml")) == "caf\\xe9.yaml"
    long = safe_id(os.fsdecode(b"\xe9" * 250))  # each byte becomes three: cut to the limit, whole characters
    assert len(long.encode()) <= MAX_ID_BYTES and set(long) == {"\ufffd"}
    assert safe_id("") == "\ufffd"


def test_a_latin1_name_is_claimed_under_a_safe_unique_id(rig: Rig) -> None:
    rig.write(b"caf\xe9.yaml")
    rig.write(b"caf\xe8.yaml")
    rig.write("café.yaml")
    rig.intake.rescan_now()
    rig.clock.t += 3  # past the settle time: a rescan finds these, no close event told of them
    rig.intake.run_pending()
    rig.intake.run_pending()
    assert rig.jobs() == {"caf\ufffd": "caf\\xe8.yaml", "caf\ufffd-2": "caf\\xe9.yaml", "café": "café.yaml"}
    assert os.listdir(rig.config.inbox) == []


# --- when a file is complete --------------------------------------------------------------------------

def test_renamed_in_is_claimed_at_once(rig: Rig) -> None:
    rig.write("a.yaml")
    rig.intake.offer("a.yaml", Arrival.WHOLE)
    rig.intake.run_pending()
    assert list(rig.jobs()) == ["a"]


def test_closed_in_place_waits_for_the_quiet_period_measured_from_the_last_touch(rig: Rig) -> None:
    path = rig.write("a.yaml")
    os.utime(path, (1e9, 1e9))  # as rsync -t does after its close: an old mtime, but a fresh ctime
    touched = rig.ctime(path)
    rig.clock.t = touched
    rig.intake.offer("a.yaml", Arrival.CLOSED)
    rig.intake.run_pending()
    rig.clock.t = touched + QUIET_AFTER_CLOSE * 0.9
    rig.intake.run_pending()
    assert rig.jobs() == {} and path.exists(), "taken within the quiet period after its close"
    rig.clock.t = touched + QUIET_AFTER_CLOSE
    rig.intake.run_pending()
    assert list(rig.jobs()) == ["a"]


def test_a_close_offered_late_still_waits_for_a_quiet_period_after_the_files_own_last_change(rig: Rig) -> None:
    path = rig.write("a.yaml")
    # the close event is handled late (a busy intake): its timer says "due", but the file's ctime says
    # it was touched a moment before the due time, so it waits on
    rig.clock.t = rig.ctime(path) - QUIET_AFTER_CLOSE
    rig.intake.offer("a.yaml", Arrival.CLOSED)
    rig.intake.run_pending()
    rig.clock.t = rig.ctime(path) + QUIET_AFTER_CLOSE / 2
    rig.intake.run_pending()
    assert rig.jobs() == {}
    rig.clock.t = rig.ctime(path) + QUIET_AFTER_CLOSE
    rig.intake.run_pending()
    assert list(rig.jobs()) == ["a"]


def test_closed_then_opened_for_writing_again_waits_for_the_next_close(rig: Rig) -> None:
    path = rig.write("a.yaml")
    rig.clock.t = rig.ctime(path)
    rig.intake.offer("a.yaml", Arrival.CLOSED)
    rig.intake.run_pending()
    rig.written.add("a.yaml")
    rig.clock.t += 10
    rig.intake.run_pending()
    assert rig.jobs() == {}
    rig.written.discard("a.yaml")
    rig.intake.offer("a.yaml", Arrival.CLOSED)
    rig.intake.run_pending()
    assert rig.jobs() == {}
    rig.clock.t += QUIET_AFTER_CLOSE
    rig.intake.run_pending()
    assert list(rig.jobs()) == ["a"]


def test_an_input_closed_in_place_waits_for_its_quiet_period_too(rig: Rig) -> None:
    data = rig.write("data.txt", "some words\n")
    rig.clock.t = rig.ctime(data)
    rig.intake.offer("data.txt", Arrival.CLOSED)
    rig.write("m.yaml", "program: echo\ninput: data.txt\n")
    rig.intake.offer("m.yaml", Arrival.WHOLE)
    rig.intake.run_pending()
    assert rig.store.get("m").status.value == "waiting"
    assert data.exists(), "an input was taken at its close, under rsync's feet"
    rig.clock.t += QUIET_AFTER_CLOSE
    rig.intake.run_pending()
    assert not data.exists() and (rig.config.spool / "m" / "inputs" / "data.txt").exists()
    assert rig.store.get("m").status.value == "queued"


def test_settling_by_age_goes_by_the_ctime_not_an_old_mtime(rig: Rig) -> None:
    path = rig.write("a.yaml")
    os.utime(path, (1e9, 1e9))
    rig.clock.t = rig.ctime(path) + 1  # within intake.settle (2 s) of its last change
    rig.intake.offer("a.yaml", Arrival.CHANGED)
    rig.intake.run_pending()
    assert rig.jobs() == {}, "an mtime from 2001 made a file just written look settled"
    rig.clock.t += 2
    rig.intake.run_pending()
    assert list(rig.jobs()) == ["a"]


# --- claims that fail ---------------------------------------------------------------------------------

@pytest.fixture
def exdev_for(monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """Names whose claim fails as across two mounts (EXDEV); the daemon-level test makes it fail for real."""
    failing: set[str] = set()
    real = os.rename

    def rename(src: Any, dst: Any) -> None:
        if Path(src).name in failing:
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), str(src), None, str(dst))
        real(src, dst)

    monkeypatch.setattr(intake_module.os, "rename", rename)
    return failing


def test_a_failed_claim_is_undone_retried_with_back_off_and_reported(
        rig: Rig, exdev_for: set[str], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="dropq.intake")
    exdev_for.add("a.yaml")
    for name in ("a.yaml", "b.yaml", "c.yaml"):  # the failing one first in the rescan's order
        rig.write(name)
    rig.clock.t += 10  # settled
    rig.intake.rescan_now()
    rig.intake.run_pending()
    assert sorted(rig.jobs()) == ["b", "c"], "one failing manifest stopped the others"
    assert not (rig.config.spool / "a").exists(), "the failed claim left its spool folder"
    trouble = rig.intake.trouble()
    assert trouble is not None and trouble.startswith("cannot claim 1 manifest(s): [Errno 18] Invalid cross-device")
    assert rig.store.meta()["intake_trouble"] == trouble
    start = rig.clock.t
    tries = []
    for step in range(80):  # 40 s, in half-seconds: tries at +1, +3, +7, +15, +31 s
        rig.clock.t = start + step * 0.5
        rig.intake.rescan_now()  # rescans and events do not cut a back-off short
        rig.intake.offer("a.yaml", Arrival.WHOLE)
        before = rig.intake.failing()[0].attempts
        rig.intake.run_pending()
        if rig.intake.failing()[0].attempts > before:
            tries.append(step * 0.5)
    assert tries == [1.0, 3.0, 7.0, 15.0, 31.0]
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING and "cannot claim" in r.getMessage()]
    assert len(warnings) == 1 and "cannot claim a.yaml: [Errno 18]" in warnings[0].getMessage()
    assert not warnings[0].exc_info, "a file-system error is a reason to log, not a traceback"
    exdev_for.clear()
    rig.clock.t = start + 31 + 32  # the next try: the back-off doubled again
    rig.intake.run_pending()
    assert sorted(rig.jobs()) == ["a", "b", "c"]
    assert rig.intake.trouble() is None and rig.store.meta()["intake_trouble"] == ""


def test_an_empty_spool_folder_left_behind_does_not_block_the_claim(rig: Rig) -> None:
    (rig.config.spool / "a").mkdir()  # as a failed claim of an earlier version left it
    (rig.config.spool / "b").write_text("not a folder")  # something odd: that id is taken
    rig.write("a.yaml")
    rig.write("b.yaml")
    rig.intake.offer("a.yaml", Arrival.WHOLE)
    rig.intake.offer("b.yaml", Arrival.WHOLE)
    rig.intake.run_pending()
    assert sorted(rig.jobs()) == ["a", "b-2"]
    assert rig.intake.trouble() is None


def test_a_failing_name_that_disappears_is_forgotten(rig: Rig, exdev_for: set[str]) -> None:
    exdev_for.add("a.yaml")
    path = rig.write("a.yaml")
    rig.intake.offer("a.yaml", Arrival.WHOLE)
    rig.intake.run_pending()
    assert rig.intake.trouble() is not None
    path.unlink()
    rig.clock.t += 2
    rig.intake.run_pending()
    assert rig.intake.trouble() is None and rig.store.meta()["intake_trouble"] == ""


# --- the watcher: what each event means -----------------------------------------------------------------

class Heard:
    def __init__(self) -> None:
        self.offers: list[tuple[str, Arrival]] = []

    def __call__(self, rel: str, arrival: Arrival) -> None:
        self.offers.append((rel, arrival))


@pytest.fixture
def watcher(tmp_path: Path) -> tuple[InboxWatcher, Heard]:
    heard = Heard()
    w = InboxWatcher(inbox=tmp_path, mode="inotify", on_file=heard)
    w.kind = "inotify"  # the rules of an inotify watch, fed by hand rather than by a running observer
    return w, heard


def test_watcher_created_is_being_written_until_closed_then_closed(watcher: tuple[InboxWatcher, Heard],
                                                                   tmp_path: Path) -> None:
    w, heard = watcher
    (tmp_path / "a.yaml").write_text("program: echo\n")
    w.on_any_event(FileCreatedEvent(str(tmp_path / "a.yaml")))
    w.on_any_event(FileModifiedEvent(str(tmp_path / "a.yaml")))
    assert w.being_written("a.yaml") and heard.offers == []
    w.on_any_event(FileClosedEvent(str(tmp_path / "a.yaml")))
    assert not w.being_written("a.yaml")
    assert heard.offers == [("a.yaml", Arrival.CLOSED)]


def test_watcher_renamed_in_symlinked_or_hard_linked_is_whole(watcher: tuple[InboxWatcher, Heard],
                                                              tmp_path: Path) -> None:
    w, heard = watcher
    (tmp_path / "a.yaml").write_text("program: echo\n")
    os.symlink(tmp_path / "a.yaml", tmp_path / "s.yaml")
    os.link(tmp_path / "a.yaml", tmp_path / "h.yaml")
    w.on_any_event(FileMovedEvent("", str(tmp_path / "a.yaml")))
    w.on_any_event(FileCreatedEvent(str(tmp_path / "s.yaml")))
    w.on_any_event(FileCreatedEvent(str(tmp_path / "h.yaml")))
    assert heard.offers == [("a.yaml", Arrival.WHOLE), ("s.yaml", Arrival.WHOLE), ("h.yaml", Arrival.WHOLE)]


def _unnamed(folder: Path, text: bytes) -> tuple[int, int]:
    """An O_TMPFILE in `folder`, written: (fd, inode)."""
    fd = os.open(folder, os.O_TMPFILE | os.O_WRONLY, 0o644)
    os.write(fd, text)
    return fd, os.fstat(fd).st_ino


def _link(fd: int, path: Path) -> None:
    """linkat(/proc/self/fd/N, path, AT_SYMLINK_FOLLOW), as QSaveFile commits (os.link follows the
    magic link only when given a directory fd)."""
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.link(f"/proc/self/fd/{fd}", path, src_dir_fd=dir_fd, follow_symlinks=True)
    finally:
        os.close(dir_fd)


def test_watcher_a_name_linked_to_a_written_unnamed_file_is_whole(watcher: tuple[InboxWatcher, Heard],
                                                                  tmp_path: Path) -> None:
    w, heard = watcher
    fd, inode = _unnamed(tmp_path, b"program: echo\n")
    try:
        w.on_any_event(FileModifiedEvent(str(tmp_path / f"#{inode}")))  # inotify names it #<inode>
        _link(fd, tmp_path / "q.yaml")
        w.on_any_event(FileCreatedEvent(str(tmp_path / "q.yaml")))
    finally:
        os.close(fd)
    w.on_any_event(FileClosedEvent(str(tmp_path / f"#{inode}")))
    assert heard.offers == [("q.yaml", Arrival.WHOLE)]
    assert not w.being_written("q.yaml") and not w.being_written(f"#{inode}")


def test_watcher_a_name_linked_before_its_writes_is_closed_with_the_unnamed_file(
        watcher: tuple[InboxWatcher, Heard], tmp_path: Path) -> None:
    w, heard = watcher
    fd, inode = _unnamed(tmp_path, b"")
    _link(fd, tmp_path / "q.yaml")
    w.on_any_event(FileCreatedEvent(str(tmp_path / "q.yaml")))
    assert w.being_written("q.yaml")
    os.write(fd, b"program: echo\n")
    w.on_any_event(FileModifiedEvent(str(tmp_path / f"#{inode}")))
    os.close(fd)
    w.on_any_event(FileClosedEvent(str(tmp_path / f"#{inode}")))
    assert heard.offers == [("q.yaml", Arrival.CLOSED)] and not w.being_written("q.yaml")


def test_watcher_a_real_file_named_like_an_unnamed_one_is_an_ordinary_file(watcher: tuple[InboxWatcher, Heard],
                                                                           tmp_path: Path) -> None:
    w, heard = watcher
    (tmp_path / "#12").write_text("data")
    w.on_any_event(FileCreatedEvent(str(tmp_path / "#12")))
    assert w.being_written("#12")
    w.on_any_event(FileDeletedEvent(str(tmp_path / "#12")))
    assert not w.being_written("#12") and heard.offers == []


def test_watcher_polling_reports_changes_for_the_settle_check(tmp_path: Path) -> None:
    heard = Heard()
    w = InboxWatcher(inbox=tmp_path, mode="polling", on_file=heard)
    w.kind = "polling"
    (tmp_path / "a.yaml").write_text("program: echo\n")
    w.on_any_event(FileCreatedEvent(str(tmp_path / "a.yaml")))
    assert heard.offers == [("a.yaml", Arrival.CHANGED)] and not w.being_written("a.yaml")


# --- bounded work for jobs waiting on inputs (issue 16) --------------------------------------------------

def test_an_arriving_file_costs_work_only_for_the_jobs_that_named_it(rig: Rig,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """20 manifests each wait for 1,000 inputs that never come. An unrelated file arriving, and a trivial
    job's manifest, must not make the intake look at those 20,000 paths again (0.1 looked at every
    input of every waiting job at each inbox event: a trivial job waited minutes)."""
    inputs = [f"part-{i}.csv" for i in range(1000)]
    for n in range(20):
        rig.write(f"big{n}.yaml", "program: echo\ninputs: [" + ", ".join(inputs) + "]\n")
        rig.intake.offer(f"big{n}.yaml", Arrival.WHOLE)
    rig.intake.run_pending()
    assert {rig.store.get(f"big{n}").status.value for n in range(20)} == {"waiting"}
    looked: list[str] = []
    real = inputs_module.resolve_inside

    def counting(root: Path, rel: Any, *, what: str) -> Path:
        if what == "input":
            looked.append(str(rel))
        return real(root, rel, what=what)

    monkeypatch.setattr(inputs_module, "resolve_inside", counting)
    rig.write("unrelated.txt", "x\n")
    rig.intake.offer("unrelated.txt", Arrival.WHOLE)
    rig.write("small.yaml", "program: echo\n")
    rig.intake.offer("small.yaml", Arrival.WHOLE)
    rig.intake.run_pending()
    assert rig.store.get("small").status.value == "queued"
    assert looked == []
    # one awaited input arriving: looked at once for each of the 20 jobs that named it, no more
    rig.write("part-7.csv", "7\n")
    rig.intake.offer("part-7.csv", Arrival.WHOLE)
    rig.intake.run_pending()
    assert looked == ["part-7.csv"] * 20
    assert (rig.config.spool / "big0" / "inputs" / "part-7.csv").exists()


def test_a_manifest_naming_more_inputs_than_the_limit_is_rejected_saying_so(rig: Rig) -> None:
    limit = rig.config.intake.max_inputs
    rig.write("huge.yaml", "program: echo\ninputs: [" + ", ".join(f"f{i}" for i in range(limit + 1)) + "]\n")
    rig.intake.offer("huge.yaml", Arrival.WHOLE)
    rig.intake.run_pending()
    job = rig.store.get("huge")
    assert job.outcome["status"] == "rejected"
    assert job.outcome["error"] == (f"the manifest names {limit + 1} input files; the limit is {limit} "
                                    "(intake.max_inputs): split the work over several manifests")
