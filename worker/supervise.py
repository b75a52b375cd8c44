"""Runs one job's program to its end: a subprocess in its own session, its output pumped into capped
files, the whole group stopped at its timeout, on request, or past its disk budget; what happened told
in a Report. And, for the next worker process should this one die mid-job, the file that names the
running job's process group (`RUNNING`) and `reap_abandoned`, which reads it.
"""

from __future__ import annotations

import functools
import json
import os
import resource
import selectors
import signal
import stat
import subprocess
import time
from pathlib import Path

from . import isolation, procs
from .capture import CappedFile
from .job import Job, Settings
from .protocol import Outcome, Report
from .warm import ForkedProcess, WarmPool

#: a job's process: started fresh, or forked from a warm interpreter
Process = subprocess.Popen[bytes] | ForkedProcess

#: seconds to drain a job's pipes after it ended, in case something unkillable still holds them
_DRAIN = 2.0

#: seconds between two counts of a job's bytes on disk, at least (longer when counting takes long)
DISK_CHECK = 0.2

#: the running job's process group, for the next worker process should this one die (one job at a
#: time, so one file, rewritten in place for each job rather than made and removed)
RUNNING = "running.pid"


def execute(job: Job, argv: list[str], env: dict[str, str], settings: Settings,
            warm: WarmPool | None = None) -> Report:
    """Run the job's program (`argv`, in `env`) to its end, and say how it ended: forked from a warm
    interpreter when `warm` can, else started fresh."""
    spec = job.spec
    owner = (settings.uids.owner_uid, settings.uids.owner_gid) if settings.uids is not None else None
    out = CappedFile(job.staging.stdout, cap=spec.max_output_bytes, owner=owner)
    err = CappedFile(job.staging.stderr, cap=spec.max_output_bytes, owner=owner)
    try:
        proc = start(job, argv, env, warm)
    except OSError as exc:  # Popen's, or a forked child's that could not be set up (a cwd gone)
        out.close()
        err.close()
        return job.report.ended(Outcome.ERROR, finished_at=time.time(),
                                error=f"the program could not be started: {exc.strerror or exc}")
    # one write(), no temporary file: a worker killed before it lands leaves the file empty, which
    # reap_abandoned skips, as it would a job killed before this line
    (job.staging.jobs_dir / RUNNING).write_text(json.dumps({"id": job.spec.key, "pgid": proc.pid,
                                                        "start": procs.start_time(proc.pid)}))
    procs.make_oom_victim(proc.pid)
    ooms_before, refusals_before = procs.oom_kills(), procs.pids_refusals()
    try:
        outcome = supervise(job, proc, out, err, settings.max_disk_bytes)
    finally:
        procs.kill_group(proc.pid)
        if isinstance(proc, ForkedProcess):
            proc.release()
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
    if code == -signal.SIGXFSZ or (code and hit_file_limit(job.staging.output)):
        error = "a file the program wrote reached the worker's file size limit (jobs.max_file_bytes)"
    if job.stop_reason == "disk":
        error = (f"the job wrote more than {isolation.human(settings.max_disk_bytes)} (jobs.max_disk_bytes); "
                 "it was stopped")
    if outcome is Outcome.EXITED and code == -signal.SIGKILL and ooms_before is not None:
        after = procs.oom_kills()
        if after is not None and after > ooms_before:
            outcome = Outcome.OOM
            error = oom_error(spec.memory, procs.memory_limit())
    return job.report.ended(
        outcome, finished_at=time.time(), warm=isinstance(proc, ForkedProcess),
        exit_code=code if code is not None and code >= 0 else None,
        signal=-code if code is not None and code < 0 else None,
        error=error, stdout_bytes=out.total, stderr_bytes=err.total,
        stdout_truncated=out.truncated, stderr_truncated=err.truncated,
    )


def start(job: Job, argv: list[str], env: dict[str, str], warm: WarmPool | None) -> Process:
    """The job's process, in a session of its own: forked from a warm interpreter if `warm` takes it,
    else a fresh one. OSError if it could not be started."""
    spec = job.spec
    if warm is not None:
        forked = warm.launch(argv, fresh=spec.fresh_interpreter, cwd=job.staging.output, env=env,
                             memory_rlimit=spec.memory_rlimit, uid=job.uid)
        if forked is not None:
            return forked
    popen_extra: dict[str, object] = {}
    if job.uid is not None:
        # its own uid and gid, no supplementary groups (root's would stay otherwise), and so no capability
        popen_extra = {"user": job.uid, "group": job.uid, "extra_groups": []}
    if spec.memory_rlimit is not None:
        # in the child, after fork and before exec: the limit is the program's, never the worker's. A C builtin
        # bound by partial, so no Python code of ours runs in the forked child of this threaded process
        popen_extra["preexec_fn"] = functools.partial(
            resource.setrlimit, resource.RLIMIT_DATA, (spec.memory_rlimit, spec.memory_rlimit))
    return subprocess.Popen(  # argv is built from checked paths, never a shell
        argv, cwd=job.staging.output, env=env, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True, close_fds=True,
        **popen_extra,  # type: ignore[call-overload]
    )


def oom_error(requested: int | None, cgroup_limit: int | None) -> str:
    """The error of a program the kernel killed for memory, naming the limit it hit: the job's own (its
    manifest's `memory:`; the cgroup's limit is then that plus the worker's share), else the worker's."""
    said = "the program ran out of memory and was killed by the kernel"
    if requested is not None:
        return f"{said} (the job's memory limit is {procs.human_bytes(requested)})"
    return said + (f" (the worker's memory limit is {procs.human_bytes(cgroup_limit)})" if cgroup_limit else "")


def supervise(job: Job, proc: Process, out: CappedFile, err: CappedFile,
              max_disk: int = 0) -> Outcome:
    """Pump output until the program exits; stop the group at the timeout, on request, or past its disk
    budget (counted every DISK_CHECK seconds or so while it runs). The outcome."""
    assert proc.stdout is not None and proc.stderr is not None
    watch = _Supervision(job, proc, {proc.stdout.fileno(): out, proc.stderr.fileno(): err}, max_disk)
    try:
        watch.run()
    finally:
        watch.close()
    return watch.outcome


class _Supervision:
    """One program's supervision loop: its pipes, its end (a pidfd) and the job's stop requests in one
    selector, and where it is in being stopped: "running" -> "terminating" (SIGTERM sent) -> "killed"
    (SIGKILL sent); "exited" once reaped. `deadline` is when the present phase runs out."""

    def __init__(self, job: Job, proc: Process, sinks: dict[int, CappedFile], max_disk: int) -> None:
        self.job, self.proc, self.sinks, self.max_disk = job, proc, sinks, max_disk
        self.sel = selectors.DefaultSelector()
        for fd in sinks:
            os.set_blocking(fd, False)
            self.sel.register(fd, selectors.EVENT_READ)
        try:
            self.pidfd = os.pidfd_open(proc.pid)
        except ProcessLookupError:
            if not isinstance(proc, ForkedProcess):
                raise
            # forked by a server that died since, and already reaped by the worker: it ended, and wait()
            # says how; a pipe with a byte in it stands for the readable pidfd
            self.pidfd, ended = os.pipe()
            os.write(ended, b"x")
            os.close(ended)
        self.sel.register(self.pidfd, selectors.EVENT_READ)
        self.sel.register(job.wake_fd, selectors.EVENT_READ)
        self.outcome = Outcome.EXITED
        self.phase = "running"
        self.deadline = time.monotonic() + job.spec.timeout
        self.next_count = time.monotonic() + DISK_CHECK if max_disk else float("inf")

    def run(self) -> None:
        while self.sinks or self.phase != "exited":
            if time.monotonic() >= self.next_count and self.phase != "exited":
                self._count_disk()
            events = self.sel.select(max(0.0, min(self.deadline, self.next_count) - time.monotonic()))
            if not events and time.monotonic() >= self.deadline and not self._escalate():
                return  # exited, but something we could not kill still holds the pipes
            for key, _ in events:
                self._ready(key.fd)

    def close(self) -> None:
        self.sel.close()
        os.close(self.pidfd)
        if self.proc.returncode is None:
            procs.kill_group(self.proc.pid)
            self.proc.wait()

    def _count_disk(self) -> None:
        now = time.monotonic()
        used = isolation.disk_used(self.job.staging.output, self.job.uid)
        took = time.monotonic() - now
        # a huge tree takes long to count: count less often, so the job keeps most of the CPU
        self.next_count = time.monotonic() + max(DISK_CHECK, 10 * took)
        if used > self.max_disk and self.job.stop_reason is None:
            self.job.stop_reason = "disk"
            procs.kill_group(self.proc.pid, signal.SIGKILL)
            if self.job.uid is not None:
                # its setsid escapees too (they may be the writers); reaped once the program is
                isolation.kill_uid(self.job.uid, reap=False)
            self.phase, self.deadline, self.next_count = "killed", time.monotonic() + _DRAIN, float("inf")

    def _escalate(self) -> bool:
        """The present phase ran out: the timeout (SIGTERM), then the grace after it (SIGKILL). False once
        there is nothing left to send."""
        if self.phase == "running":
            self.outcome = Outcome.TIMED_OUT
            self._terminate()
        elif self.phase == "terminating":
            procs.kill_group(self.proc.pid, signal.SIGKILL)
            self.phase, self.deadline = "killed", time.monotonic() + _DRAIN
        else:
            return False
        return True

    def _terminate(self) -> None:
        procs.kill_group(self.proc.pid, signal.SIGTERM)
        self.phase, self.deadline = "terminating", time.monotonic() + self.job.spec.kill_grace

    def _ready(self, fd: int) -> None:
        if fd == self.job.wake_fd:
            os.read(fd, 64)
            if self.phase == "running":
                self.outcome = Outcome.CANCELLED if self.job.stop_reason == "cancel" else Outcome.STOPPED
                self._terminate()
        elif fd == self.pidfd:
            self.proc.wait()
            self.sel.unregister(self.pidfd)
            # the program is gone: whatever it left behind goes too, so the pipes close
            procs.kill_group(self.proc.pid)
            procs.kill_leftovers()
            self.phase, self.deadline = "exited", time.monotonic() + _DRAIN
        else:
            self._pump(fd)

    def _pump(self, fd: int) -> None:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return
        if chunk:
            self.sinks[fd].write(chunk)
        else:
            self.sel.unregister(fd)
            del self.sinks[fd]


def hit_file_limit(folder: Path) -> bool:
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
