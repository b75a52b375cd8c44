"""Claiming manifests from the inbox: the one path by which a job enters the daemon.

The claim is a rename() of the manifest into the spool, so from that instant the job is in exactly one
place. Then the manifest is parsed; the input files it names are claimed with it (renamed into the
job's spool folder), waiting a grace period for any not there yet. A manifest that cannot be run is
not lost: it is rejected, which publishes an outbox folder that says why.

Three concepts live beside this module, each in its own: `completeness.Completeness` says when a file
the watcher reported (or a rescan found) is complete, `inputs.AwaitedInputs` keeps the jobs waiting
for their inputs, and `upstream.AwaitedUpstreams` those waiting, once they have their inputs, for the
jobs they run after (pipelines). A job that ends here (rejected, or cancelled because a job it runs
after did not succeed) goes, like every finished job, to the `Committer`.

One thread does all of this, fed by the watcher and woken by its own timers (settle checks, the
quiet period after a close, input deadlines, claim retries, the periodic rescan), so no two claims
ever race.

One odd file affects only itself. A name that is not UTF-8 (a Latin-1 `é` from an old Samba share or
zip file) is claimed under a safe id (see `claims.safe_id`). A claim that fails (EXDEV when inbox and spool
are different mounts, EACCES, EBUSY...) is undone completely, logged once with its reason, and
retried with back-off (1 s doubling to 60 s) while the others are claimed as usual.

Health, for `dropq status`, STATUS= and the watchdog: `Intake.trouble()` is a short sentence while
some manifest cannot be claimed (None when all is well), and the same text is kept in the store's
meta under `intake_trouble` (empty when all is well); `Intake.failing()` lists each failing name.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import queue
import stat
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from dropq.config import Config
from dropq.envs.spec import find_program
from dropq.errors import ManifestError, StoreError
from dropq.intake import arrays
from dropq.intake.claims import ClaimRetries, ClaimTrouble, printable, safe_id
from dropq.intake.completeness import Completeness
from dropq.intake.inputs import FILE_KINDS, AwaitedInputs, Settled
from dropq.intake.manifest import Manifest, is_manifest_name
from dropq.intake.upstream import CAUSE, AwaitedUpstreams
from dropq.intake.watcher import Arrival, InboxView
from dropq.publish.committer import Committer
from dropq.publish.notify import check_notify
from dropq.publish.owners import Owner
from dropq.queue.capacity import Capacity
from dropq.queue.jobs import JobStatus
from dropq.queue.store import JobRecord, Store

log = logging.getLogger("dropq.intake")

#: dropping `<id>.cancel` into the inbox cancels job <id>
CANCEL_SUFFIX = ".cancel"


@dataclass(frozen=True)
class _Offer:
    rel: str
    arrival: Arrival


@dataclass(frozen=True)
class _Published:
    """A job some waiting job runs after (or a waiting job itself) has committed."""

    job_id: str


@dataclass(frozen=True)
class IntakeHooks:
    """What the intake tells the rest of the daemon, and asks of it."""

    #: a job was queued (the balancer wakes an idle slot)
    notify: Callable[[], None]
    #: `<id>.cancel` was dropped: cancel job <id> wherever it is; returns what happened, for the log
    cancel: Callable[[str], str]
    #: called from every turn of the loop, and at least every `heartbeat_every` seconds: the systemd
    #: watchdog is fed from here, so a stuck intake gets the daemon restarted
    heartbeat: Callable[[], None] | None = None
    heartbeat_every: float = 5.0
    #: why claiming must wait for free space (DiskGuard.low), or None; None here: never
    disk_low: Callable[[], str | None] | None = None
    #: queues a job whose inputs are all there, in its program's environment (Environments.place); None:
    #: queued as it is
    place: Callable[[str], None] | None = None


class Intake:
    def __init__(self, *, config: Config, store: Store, committer: Committer, inbox: InboxView,
                 hooks: IntakeHooks, capacity: Capacity | None = None, now: Callable[[], float] = time.time) -> None:
        self.config = config
        #: what all running jobs may ask for: a job asking more can never run, and is rejected at once
        self.capacity = capacity if capacity is not None else Capacity.from_config(config)
        self.store = store
        self.committer = committer
        self.outbox = committer.outbox
        self._hooks = hooks
        self._now = now
        #: when a file is complete; the watcher's view of writers is asked through it
        self.completeness = Completeness(inbox=config.inbox, view=inbox, settle=config.intake.settle,
                                         input_grace=config.intake.input_grace, now=now)
        #: the claimed jobs waiting for their input files
        self.inputs = AwaitedInputs(config=config, store=store, completeness=self.completeness, now=now,
                                    ownership=self.outbox.ownership)
        #: the jobs with all their inputs, waiting for the jobs they run after
        self.upstreams = AwaitedUpstreams(config=config, store=store, now=now, ownership=self.outbox.ownership)
        self._queue: queue.SimpleQueue[_Offer | _Published | str | None] = queue.SimpleQueue()
        #: names whose claim failed, retried with back-off (see trouble())
        self._failing = ClaimRetries()
        self._trouble_shown: str | None = None
        self._thread: threading.Thread | None = None
        self._next_rescan = 0.0
        #: names a rescan found but left in the inbox because the queue was full (intake.max_queued)
        self._backlog: collections.deque[str] = collections.deque()
        self._queued_estimate = 0
        self._since_count = 0
        self._full = False
        #: what the store's meta says of free space (disk_low), so that it is written only when it changes
        self._disk_said: str | None = None
        self.rescans = 0
        self.claimed = 0
        #: manifests a rescan found that the watcher never reported (lost events, e.g. an overflow)
        self.missed = 0

    # --- feeding the thread --------------------------------------------------------------------

    def offer(self, rel: str, arrival: Arrival) -> None:
        self._queue.put(_Offer(rel, arrival))

    def rescan_now(self) -> None:
        self._queue.put("rescan")

    def published(self, job: JobRecord) -> None:
        """A job has committed (the outbox's hook, on the committer's thread): handed to the intake's thread
        when a waiting job runs after it, and only then."""
        if self.upstreams.awaited(job.id):
            self._queue.put(_Published(job.id))

    def run_pending(self) -> None:
        """Handle every offer made so far, then whatever has come due by the clock, as the thread does
        when it wakes: drives the intake without its thread (unit tests, with an injected `now`)."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                self._handle(item)
        self._handle("timer")

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="intake", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=30)
            self._thread = None

    # --- the thread ----------------------------------------------------------------------------

    def _loop(self) -> None:
        self._next_rescan = 0.0  # rescan at once: a backlog present at start is claimed first
        while True:
            timeout = self._next_wakeup() - self._now()
            try:
                item = self._queue.get(timeout=max(0.0, timeout)) if timeout > 0 else self._queue.get_nowait()
            except queue.Empty:
                item = "timer"
            if item is None:
                return
            try:
                if self._hooks.heartbeat is not None:
                    self._hooks.heartbeat()
                self._handle(item)
            except Exception:  # one bad file must never stop the intake
                log.exception("intake failed on %r; it will be retried at the next rescan", item)

    def _handle(self, item: _Offer | _Published | str) -> None:
        if isinstance(item, _Published):
            self._decide(self.upstreams.published(item.job_id))
            return
        if isinstance(item, _Offer):
            if "/" not in item.rel and item.rel.endswith(CANCEL_SUFFIX) and not item.rel.startswith("."):
                self._cancel_file(item.rel)
            elif "/" not in item.rel and is_manifest_name(item.rel):
                self._arrived(item.rel, item.arrival)
            else:
                self._input_arrived(item.rel, item.arrival)
            return
        now = self._now()
        if self._backlog:
            self._drain_backlog()
        if item == "rescan" or (now >= self._next_rescan and not self._backlog):
            self._rescan()
        self._timers(now)

    def _timers(self, now: float) -> None:
        """Whatever has come due: settle checks, quiet periods, claim retries, inputs awaited; and a look at
        the free space, so that status shows a pause even while no manifest arrives."""
        self._disk_low()
        for name in self.completeness.due(now):
            self._take(name)
        for name in self._failing.due(now):
            self._try_claim(name)
        self._settled(self.inputs.due(now))
        self._decide(self.upstreams.due(now))

    def _arrived(self, name: str, arrival: Arrival) -> None:
        """A manifest the watcher reported: claimed once complete (see completeness)."""
        if not self.completeness.arrived(name, arrival):
            return
        if arrival is Arrival.WHOLE and not self._disk_low():
            self._try_claim(name)  # reported whole: claimed at once, not held in the backlog
        else:
            self._take(name)

    def _input_arrived(self, rel: str, arrival: Arrival) -> None:
        """Any other file: perhaps an input some waiting job named."""
        self.completeness.input_arrived(rel, arrival)
        if self.inputs.wanted(rel):
            self._settled(self.inputs.arrived(rel))

    def _next_wakeup(self) -> float:
        times = [self._next_rescan, *self.inputs.next_times(), *self.upstreams.next_times(),
                 *self.completeness.next_times(),
                 *self._failing.next_times()]
        if self._hooks.heartbeat is not None:
            times.append(self._now() + self._hooks.heartbeat_every)
        if self._backlog:
            times.append(self._now() + 0.5)  # see whether the queue has drained enough to claim more
        return min(times)

    def _rescan(self) -> None:
        self.completeness.release_abandoned()
        first = self.rescans == 0
        self.rescans += 1
        self._next_rescan = self._now() + self.config.intake.rescan
        try:
            names = sorted(os.listdir(self.config.inbox))
        except FileNotFoundError:
            log.error("the inbox %s does not exist", self.config.inbox)
            return
        missed = 0
        backlog = set(self._backlog)
        # At start, a manifest no process has open is complete, as one closed after writing is while the
        # daemon runs (None: that cannot be known here). Names left in the backlog (the queue is full)
        # are settled by age when their turn comes.
        held = self.completeness.open_now() if first else None
        for name in names:
            # each name in its own try: one file that trips over a bug must not keep the rest unclaimed
            try:
                missed += self._scan_one(name, first=first, held=held, backlog=backlog)
            except Exception:  # logged with its traceback; the other names carry on
                log.exception("intake failed on %s; the other files carry on", printable(name))
        if missed:
            self.missed += missed
            # events are being lost (an inotify queue overflow, most likely during a burst): look
            # again soon rather than in a whole rescan interval
            log.warning("the rescan found %d manifest(s) the watcher did not report (lost events); "
                        "rescanning again in 1 s", missed)
            self._next_rescan = min(self._next_rescan, self._now() + 1.0)
        self._health()

    def _scan_one(self, name: str, *, first: bool, held: set[tuple[int, int]] | None, backlog: set[str]) -> bool:
        """Look at one name a rescan found; whether it is a manifest the watcher should have reported."""
        if name.endswith(CANCEL_SUFFIX) and not name.startswith("."):
            self._cancel_file(name)
            return False
        if (not is_manifest_name(name) or self.completeness.pending(name) or name in self._failing
                or name in backlog):
            return False
        if self._full:
            self._backlog.append(name)
            return False
        missed = not first and self.completeness.untouched_for(name, 2.0)
        if self.completeness.settled(name, held=held):
            self._take(name)
        return missed

    def _disk_low(self) -> bool:
        """Whether free space is below disk.min_free: then manifests wait in the backlog (the inbox) too."""
        low = self._hooks.disk_low() if self._hooks.disk_low is not None else None
        if low != self._disk_said:  # for `dropq status`, /metrics and the dashboard's banner
            self.store.set_meta("disk_low", low or "")
            self._disk_said = low
        if low is not None:
            self._full = True
        return low is not None

    def _queue_full(self) -> bool:
        """Whether intake.max_queued jobs are queued (or the disk is short of space). An estimate, counted
        again every 50 claims (a COUNT per claim would cost more than the claim); once full, full until the
        backlog drains."""
        if self._full or self._disk_low():
            return True
        self._since_count += 1
        if self._since_count >= 50:
            self._queued_estimate, self._since_count = self.store.queued(), 0
        else:
            self._queued_estimate += 1
        if self._queued_estimate >= self.config.intake.max_queued:
            self._full = True
            log.info("%d jobs are queued (intake.max_queued): further manifests wait in the inbox until the "
                     "queue drains", self._queued_estimate)
        return self._full

    def _drain_backlog(self) -> None:
        self._queued_estimate, self._since_count = self.store.queued(), 0
        self._full = self._queued_estimate >= self.config.intake.max_queued
        if self._disk_low():
            return
        while self._backlog and not self._full:
            name = self._backlog.popleft()
            if not self.completeness.being_written(name) and self.completeness.settled(name):
                self._take(name)

    def _health(self) -> None:
        self.store.set_meta("watcher_rescans", str(self.rescans))
        self.store.set_meta("watcher_missed", str(self.missed))
        self.store.set_meta("watcher_last_rescan", f"{self._now():.3f}")
        self._publish_trouble()

    def _take(self, name: str) -> None:
        """Claim a complete manifest, unless the queue is full or the disk short (then it waits in the backlog)."""
        if self._queue_full():
            self._backlog.appendleft(name)
            if self._disk_said is not None:
                log.debug("%s waits in the inbox: free space is below disk.min_free", printable(name))
            return
        self._try_claim(name)

    def _cancel_file(self, name: str) -> None:
        """`inbox/<id>.cancel` asks to cancel job <id> (how `dropq cancel` asks, too). On a shared host only
        the job's owner or root may ask (the cancel file's own uid, by lstat); anyone else's is removed."""
        path = self.config.inbox / name
        try:
            requester = os.lstat(path).st_uid
        except FileNotFoundError:
            return
        job_id = safe_id(name[: -len(CANCEL_SUFFIX)])
        refused = self.outbox.ownership.cancel_refused(requester, Owner.of_job(self.store.find(job_id)))
        if refused is not None:
            log.warning("job %s: cancel refused (%s): %s", job_id, printable(name), refused)
            os.unlink(path)
            return
        what = self._hooks.cancel(job_id)
        log.info("job %s: cancel requested (%s): %s", job_id, printable(name), what)
        os.unlink(path)

    # --- claiming ------------------------------------------------------------------------------

    def _reserve_id(self, stem: str) -> str:
        base = safe_id(stem)
        candidate, n = base, 1
        while (self.store.id_taken(candidate) or self.outbox.folder_taken(candidate)
               or self._spool_taken(candidate)):
            n += 1
            candidate = f"{base}-{n}"
        return candidate

    def _spool_taken(self, job_id: str) -> bool:
        """Whether spool/<id> holds something. An empty folder is a failed claim's leftover: reused."""
        path = self.config.spool / job_id
        try:
            st = os.lstat(path)
            return not (stat.S_ISDIR(st.st_mode) and not os.listdir(path))
        except FileNotFoundError:
            return False

    # --- claim failures: undone, retried with back-off, reported ----------------------------------

    def _try_claim(self, name: str) -> None:
        """Claim `name`; if that fails, record why and when to try again, and carry on with the others."""
        if not self._failing.may_try(name, self._now()):
            return
        try:
            claimed = self._claim(name)
        except Exception as exc:  # noqa: BLE001 - one manifest that cannot be claimed must not stop the others
            if os.path.lexists(self.config.inbox / name):
                self._failing.failed(name, exc, self._now())
            else:
                self._failing.cleared(name)  # taken away meanwhile: nothing left to claim
            self._publish_trouble()
            return
        trouble = self._failing.cleared(name)
        if trouble is not None:
            if claimed:
                log.info("%s: claimed after %d failed attempt(s)", trouble.name, trouble.attempts)
            self._publish_trouble()

    def failing(self) -> list[ClaimTrouble]:
        """The manifests that cannot be claimed at the moment, oldest trouble first."""
        return self._failing.failing()

    def trouble(self) -> str | None:
        """A short sentence while some manifest cannot be claimed, e.g. "cannot claim 3 manifest(s):
        [Errno 18] Invalid cross-device link: ..."; None when every claim succeeds. The same text is kept
        in the store's meta as `intake_trouble` (empty when all is well) for `dropq status`."""
        return self._failing.trouble()

    def _publish_trouble(self) -> None:
        text = self.trouble() or ""
        if text != self._trouble_shown:
            self.store.set_meta("intake_trouble", text)
            self._trouble_shown = text

    def _claim(self, name: str) -> bool:
        """Move inbox/`name` into the spool and record the job; False if it is gone. Raises OSError (and
        leaves nothing behind) if the move fails."""
        src = self.config.inbox / name
        if not os.path.lexists(src):
            return False
        job_id = self._reserve_id(name.rsplit(".", 1)[0])
        folder = self.config.spool / job_id
        folder.mkdir(parents=True, exist_ok=True)  # exists: an empty leftover of a failed claim (_spool_taken)
        try:
            os.rename(src, folder / "manifest.yaml")
        except BaseException as exc:
            # undone completely: a leftover folder would make every retry fail with FileExistsError
            _remove_empty(folder)
            if isinstance(exc, FileNotFoundError):
                return False  # someone removed or claimed it first
            raise
        self.claimed += 1
        # the owner of the file claimed, now in the spool where nobody else can swap it: never its name's say
        owner = Owner.of(folder / "manifest.yaml")
        job = self.store.add(job_id, source=printable(name), owner=owner.pair())
        log.info("job %s: claimed %s", job_id, printable(name))
        self.admit(job)
        return True

    def admit(self, job: JobRecord) -> None:
        """Parse a claimed manifest and claim its inputs; or reject it with the reason."""
        try:
            manifest = self._read_manifest(job)
            limit, key = self.config.intake.max_inputs, "intake.max_inputs"
            if manifest.is_array and self.config.jobs.max_tasks > limit:
                # an array over a glob has a file per task: jobs.max_tasks bounds it as it bounds the tasks
                limit, key = self.config.jobs.max_tasks, "jobs.max_tasks"
            if len(manifest.inputs) > limit:
                raise ManifestError(f"the manifest names {len(manifest.inputs)} input files; the limit is {limit} "
                                    f"({key}): split the work over several manifests")
            if manifest.notify is not None:
                check_notify(manifest.notify, self.config.notify.allowed)
            too_big = self.capacity.never_fits(manifest.memory, manifest.cpus)
            if too_big:
                raise ManifestError(too_big)
            deadline = job.deadline or self._now() + self.config.intake.input_grace
            self.store.set_manifest(job.id, manifest.to_json(), priority=manifest.priority,
                                    retries=manifest.retries, deadline=deadline)
            done = self.inputs.wait(job.id, manifest, deadline)
        except ManifestError as exc:
            self.reject(job, str(exc))
            return
        except OSError as exc:
            # a claimed job must still reach the outbox: say what went wrong rather than strand it
            log.exception("job %s: could not be admitted", job.id)
            self.inputs.forget(job.id)
            self.reject(self.store.get(job.id), f"dropq could not read the job's files: {exc}")
            return
        if done is not None:
            self._settled([done])

    def _read_manifest(self, job: JobRecord) -> Manifest:
        path = self.config.spool / job.id / "manifest.yaml"
        if job.manifest:
            return Manifest.from_json(job.manifest)
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode):
            kind = FILE_KINDS.get(stat.S_IFMT(st.st_mode), "not a regular file")
            raise ManifestError(f"{job.source} is {kind}; a manifest must be a regular file (it was not read)")
        if st.st_nlink > 1:
            raise ManifestError(f"{job.source} has {st.st_nlink} hard links; a manifest must be a file of its "
                                "own (it was not read)")
        limit = self.config.intake.max_manifest_bytes
        if st.st_size > limit:
            raise ManifestError(f"the manifest is {st.st_size} bytes; the limit is {limit}")
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as fh:
            raw = fh.read(limit + 1)
        manifest = Manifest.parse(raw, defaults=self.config.jobs, max_bytes=limit)
        # a folder program's entry point, and what it declares (a bad requirements.txt rejects the job here)
        program = find_program(self.config.programs, manifest.program)
        # an array: its globs matched now, so that the files are claimed with the manifest, as inputs
        manifest = arrays.resolve(manifest, inbox=self.config.inbox, max_tasks=self.config.jobs.max_tasks)
        return dataclasses.replace(manifest, program=program.entry)

    def _settled(self, jobs: Iterable[Settled]) -> None:
        """Jobs that wait for their inputs no more, each as it is decided: those that run after other jobs
        wait for them next (upstream); the others are decided at once (see _decide)."""
        for done in jobs:
            if done.reason is None and done.manifest is not None and done.manifest.after:
                job = self.store.get(done.job_id)
                deadline = job.deadline or self._now() + self.config.intake.input_grace
                waited = self.upstreams.wait(done.job_id, done.manifest, deadline)
                if waited is None:
                    log.info("job %s: %s", done.job_id, self.upstreams.reason(done.job_id))
                    continue
                done = waited
            self._decide([done])

    def _decide(self, jobs: Iterable[Settled]) -> None:
        """Jobs that wait no more, each as it is decided: queued (in its program's environment, built off
        the job path), or rejected, or cancelled (a job it runs after did not succeed) with the reason."""
        for done in jobs:
            if done.cause is not None:
                self.cancel_after(done.job_id, done.reason or done.cause, cause=done.cause)
                continue
            if done.reason is not None:
                self.reject(self.store.get(done.job_id), done.reason)
                continue
            if self._hooks.place is not None:
                self._hooks.place(done.job_id)
            else:
                self.store.queue_job(done.job_id)
                self._hooks.notify()
            log.debug("job %s: queued", done.job_id)

    def reject(self, job: JobRecord, reason: str) -> None:
        """End `job` as rejected, with `reason` in words a person acts on; the committer publishes it."""
        log.warning("job %s: rejected: %s", job.id, reason)
        try:
            self.committer.finish(job.id, {"status": JobStatus.REJECTED.value, "error": reason, "exit_code": None,
                                           "finished_at": self._now()})
        except StoreError:
            log.exception("job %s could not be rejected", job.id)

    def cancel_after(self, job_id: str, reason: str, *, cause: str) -> None:
        """End a waiting job as cancelled, because a job it runs after did not succeed (`cause`, kept in its
        outcome for the jobs after it); the committer publishes it."""
        log.warning("job %s: cancelled: %s", job_id, reason)
        try:
            self.committer.finish(job_id, {"status": JobStatus.CANCELLED.value, "error": reason, "exit_code": None,
                                           "finished_at": self._now(), CAUSE: cause})
        except StoreError:  # a person cancelled it a moment ago
            log.info("job %s had already ended", job_id)

    # --- recovery ------------------------------------------------------------------------------

    def recover(self) -> None:
        """At start: adopt spool folders the store does not know (a crash right after a claim), and
        resume jobs that were waiting for their inputs."""
        spool = self.config.spool
        spool.mkdir(parents=True, exist_ok=True)
        for entry in sorted(os.scandir(spool), key=lambda e: e.name):
            try:
                self._recover_folder(entry)
            except (OSError, UnicodeError) as exc:
                log.warning("the spool folder %s could not be recovered: %s", printable(entry.name), exc)
        for job in self.store.with_status(JobStatus.WAITING):
            self.admit(job)

    def _recover_folder(self, entry: os.DirEntry[str]) -> None:
        if self.store.id_taken(entry.name):
            return
        if not os.path.lexists(Path(entry.path, "manifest.yaml")):
            if entry.is_dir(follow_symlinks=False) and not os.listdir(entry.path):
                os.rmdir(entry.path)  # a crash between mkdir and the claim's rename
            return
        log.warning("job %s: found in the spool but not in the store; resuming it", entry.name)
        owner = Owner.of(Path(entry.path, "manifest.yaml"))  # the file claimed, as at the claim
        self.store.add(entry.name, source=f"{entry.name}.yaml", owner=owner.pair())


def _remove_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError as exc:
        # e.g. a mount point (EBUSY): left, and reused by the next try, since it is empty
        log.debug("could not remove the spool folder %s: %s", folder, exc)
