"""One job as this worker sees it: the worker's settings, the checked command line and environment the
program gets, and the `Job` object the runner, the supervision loop and the app share.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from . import isolation
from .protocol import JobSpec, JobState, ProtocolError, Report, Staging


class SpecError(ProtocolError):
    """The job description is malformed or names a path outside the worker's mounts."""


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
    #: fork Python jobs from warm interpreters (dropq_worker.warm); off here, on by the worker's command line
    warm: bool = False
    #: modules every warm interpreter imports before it forks jobs (besides a program's own `preload`)
    preload: tuple[str, ...] = ()


def inside(root: Path, rel: str, *, what: str) -> Path:
    """`root/rel` after resolving symlinks, refused unless it stays inside `root` (never trust a path)."""
    if not rel or "\x00" in rel or rel.startswith("/"):
        raise SpecError(f"invalid {what} path {rel!r}")
    real_root = os.path.realpath(root)
    real = os.path.realpath(os.path.join(real_root, rel))
    if os.path.commonpath([real_root, real]) != real_root or real == real_root:
        raise SpecError(f"{what} {rel!r} is outside the worker's {what} folder")
    return Path(real)


def command(spec: JobSpec, settings: Settings) -> list[str]:
    """The argv that runs the job's program on its inputs; SpecError for a path that leaves its folder,
    a program that does not exist, or one that is neither a .py file nor executable."""
    program = inside(settings.programs, spec.program, what="program")
    if not program.is_file():
        raise SpecError(f"program {spec.program!r} does not exist in the programs folder")
    inputs = [str(inside(settings.inputs, rel, what="input")) for rel in spec.inputs]
    if program.suffix == ".py":
        head = [interpreter(spec, settings), str(program)]
    elif os.access(program, os.X_OK):
        head = [str(program)]
    else:
        raise SpecError(f"program {spec.program!r} is neither a .py file nor executable")
    return [*head, *inputs, *spec.args]


def interpreter(spec: JobSpec, settings: Settings) -> str:
    """The interpreter of the job's environment, found by its id in this worker's own environments folder
    (the id is checked to be hex digits by the protocol), or the worker's own interpreter."""
    if spec.environment is None:
        return settings.python
    if settings.envs is None:
        raise SpecError("this worker has no environments folder (--envs), and the job runs in an environment")
    python = settings.envs / spec.environment / "bin" / "python"
    if not os.path.exists(python):
        raise SpecError(f"environment {spec.environment} is not in this worker's environments folder")
    return str(python)


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

    @property
    def wake_fd(self) -> int:
        """Readable once stop() was called: the supervision loop waits on it beside the program."""
        return self._wake_r

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

    def variables(self, settings: Settings) -> dict[str, str]:
        """The program's whole environment: nothing of the worker's leaks in but TMPDIR."""
        output = self.staging.output
        env = {
            "PATH": settings.path,
            "LANG": "C.UTF-8",
            "HOME": str(output),
            "TMPDIR": os.environ.get("TMPDIR", "/tmp"),
            "PYTHONDONTWRITEBYTECODE": "1",
            **self.spec.env,
            "DROPQ_JOB_ID": self.spec.job_id,
            "DROPQ_OUTPUT": str(output),
        }
        if self.spec.inputs:  # the daemon makes a job's inputs folder only when it has inputs
            env["DROPQ_INPUTS"] = str(settings.inputs / self.spec.key)
        return env
