"""The worker protocol: everything the daemon and a worker agree on, defined once, here.

The daemon imports this module from the worker package (both ship in the same wheel), so a job spec,
a report, a health answer and the staging layout are built and read by the same code on both sides.
Each message is a frozen dataclass with `to_json()` and a validating `from_json()` that raises
`ProtocolError` only. Plain dataclasses, no validation library: the worker image has only Debian's
python3, Flask and waitress, and these few flat messages are on every job's path.

Versioning: every request to `/jobs` carries the daemon's version in the `Dropq-Protocol` header, and
`/health` answers with the worker's; each side refuses the other when they differ, with `mismatch()`.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from . import trees

#: The protocol version. Raised on any incompatible change to the messages below or the staging
#: layout, so that a daemon never uses a worker (an old image, say) that reads a job differently or
#: lays files out where the daemon does not look.
#: 2: one request per job (POST /jobs?wait=), flat staging (`<key>/`, `<key>.stdout`).
#: 3: typed messages; the spec carries the job's id (for $DROPQ_JOB_ID) beside the attempt's key;
#:    requests carry the `Dropq-Protocol` header.
#: 4: jobs may run under uids of their own (--job-uids): capture files are the daemon's (mode 0600) and
#:    the staging folder is 0711; a worker of 3 would run jobs unisolated, so it is replaced, not adopted.
PROTOCOL = 5

#: the request header naming the protocol the daemon speaks
HEADER = "Dropq-Protocol"

#: HTTP status of a request refused for its protocol version (426 Upgrade Required: the client must
#: speak another version, which the answer names in its own `Dropq-Protocol` header)
MISMATCH_STATUS = 426

#: no "." in a key: a job's side files are named `<key>.stdout` and so on, which no other key may be
_KEY_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-+@=,")


class ProtocolError(ValueError):
    """A message of the worker protocol is malformed (a missing or mistyped field, a bad key)."""


class Outcome(StrEnum):
    """How a job ended on its worker, as the worker reports it."""

    #: the program ended by itself; `exit_code` or `signal` says how
    EXITED = "exited"
    #: the program ran past its timeout and its process group was killed
    TIMED_OUT = "timed_out"
    #: the daemon cancelled it (DELETE /jobs/<key>), possibly before it started
    CANCELLED = "cancelled"
    #: the worker was shut down while it ran: not the job's fault, it must run again elsewhere
    STOPPED = "stopped"
    #: the kernel killed the program for using more memory than the worker's limit
    OOM = "oom"
    #: the worker could not run the program (it could not be started, or the worker failed)
    ERROR = "error"


class JobState(StrEnum):
    """Where a job is on its worker."""

    #: started; its program runs (or is being stopped)
    RUNNING = "running"
    #: ended; the report's outcome says how
    DONE = "done"


class WorkerState(StrEnum):
    """A worker as the daemon records it (store, `dropq workers`, dashboard, metrics)."""

    #: healthy and waiting for a job
    IDLE = "idle"
    #: running a job
    BUSY = "busy"
    #: its slot failed and is being repaired (a new worker, after a back-off); `detail` says why and when
    REPAIRING = "repairing"
    #: not usable until something changes (another protocol version, a slot whose repairs kept failing);
    #: `detail` says why
    BROKEN = "broken"


def mismatch(worker: str, *, worker_protocol: int, daemon_protocol: int, todo: str | None = None) -> str:
    """The one message for a daemon and a worker that speak different protocols, saying what to do.

    Both sides use it: the daemon when a worker's health answer names another version, the worker when
    a request does (the daemon then shows the worker's message)."""
    if todo is None:
        todo = ("rebuild the worker image with `dropq image build`" if worker_protocol < daemon_protocol else
                "the worker is newer than the daemon: upgrade dropq on the daemon's host, or rebuild the "
                "worker image with this daemon's `dropq image build`")
    return f"worker {worker} speaks protocol {worker_protocol}, this daemon speaks {daemon_protocol}: {todo}"


def _str(data: dict[str, Any], key: str, default: str | None = None) -> str:
    value = data.get(key, default)
    if not isinstance(value, str):
        raise ProtocolError(f"{key} must be a string, not {type(value).__name__}")
    return value


def _opt(data: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = data.get(key)
    if value is not None and (not isinstance(value, kind) or isinstance(value, bool) and kind is not bool):
        raise ProtocolError(f"{key} has the wrong type ({type(value).__name__})")
    return value


def _number(data: dict[str, Any], key: str, default: float) -> float:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ProtocolError(f"{key} must be a number")
    return float(value)


def _bytes(data: dict[str, Any], key: str) -> int | None:
    """An optional positive whole number of bytes."""
    value = _opt(data, key, int)
    if value is not None and value <= 0:
        raise ProtocolError(f"{key} must be a positive number of bytes")
    return value  # type: ignore[no-any-return]


def _strings(data: dict[str, Any], key: str) -> tuple[str, ...]:
    value = data.get(key, ())
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise ProtocolError(f"{key} must be a list of strings")
    return tuple(value)


def _object(data: Any, what: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ProtocolError(f"the {what} must be a JSON object")
    return data


def check_key(key: str) -> str:
    """`key` if it is a valid attempt key: it names files and a URL path, so only safe characters."""
    if not key or not set(key) <= _KEY_CHARS:
        raise ProtocolError(f"invalid job key {key!r} (letters, digits and _-+@=, only)")
    return key


@dataclass(frozen=True, kw_only=True, slots=True)
class JobSpec:
    """What the daemon asks a worker to run (the body of POST /jobs)."""

    #: the attempt's key: names the job on the worker (its URL, its staging files); unique per attempt
    key: str
    #: the job's id, which is its outbox folder's name; the program sees it as $DROPQ_JOB_ID
    job_id: str
    #: the program, relative to the worker's programs folder
    program: str
    #: input files, relative to the worker's inputs folder
    inputs: tuple[str, ...] = ()
    args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    #: seconds before the program is stopped
    timeout: float = 600.0
    #: seconds between SIGTERM and SIGKILL when it is stopped
    kill_grace: float = 5.0
    #: cap on each of stdout and stderr; past it the middle is cut
    max_output_bytes: int = 64 * 1024 * 1024
    #: the environment (an id, a folder of the worker's environments folder) whose interpreter runs a .py
    #: program; None: the worker's own interpreter
    environment: str | None = None
    #: the job's memory limit in bytes (its manifest's `memory:`), named when the kernel kills the program for
    #: memory; the pool enforces it (a docker worker's container limit). None: the worker's own limit
    memory: int | None = None
    #: bytes of private memory the program may map (RLIMIT_DATA, set in its process before exec): how a worker
    #: without a container of its own (the local pool) enforces `memory`. None: no such limit
    memory_rlimit: int | None = None
    #: start the program in a fresh interpreter, never forked from a warm one (its manifest's
    #: `fresh_interpreter:`); a worker that does not know it starts every job fresh anyway
    fresh_interpreter: bool = False

    def to_json(self) -> dict[str, Any]:
        # memory and memory_rlimit are read by workers that know them and ignored by older ones (of the same
        # protocol version): such a worker names its own limit in an out-of-memory error, not the job's
        return {"key": self.key, "job_id": self.job_id, "program": self.program, "inputs": list(self.inputs),
                "args": list(self.args), "env": self.env, "timeout": self.timeout, "kill_grace": self.kill_grace,
                "max_output_bytes": self.max_output_bytes, "environment": self.environment,
                "memory": self.memory, "memory_rlimit": self.memory_rlimit,
                "fresh_interpreter": self.fresh_interpreter}

    @classmethod
    def from_json(cls, data: Any) -> JobSpec:
        data = _object(data, "job description")
        for required in ("key", "job_id", "program"):
            if required not in data:
                raise ProtocolError(f"the job description has no {required}")
        env = data.get("env") or {}
        if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
            raise ProtocolError("env must map strings to strings")
        max_output = data.get("max_output_bytes", 64 * 1024 * 1024)
        if isinstance(max_output, bool) or not isinstance(max_output, int):
            raise ProtocolError("max_output_bytes must be an integer")
        spec = cls(key=check_key(_str(data, "key")), job_id=_str(data, "job_id"), program=_str(data, "program"),
                   inputs=_strings(data, "inputs"), args=_strings(data, "args"), env=dict(env),
                   timeout=_number(data, "timeout", 600.0), kill_grace=_number(data, "kill_grace", 5.0),
                   max_output_bytes=max_output, environment=_environment(data),
                   memory=_bytes(data, "memory"), memory_rlimit=_bytes(data, "memory_rlimit"),
                   fresh_interpreter=bool(_opt(data, "fresh_interpreter", bool)))
        if not spec.job_id or "\x00" in spec.job_id:
            raise ProtocolError(f"invalid job id {spec.job_id!r}")
        if spec.timeout <= 0 or spec.kill_grace < 0 or spec.max_output_bytes < 1024:
            raise ProtocolError("timeout must be positive, kill_grace not negative and max_output_bytes at least 1024")
        return spec


@dataclass(frozen=True, kw_only=True, slots=True)
class Report:
    """A job's state on its worker (the answer to POST /jobs and GET /jobs/<key>)."""

    key: str
    state: JobState
    started_at: float
    #: set once the job is done
    outcome: Outcome | None = None
    #: the program's exit code, when it exited by itself
    exit_code: int | None = None
    #: the signal that ended it, when one did
    signal: int | None = None
    #: what went wrong, in words for a person (the worker's view: a limit it hit, a start that failed)
    error: str | None = None
    finished_at: float | None = None
    stdout_bytes: int = 0
    stderr_bytes: int = 0
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    #: the program was forked from a warm interpreter (dropq_worker.warm), not started fresh; read
    #: leniently (absent from older workers' reports)
    warm: bool = False

    @property
    def done(self) -> bool:
        return self.state is JobState.DONE

    def ended(self, outcome: Outcome, *, finished_at: float, **details: Any) -> Report:
        """This report, done with `outcome` (and any of the other fields in `details`)."""
        return replace(self, state=JobState.DONE, outcome=outcome, finished_at=finished_at, **details)

    def to_json(self) -> dict[str, Any]:
        # by hand rather than dataclasses.asdict, which deep-copies and costs 20 times more on every job
        return {"key": self.key, "state": self.state.value, "started_at": self.started_at,
                "outcome": None if self.outcome is None else self.outcome.value, "exit_code": self.exit_code,
                "signal": self.signal, "error": self.error, "finished_at": self.finished_at,
                "stdout_bytes": self.stdout_bytes, "stderr_bytes": self.stderr_bytes,
                "stdout_truncated": self.stdout_truncated, "stderr_truncated": self.stderr_truncated,
                "warm": self.warm}

    @classmethod
    def from_json(cls, data: Any) -> Report:
        data = _object(data, "job report")
        try:
            state = JobState(_str(data, "state"))
            outcome = Outcome(data["outcome"]) if data.get("outcome") is not None else None
        except ValueError as exc:  # an unknown state or outcome
            raise ProtocolError(str(exc)) from None
        if state is JobState.DONE and outcome is None:
            raise ProtocolError("a done job's report has no outcome")
        return cls(key=check_key(_str(data, "key")), state=state, started_at=_number(data, "started_at", 0.0),
                   outcome=outcome, exit_code=_opt(data, "exit_code", int), signal=_opt(data, "signal", int),
                   error=_opt(data, "error", str), finished_at=_opt(data, "finished_at", (int, float)),
                   stdout_bytes=_opt(data, "stdout_bytes", int) or 0, stderr_bytes=_opt(data, "stderr_bytes", int) or 0,
                   stdout_truncated=bool(_opt(data, "stdout_truncated", bool)),
                   stderr_truncated=bool(_opt(data, "stderr_truncated", bool)),
                   warm=bool(_opt(data, "warm", bool)))


@dataclass(frozen=True, kw_only=True, slots=True)
class Health:
    """A worker's answer to GET /health. Read leniently, so that the daemon can tell which protocol a
    worker of another version speaks (versions before 2 did not say: they count as 1)."""

    #: the worker process (its incarnation, for local workers)
    pid: int
    protocol: int
    name: str = ""
    #: the worker package's version
    version: str = ""
    #: the key of the job it runs, if any
    job: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> Health:
        data = _object(data, "health answer")
        pid, protocol = _opt(data, "pid", int), _opt(data, "protocol", int)
        if pid is None:
            raise ProtocolError("the health answer has no pid")
        return cls(pid=pid, protocol=1 if protocol is None else protocol, name=_str(data, "name", ""),
                   version=_str(data, "version", ""), job=_opt(data, "job", str))


@dataclass(frozen=True, slots=True)
class Staging:
    """A job attempt's files in its worker's staging folder, flat: `<key>/` is the program's working
    directory (which becomes the job's output/), and `<key>.stdout` and `<key>.stderr` lie beside it.
    One new directory per job, and nothing to delete afterwards (all three move into the outbox): new
    directories and recently freed inodes are the dearest file-system costs of a job (bench/RESULTS.md).
    The worker writes this layout; the daemon reads it at its own path for the same folder."""

    jobs_dir: Path
    key: str

    @property
    def output(self) -> Path:
        return self.jobs_dir / self.key

    @property
    def stdout(self) -> Path:
        return self.jobs_dir / f"{self.key}.stdout"

    @property
    def stderr(self) -> Path:
        return self.jobs_dir / f"{self.key}.stderr"

    def exists(self) -> bool:
        """Whether any of it is there (a commit interrupted half-way may have moved some pieces)."""
        return any(os.path.lexists(path) for path in (self.output, self.stdout, self.stderr))

    def remove(self) -> None:
        """Remove what is left of it (nothing, once published)."""
        try:
            os.rmdir(self.output)  # usually empty or gone by now: one system call
        except FileNotFoundError:
            pass
        except OSError:  # not empty (or not a directory): the slow way, safe for a tree of any depth
            trees.remove_tree(self.output)
        for path in (self.stdout, self.stderr):
            try:
                os.unlink(path)
            except FileNotFoundError:
                continue


#: an environment id: hex digits only, so that it names one folder and nothing else
ENVIRONMENT_ID = re.compile(r"[0-9a-f]{16}")


def _environment(data: dict[str, Any]) -> str | None:
    value = data.get("environment")
    if value is None:
        return None
    if not isinstance(value, str) or not ENVIRONMENT_ID.fullmatch(value):
        raise ProtocolError(f"environment must be an environment id (16 hex digits), not {value!r}")
    return value
