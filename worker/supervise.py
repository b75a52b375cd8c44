"""Runs one job's program to its end: a subprocess in its own session, its output pumped into capped
files, the whole group stopped at its timeout, on request, or past its disk budget; what happened told
in a Report. And, for the next worker process should this one die mid-job, the file that names the
running job's process group (`RUNNING`) and `reap_abandoned`, which reads it.
"""

from __future__ import annotations

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

#: seconds to drain a job's pipes after it ended, in case something unkillable still holds them
_DRAIN = 2.0

#: seconds between two counts of a job's bytes on disk, at least (longer when counting takes long)
DISK_CHECK = 0.2

#: the running job's process group, for the next worker process should this one die (one job at a
#: time, so one file, rewritten in place for each job rather than made and removed)
RUNNING = "running.pid"


def execute(job: Job, argv: list[str], env: dict[str, str], settings: Settings) -> Report:
    """Run the job's program (`argv`, in `env`) to its end, and say how it ended."""
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
        outcome = supervise(job, proc, out, err, settings.max_disk_bytes)
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
    if code == -signal.SIGXFSZ or (code and hit_file_limit(job.staging.output)):
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


def supervise(job: Job, proc: subprocess.Popen[bytes], out: CappedFile, err: CappedFile,  # noqa: C901
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
    sel.register(job.wake_fd, selectors.EVENT_READ)
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
                if fd == job.wake_fd:
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
