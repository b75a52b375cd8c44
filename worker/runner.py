"""Runs one job: the program as a subprocess in its own session, output captured with a cap, stopped
(the whole tree) at its timeout or on cancel. One job at a time.
"""

from __future__ import annotations

import json
import os
import resource
import selectors
import signal
import stat
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from . import isolation, procs
from .capture import CappedFile
from .protocol import JobSpec, JobState, Outcome, ProtocolError, Report, Staging

#: seconds to drain a job's pipes after it ended, in case something unkillable still holds them
_DRAIN = 2.0


class SpecError(ProtocolError):
    """The job description is malformed or names a path outside the worker's mounts."""


class Busy(RuntimeError):
    """The worker already runs a job."""


@dataclass(frozen=True, kw_only=True)
class Settings:
    #: where programs are (read-only for jobs)
    programs: Path
    #: where the claimed inputs of jobs are (read-only for jobs)
    inputs: Path
    #: staging: each job's working directory and its captured output (read-write); see Staging
    jobs: Path
    #: interpreter for .py programs
    python: str = "python3"
    #: programs' environments, one folder per id (read-only for jobs); None: jobs in one are refused
    envs: Path | None = None
    #: PATH given to jobs
    path: str = "/usr/local/bin:/usr/bin:/bin"
    #: the uids jobs run as, one after the other (None: as the worker's own uid; see isolation)
    uids: isolation.JobUids | None = None
    #: bytes a job may have on disk at once (its output tree, its files in /tmp); 0: no limit
    max_disk_bytes: int = 0


#: seconds between two counts of a job's bytes on disk, at least (longer when counting takes long)
DISK_CHECK = 0.2


#: the running job's process group, for the next worker process should this one die (one job at a
#: time, so one file, rewritten in place for each job rather than made and removed)
RUNNING = "running.pid"


def inside(root: Path, rel: str, *, what: str) -> Path:
    """`root/rel` after resolving symlinks, refused unless it stays inside `root` (never trust a path)."""
    if not rel or "\x00" in rel or rel.startswith("/"):
        raise SpecError(f"invalid {what} path {rel!r}")
    real_root = os.path.realpath(root)
    real = os.path.realpath(os.path.join(real_root, rel))
    if os.path.commonpath([real_root, real]) != real_root or real == real_root:
        raise SpecError(f"{what} {rel!r} is outside the worker's {what} folder")
    return Path(real)


class Job:
    """A job this worker runs or has run."""

    def __init__(self, spec: JobSpec, staging: Staging, uid: int | None = None) -> None:
        self.spec = spec
        self.staging = staging
        #: the uid the job runs as, when the worker isolates its jobs
        self.uid = uid
        self.done = threading.Event()
        self.report = Report(key=spec.key, state=JobState.RUNNING, started_at=time.time())
        self._wake_r, self._wake_w = os.pipe()
        self._wake_lock = threading.Lock()
        self.stop_reason: str | None = None

    def stop(self, reason: str) -> None:
        """Ask the job to stop (cancel or shutdown); the runner thread does the killing."""
        with self._wake_lock:
            if self._wake_w < 0:
                return  # already ended
            if self.stop_reason is None:
                self.stop_reason = reason
            os.write(self._wake_w, b"x")

    def close_wake(self) -> None:
        # under the lock: a closed descriptor number may be reused at once, and stop() must never
        # write into whatever file got it
        with self._wake_lock:
            for fd in (self._wake_r, self._wake_w):
                os.close(fd)
            self._wake_r = self._wake_w = -1



class Runner:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._current: Job | None = None
        self._finished: dict[str, Job] = {}
        # ids cancelled before their start request arrived (the two may cross on the way): such a
        # job is never started; it ends at once as cancelled
        self._cancelled_early: dict[str, None] = {}
        #: how many jobs this worker started: the next job's uid is the next in the range
        self._started = 0
        settings.jobs.mkdir(parents=True, exist_ok=True)
        if settings.uids is not None:
            # the staging folder: job uids may pass through to their own folder, but neither list it
            # (the keys are not theirs to learn) nor create anything in it
            os.chmod(settings.jobs, 0o711)

    @property
    def current(self) -> Job | None:
        job = self._current
        return job if job is not None and not job.done.is_set() else None

    def start(self, spec: JobSpec) -> Job:
        with self._lock:
            known = self.get(spec.key)
            if known is not None:
                return known  # the same job posted twice (the daemon retried a request): idempotent
            if self.current is not None:
                raise Busy(self.current.spec.key)
            argv = self._argv(spec)
            if spec.key in self._cancelled_early:
                del self._cancelled_early[spec.key]
                job = Job(spec, Staging(self.settings.jobs, spec.key))
                job.close_wake()
                job.report = job.report.ended(Outcome.CANCELLED, finished_at=time.time())
                self._remember(job)
                job.done.set()
                return job
            staging = Staging(self.settings.jobs, spec.key)
            # left by a worker that died before the daemon took it away: removed without following
            # links or recursing (a job's tree may be deeper than the stack)
            isolation.remove_tree(str(staging.output))
            uid = None
            if self.settings.uids is not None:
                uid = self.settings.uids.nth(self._started)
                isolation.make_output(staging.output, uid)
            else:
                staging.output.mkdir()
            self._started += 1
            job = Job(spec, staging, uid)
            self._current = job
            self._finished.pop(spec.key, None)
        threading.Thread(target=self._run, args=(job, argv), name=f"job-{spec.key}", daemon=True).start()
        return job

    def get(self, key: str) -> Job | None:
        job = self._current
        if job is not None and job.spec.key == key:
            return job
        return self._finished.get(key)

    def cancel(self, key: str) -> Job | None:
        """Stop the job if it runs; if this worker has not seen it yet, make sure it never starts."""
        job = self.get(key)
        if job is None:
            with self._lock:
                self._cancelled_early[key] = None
                while len(self._cancelled_early) > 64:
                    self._cancelled_early.pop(next(iter(self._cancelled_early)))
        elif not job.done.is_set():
            job.stop("cancel")
        return job

    def _remember(self, job: Job) -> None:
        """Keep a finished job's result for the daemon to collect (the last 64); under self._lock."""
        self._finished[job.spec.key] = job
        while len(self._finished) > 64:
            self._finished.pop(next(iter(self._finished)))

    def forget(self, key: str) -> bool:
        with self._lock:
            job = self._finished.pop(key, None)
            if self._current is not None and self._current.spec.key == key and self._current.done.is_set():
                self._current = None
        return job is not None

    def shutdown(self, timeout: float = 10.0) -> None:
        job = self.current
        if job is not None:
            job.stop("shutdown")
            job.done.wait(timeout)

    def _argv(self, spec: JobSpec) -> list[str]:
        program = inside(self.settings.programs, spec.program, what="program")
        if not program.is_file():
            raise SpecError(f"program {spec.program!r} does not exist in the programs folder")
        inputs = [str(inside(self.settings.inputs, rel, what="input")) for rel in spec.inputs]
        if program.suffix == ".py":
            head = [self._python(spec), str(program)]
        elif os.access(program, os.X_OK):
            head = [str(program)]
        else:
            raise SpecError(f"program {spec.program!r} is neither a .py file nor executable")
        return [*head, *inputs, *spec.args]

    def _python(self, spec: JobSpec) -> str:
        """The interpreter of the job's environment, or the worker's own."""
        if spec.environment is None:
            return self.settings.python
        if self.settings.envs is None:
            raise SpecError("this worker has no environments folder (--envs), and the job runs in an environment")
        python = self.settings.envs / spec.environment / "bin" / "python"
        if not os.path.exists(python):
            raise SpecError(f"environment {spec.environment} is not in this worker's environments folder")
        return str(python)

    def _clean_up(self, job: Job) -> None:
        """Nothing of the job may reach the next one: its processes are killed, and with a job uid its
        files in /tmp and /dev/shm removed and its output taken back, before it is reported done."""
        uids = self.settings.uids
        if job.uid is not None:
            isolation.kill_uid(job.uid)
        procs.kill_leftovers()  # what a job without a uid left (and, with one, nothing by now)
        if job.uid is not None and uids is not None:
            isolation.clear_scratch(job.uid)
            isolation.take_back(job.staging.output, uids)

    def _env(self, job: Job) -> dict[str, str]:
        output = job.staging.output
        env = {
            "PATH": self.settings.path,
            "LANG": "C.UTF-8",
            "HOME": str(output),
            "TMPDIR": os.environ.get("TMPDIR", "/tmp"),
            "PYTHONDONTWRITEBYTECODE": "1",
            **job.spec.env,
            "DROPQ_JOB_ID": job.spec.job_id,
            "DROPQ_OUTPUT": str(output),
        }
        if job.spec.inputs:  # the daemon makes a job's inputs folder only when it has inputs
            env["DROPQ_INPUTS"] = str(self.settings.inputs / job.spec.key)
        return env

    def _run(self, job: Job, argv: list[str]) -> None:
        try:
            report = _execute(job, argv, self._env(job), self.settings)
        except Exception as exc:  # noqa: BLE001 - whatever happened, the job must end with a report
            report = job.report.ended(Outcome.ERROR, finished_at=time.time(),
                                      error=f"the worker failed to run the job: {exc}")
        finally:
            job.close_wake()
        try:
            self._clean_up(job)
        except OSError as exc:  # its leftovers could not all go: the job fails saying so (they stay
            # its uid's, which the next job, under the next uid, cannot reach)
            report = report.ended(Outcome.ERROR, finished_at=time.time(),
                                  error=f"the worker could not clean up after the job: {exc}")
        with self._lock:
            job.report = report
            self._remember(job)
        job.done.set()


def _execute(job: Job, argv: list[str], env: dict[str, str], settings: Settings) -> Report:
    spec = job.spec
    owner = (settings.uids.owner_uid, settings.uids.owner_gid) if settings.uids is not None else None
    out = CappedFile(job.staging.stdout, cap=spec.max_output_bytes, owner=owner)
    err = CappedFile(job.staging.stderr, cap=spec.max_output_bytes, owner=owner)
    as_uid: dict[str, object] = {}
    if job.uid is not None:
        # its own uid and gid, no supplementary groups (root's would stay otherwise), and so no capability
        as_uid = {"user": job.uid, "group": job.uid, "extra_groups": []}
    try:
        proc = subprocess.Popen(  # argv is built from checked paths, never a shell
            argv, cwd=job.staging.output, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True, close_fds=True,
            **as_uid,  # type: ignore[call-overload]
        )
    except OSError as exc:
        out.close()
        err.close()
        return job.report.ended(Outcome.ERROR, finished_at=time.time(),
                                error=f"the program could not be started: {exc.strerror}")
    # one write(), no temporary file: a worker killed before it lands leaves the file empty, which
    # reap_abandoned skips, as it would a job killed before this line
    (job.staging.jobs_dir / RUNNING).write_text(json.dumps({"id": job.spec.key, "pgid": proc.pid,
                                                        "start": procs.start_time(proc.pid)}))
    procs.make_oom_victim(proc.pid)
    ooms_before, refusals_before = procs.oom_kills(), procs.pids_refusals()
    try:
        outcome = _supervise(job, proc, out, err, settings.max_disk_bytes)
    finally:
        procs.kill_group(proc.pid)
        out.close()
        err.close()
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
    code = proc.returncode
    error = None
    refusals = procs.pids_refusals()
    if refusals_before is not None and refusals is not None and refusals > refusals_before:
        error = (f"the program tried to start more processes than the worker's limit of {procs.pids_limit()} "
                 "allows (a fork bomb?)")
    if code == -signal.SIGXFSZ or (code and _hit_file_limit(job.staging.output)):
        error = "a file the program wrote reached the worker's file size limit (jobs.max_file_bytes)"
    if job.stop_reason == "disk":
        error = (f"the job wrote more than {isolation.human(settings.max_disk_bytes)} (jobs.max_disk_bytes); "
                 "it was stopped")
    if outcome is Outcome.EXITED and code == -signal.SIGKILL and ooms_before is not None:
        after = procs.oom_kills()
        if after is not None and after > ooms_before:
            limit = procs.memory_limit()
            outcome = Outcome.OOM
            error = ("the program ran out of memory and was killed by the kernel"
                     + (f" (the worker's memory limit is {procs.human_bytes(limit)})" if limit else ""))
    return job.report.ended(
        outcome, finished_at=time.time(),
        exit_code=code if code is not None and code >= 0 else None,
        signal=-code if code is not None and code < 0 else None,
        error=error, stdout_bytes=out.total, stderr_bytes=err.total,
        stdout_truncated=out.truncated, stderr_truncated=err.truncated,
    )


def _supervise(job: Job, proc: subprocess.Popen[bytes], out: CappedFile, err: CappedFile,  # noqa: C901
               max_disk: int = 0) -> Outcome:
    """Pump output until the program exits; stop the group at the timeout, on request, or past its disk
    budget (counted every DISK_CHECK seconds or so while it runs). The outcome."""
    assert proc.stdout is not None and proc.stderr is not None
    sel = selectors.DefaultSelector()
    sinks = {proc.stdout.fileno(): out, proc.stderr.fileno(): err}
    for fd in sinks:
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ)
    pidfd = os.pidfd_open(proc.pid)
    sel.register(pidfd, selectors.EVENT_READ)
    sel.register(job._wake_r, selectors.EVENT_READ)
    outcome = Outcome.EXITED
    deadline = time.monotonic() + job.spec.timeout
    phase = "running"  # -> "terminating" (SIGTERM sent) -> "killed" (SIGKILL sent) ; "exited" when reaped
    next_count = time.monotonic() + DISK_CHECK if max_disk else float("inf")
    try:
        while sinks or phase != "exited":
            now = time.monotonic()
            if now >= next_count and phase != "exited":
                used = isolation.disk_used(job.staging.output, job.uid)
                took = time.monotonic() - now
                # a huge tree takes long to count: count less often, so the job keeps most of the CPU
                next_count = time.monotonic() + max(DISK_CHECK, 10 * took)
                if used > max_disk and job.stop_reason is None:
                    job.stop_reason = "disk"
                    procs.kill_group(proc.pid, signal.SIGKILL)
                    if job.uid is not None:
                        # its setsid escapees too (they may be the writers); reaped once the program is
                        isolation.kill_uid(job.uid, reap=False)
                    phase, deadline, next_count = "killed", time.monotonic() + _DRAIN, float("inf")
            timeout = max(0.0, min(deadline, next_count) - time.monotonic())
            events = sel.select(timeout)
            if not events and time.monotonic() >= deadline:
                if phase == "running":
                    outcome = Outcome.TIMED_OUT
                    procs.kill_group(proc.pid, signal.SIGTERM)
                    phase, deadline = "terminating", time.monotonic() + job.spec.kill_grace
                elif phase == "terminating":
                    procs.kill_group(proc.pid, signal.SIGKILL)
                    phase, deadline = "killed", time.monotonic() + _DRAIN
                else:
                    break  # exited, but something we could not kill still holds the pipes
            for key, _ in events:
                fd = key.fd
                if fd == job._wake_r:
                    os.read(fd, 64)
                    if phase == "running":
                        outcome = Outcome.CANCELLED if job.stop_reason == "cancel" else Outcome.STOPPED
                        procs.kill_group(proc.pid, signal.SIGTERM)
                        phase, deadline = "terminating", time.monotonic() + job.spec.kill_grace
                elif fd == pidfd:
                    proc.wait()
                    sel.unregister(pidfd)
                    # the program is gone: whatever it left behind goes too, so the pipes close
                    procs.kill_group(proc.pid)
                    procs.kill_leftovers()
                    phase, deadline = "exited", time.monotonic() + _DRAIN
                else:
                    try:
                        chunk = os.read(fd, 65536)
                    except BlockingIOError:
                        continue
                    if chunk:
                        sinks[fd].write(chunk)
                    else:
                        sel.unregister(fd)
                        del sinks[fd]
    finally:
        sel.close()
        os.close(pidfd)
        if proc.returncode is None:
            procs.kill_group(proc.pid)
            proc.wait()
    return outcome


def _hit_file_limit(folder: Path) -> bool:
    """Whether a file below `folder` reached RLIMIT_FSIZE. Python and many programs ignore SIGXFSZ and
    fail with EFBIG instead, so the file's size is the reliable sign."""
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit == resource.RLIM_INFINITY:
        return False
    return any(stat.S_ISREG(st.st_mode) and st.st_size >= limit for _, st in isolation.walk(folder))


def reap_abandoned(jobs: Path) -> list[str]:
    """Kill the process group of the job a previous worker process started and never finished.

    A worker killed with SIGKILL cannot stop its job, which runs on in its own session; the next
    worker on the same folder finds it in `running.pid` (checked against the kernel's start time, so
    a reused pid, or a job that ended, is never killed) and ends it, so that a retried job never runs
    twice at once.
    """
    try:
        info = json.loads((jobs / RUNNING).read_text())
    except (OSError, ValueError):  # none, or left empty by a worker killed as it wrote it
        return []
    pgid = int(info.get("pgid", 0))
    if pgid > 1 and info.get("start") is not None and procs.start_time(pgid) == info["start"]:
        procs.kill_group(pgid)
        return [str(info.get("id"))]
    return []
