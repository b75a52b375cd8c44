"""The daemon's configuration: every default in one place, read once at start, passed down explicitly.

`Config.load(path)` is the one constructor. It refuses unknown keys and wrong types with a message that
names the key, so a typo in config.yaml stops the daemon at start instead of being silently ignored.
Relative paths are taken relative to the folder of the config file.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import ConfigError

PoolKind = Literal["auto", "local", "docker"]
WatchMode = Literal["auto", "inotify", "polling"]


@dataclass(frozen=True, kw_only=True)
class DockerConfig:
    """How the docker pool creates its worker containers (used when `workers.pool` is docker)."""

    #: image the worker containers run; `dropq image build` makes it
    image: str = "dropq-worker:latest"
    #: memory limit of one worker container, job included (docker syntax: 512m, 2g)
    memory: str = "512m"
    #: CPUs one worker container may use
    cpus: float = 1.0
    #: processes one worker container may hold (fork bombs stop here)
    pids_limit: int = 256
    #: size of the container's private /tmp (a tmpfs)
    tmpfs_size: str = "64m"
    #: uid:gid the worker and its jobs run as inside the container (never root); null picks
    #: 65534:65534 (nobody) when the daemon runs as root, else the daemon's own uid:gid
    user: str | None = None
    #: "none" (default) keeps jobs off every network; the daemon reaches workers over a Unix socket
    network: str = "none"
    #: container runtime, e.g. "runsc" for gVisor; null uses the engine's default
    runtime: str | None = None
    #: who creates the worker containers: the daemon (workers.count of them), or docker compose
    #: (docker-compose.yml; the daemon adopts every replica of its `worker` service)
    managed_by: Literal["daemon", "compose"] = "daemon"
    #: what `dropq run` does with its containers when it stops: leave them running (to be adopted
    #: by the next start, so running jobs survive a restart) or remove them
    on_shutdown: Literal["leave", "remove"] = "leave"


@dataclass(frozen=True, kw_only=True)
class WorkersConfig:
    #: where workers come from: local processes, docker containers, or auto (docker when an
    #: engine answers and the image exists, else local)
    pool: PoolKind = "auto"
    #: how many workers run jobs at once
    count: int = 2
    #: interpreter for `.py` programs on the local pool (a name looked up on PATH, or a path)
    python: str = "python3"
    #: seconds a worker may take to answer its health check before it is restarted
    health_timeout: float = 10.0
    docker: DockerConfig = field(default_factory=DockerConfig)


@dataclass(frozen=True, kw_only=True)
class JobDefaults:
    """Defaults for what a manifest does not say."""

    #: seconds a program may run before it is stopped and reported `timed_out`
    timeout: float = 600.0
    #: further attempts when the worker running a job is lost
    retries: int = 2
    #: seconds between SIGTERM and SIGKILL when a job is stopped
    kill_grace: float = 5.0
    #: bytes kept of stdout and of stderr each; past that the head and tail are kept
    max_output_bytes: int = 64 * 1024 * 1024
    #: the largest file a program may write (RLIMIT_FSIZE); past it the program is stopped
    max_file_bytes: int = 1024 * 1024 * 1024


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """Exponential backoff between attempts: base * factor**(attempt-1), at most cap seconds."""

    base: float = 1.0
    factor: float = 2.0
    cap: float = 60.0

    def delay(self, attempt: int) -> float:
        return float(min(self.cap, self.base * self.factor ** max(0, attempt - 1)))


@dataclass(frozen=True, kw_only=True)
class IntakeConfig:
    #: how the inbox is watched: inotify (close events), polling (for network filesystems), or auto
    watch: WatchMode = "auto"
    #: seconds a file must stay unchanged before it is taken, where close events are unavailable
    settle: float = 2.0
    #: seconds a claimed manifest waits for the input files it names before it is rejected
    input_grace: float = 10.0
    #: seconds between full rescans of the inbox (finds what the watcher missed)
    rescan: float = 30.0
    #: manifests larger than this are rejected unread
    max_manifest_bytes: int = 64 * 1024
    #: claim no more while this many jobs are queued; the rest wait in the inbox (where they are just
    #: as safe) and are claimed as the queue drains, so a huge backlog does not compete with the jobs
    max_queued: int = 2000


@dataclass(frozen=True, kw_only=True)
class HttpConfig:
    """The dashboard, the JSON API and /metrics, served by the daemon (read-only, no login)."""

    enabled: bool = True
    #: the address to listen on; keep it on loopback unless a proxy in front adds authentication
    host: str = "127.0.0.1"
    #: the TCP port; 0 picks a free one (the address in use is shown by `dropq status`)
    port: int = 8787
    #: requests served at once
    threads: int = 4


@dataclass(frozen=True, kw_only=True)
class Config:
    inbox: Path
    outbox: Path
    programs: Path
    #: SQLite database, spool, worker sockets and staging folders live here
    state: Path
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    jobs: JobDefaults = field(default_factory=JobDefaults)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    intake: IntakeConfig = field(default_factory=IntakeConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    #: text: one readable line per event (journald adds the time); json: one object per line
    log_format: Literal["text", "json"] = "text"
    #: the file this was read from (not a key of the file)
    source: Path | None = None

    @classmethod
    def load(cls, path: str | Path) -> Config:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from None
        if data is None:
            data = {}
        return cls.from_mapping(data, base=path.resolve().parent, source=path.resolve())

    @classmethod
    def from_mapping(cls, data: Any, *, base: Path, source: Path | None = None) -> Config:
        defaults = {"inbox": "inbox", "outbox": "outbox", "programs": "programs", "state": "state"}
        if not isinstance(data, dict):
            raise ConfigError(f"the configuration must be a mapping of keys, not {_kind(data)}")
        merged = {**defaults, **data}
        config = _build(cls, merged, base=base, where="", skip={"source"})
        config = dataclasses.replace(config, source=source)
        _check_ranges(config)
        return config

    @property
    def spool(self) -> Path:
        return self.state / "spool"

    @property
    def database(self) -> Path:
        return self.state / "dropq.sqlite3"

    @property
    def workers_dir(self) -> Path:
        return self.state / "workers"

    @property
    def compose_dir(self) -> Path:
        """Shared mounts of compose-managed workers: work/<hostname>/ and inputs/<hostname>/."""
        return self.state / "compose"


def _check_ranges(config: Config) -> None:
    checks = [
        (config.workers.count >= 1, "workers.count must be at least 1"),
        (config.workers.count <= 256, "workers.count must be at most 256"),
        (config.jobs.timeout > 0, "jobs.timeout must be a positive number of seconds"),
        (config.jobs.retries >= 0, "jobs.retries must be 0 or more"),
        (config.jobs.kill_grace >= 0, "jobs.kill_grace must be 0 or more seconds"),
        (config.jobs.max_output_bytes >= 1024, "jobs.max_output_bytes must be at least 1024"),
        (config.jobs.max_file_bytes >= config.jobs.max_output_bytes,
         "jobs.max_file_bytes must be at least jobs.max_output_bytes (the worker writes captures that large)"),
        (config.intake.settle >= 0, "intake.settle must be 0 or more seconds"),
        (config.intake.input_grace >= 0, "intake.input_grace must be 0 or more seconds"),
        (config.intake.rescan > 0, "intake.rescan must be a positive number of seconds"),
        (config.intake.max_queued >= 1, "intake.max_queued must be at least 1"),
        (config.retry.base >= 0 and config.retry.factor >= 1, "retry.base must be >= 0 and retry.factor >= 1"),
        (config.workers.docker.cpus > 0, "workers.docker.cpus must be positive"),
        (0 <= config.http.port <= 65535, "http.port must be between 0 and 65535"),
        (1 <= config.http.threads <= 64, "http.threads must be between 1 and 64"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def _kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "true/false", type(None): "null"}.get(
        type(value), type(value).__name__
    )


def _build(cls: type, data: Any, *, base: Path, where: str, skip: set[str] = frozenset()) -> Any:  # type: ignore[assignment]
    if not isinstance(data, dict):
        raise ConfigError(f"{where.rstrip('.')} must be a mapping, not {_kind(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in skip}
    unknown = sorted(set(map(str, data)) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown config key {where}{unknown[0]!s}; known keys here: {', '.join(sorted(fields))}"
        )
    values = {}
    for name, value in data.items():
        values[name] = _convert(hints[name], value, base=base, key=f"{where}{name}")
    missing = [n for n, f in fields.items() if n not in values and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"missing config key {where}{missing[0]}")
    return cls(**values)


def _convert(hint: Any, value: Any, *, base: Path, key: str) -> Any:  # noqa: C901 - one branch per type
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        (inner,) = [o for o in options if o is not type(None)]
        return _convert(inner, value, base=base, key=key)
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ConfigError(f"config key {key} must be one of {', '.join(map(str, allowed))}; got {value!r}")
        return value
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, base=base, where=f"{key}.")  # type: ignore[arg-type]
    if hint is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"config key {key} must be a path (a string), not {_kind(value)}")
        return (base / value).resolve()
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key {key} must be true or false, not {_kind(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key {key} must be a whole number, not {_kind(value)}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"config key {key} must be a number, not {_kind(value)}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key {key} must be a string, not {_kind(value)}")
        return value
    raise ConfigError(f"config key {key} has an unsupported type")  # pragma: no cover - a programming error
