"""The daemon's configuration: every default in one place, read once at start, passed down explicitly.

`Config.load(path)` is the one constructor. It refuses unknown keys and wrong types with a message that
names the key, so a typo in config.yaml stops the daemon at start instead of being silently ignored.
Relative paths are taken relative to the folder of the config file.

The models are pydantic v2 models (why: daemon/validation.py), frozen and strict; the docstring under
each field is its description in the JSON Schema that `dropq schema config` prints, so the schema an
editor checks config.yaml with is made from these very classes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from dropq.errors import ConfigError, DropqError
from dropq.units import SIZE, parse_duration, parse_size
from dropq.validation import OWN, first_error, kind_of, known_keys, own

PoolKind = Literal["auto", "local", "docker"]
#: a size in docker's syntax (512m, 2g), or a number of bytes
Size = Annotated[str, Field(pattern=SIZE)] | Annotated[int, Field(ge=0)]
WatchMode = Literal["auto", "inotify", "polling"]


class _Section(BaseModel):
    """A part of config.yaml: frozen once read, no unknown keys, no coercion ("2" is not a number)."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, use_attribute_docstrings=True)


class DockerConfig(_Section):
    """How the docker pool creates its worker containers (used when `workers.pool` is docker)."""

    image: str = "dropq-worker:latest"
    """image the worker containers run; `dropq image build` makes it"""
    memory: str = "512m"
    """memory limit of one worker container, job included (docker syntax: 512m, 2g); a job whose manifest
    asks for `memory:` gets that plus `worker_memory` instead, while it runs"""
    worker_memory: Size = "64m"
    """memory kept for the worker process itself on top of a job's `memory:` request: the container's limit
    is the sum while such a job runs (the worker and its job share the container's memory)"""

    @property
    def memory_bytes(self) -> int:
        return parse_size(self.memory)

    @property
    def worker_memory_bytes(self) -> int:
        return parse_size(self.worker_memory)
    cpus: float = Field(default=1.0, gt=0)
    """CPUs one worker container may use"""
    pids_limit: int = Field(default=256, ge=1)
    """processes one worker container may hold (fork bombs stop here)"""
    tmpfs_size: str = "64m"
    """size of the container's private /tmp (a tmpfs)"""
    user: str | None = None
    """uid:gid the worker and its jobs run as inside the container (never root); null picks 65534:65534
    (nobody) when the daemon runs as root, else the daemon's own uid:gid"""
    network: str = "none"
    """"none" (default) keeps jobs off every network; the daemon reaches workers over a Unix socket"""
    runtime: str | None = None
    """container runtime, e.g. "runsc" for gVisor; null uses the engine's default"""
    managed_by: Literal["daemon", "compose"] = "daemon"
    """who creates the worker containers: the daemon (workers.count of them), or docker compose
    (docker-compose.yml; the daemon adopts every replica of its `worker` service)"""
    on_shutdown: Literal["leave", "remove"] = "leave"
    """what `dropq run` does with its containers when it stops: leave them running (to be adopted by the
    next start, so running jobs survive a restart) or remove them"""


class CapacityConfig(_Section):
    """What the jobs running at once may ask for in all: the balancer starts a job only while the sum of the
    running jobs' requests (their manifests' `memory:` and `cpus:`) stays within these."""

    memory: Size | None = None
    """memory of all running jobs' requests together (512m, 2g); null: the host's memory (MemTotal)"""
    cpus: float | None = Field(default=None, gt=0)
    """CPUs of all running jobs' requests together; null: the host's CPUs"""
    job_memory: Size = 0
    """what a job whose manifest asks for no `memory:` counts as (0: nothing; it runs within its worker's
    standing limit, workers.docker.memory on docker)"""
    job_cpus: float = Field(default=0.0, ge=0)
    """what a job whose manifest asks for no `cpus:` counts as (0: nothing)"""
    starve_after: float = Field(default=30.0, ge=0)
    """seconds the first job in the queue may wait for room while smaller jobs behind it start; past that
    no job behind it starts until it has run (0: strictly in order)"""

    @property
    def job_memory_bytes(self) -> int:
        return parse_size(self.job_memory)


class WorkersConfig(_Section):
    """Where the workers that run jobs come from, and how many."""

    pool: PoolKind = "auto"
    """where workers come from: local processes, docker containers, or auto (docker when an engine
    answers and the image exists, else local)"""
    count: int = Field(default=2, ge=0, le=256)
    """how many workers run jobs at once on this host; 0: none here, only agents' workers (needs `agents:`)"""
    python: str = "python3"
    """interpreter for `.py` programs on the local pool (a name looked up on PATH, or a path)"""
    health_timeout: float = Field(default=10.0, gt=0)
    """seconds a worker may take to answer its health check before it is restarted"""
    repair_max_failures: int = Field(default=10, ge=1)
    """failures in a row (with no job completed between) after which a worker slot is no longer repaired in
    the daemon: it is reported broken and the systemd watchdog is no longer fed, so systemd restarts the
    daemon. Until then each failure gives the slot's job back and replaces its worker, after a back-off of
    1 s doubling to 60 s (10 failures: about 4 minutes); 1 gives up at the first failure"""
    job_uids: int | None = Field(default=1_600_000_000, ge=1, le=2**31 - 1 - 256 * 8)
    """first of the uids jobs run as: each worker takes 8 (w1 from here, w2 8 further...) and runs each
    job under the next, so the kernel keeps a job off the worker, its socket and other jobs' files.
    Pick a range no host account or subuid range uses. null: jobs run as the worker's own uid"""
    warm: bool = True
    """fork each Python job from a warm interpreter of its environment (a fork server per worker and
    environment) rather than start a new one: the same to the program, a few milliseconds instead of tens
    (README: The warm interpreter). With job_uids too: each forked job drops to its uid before any of its
    environment's code runs"""
    preload: list[Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")]] = []
    """modules every warm interpreter imports before it forks jobs, e.g. [numpy]; one an environment lacks is
    skipped. A program adds its own with `preload = [...]` under [tool.dropq]. Under job_uids only these, and
    only those of the standard library, load (the fork server is privileged)"""
    docker: DockerConfig = DockerConfig()
    capacity: CapacityConfig = CapacityConfig()


class JobDefaults(_Section):
    """Defaults for what a manifest does not say."""

    timeout: float = Field(default=600.0, gt=0)
    """seconds a program may run before it is stopped and reported `timed_out`"""
    retries: int = Field(default=2, ge=0)
    """further attempts when the worker running a job is lost"""
    kill_grace: float = Field(default=5.0, ge=0)
    """seconds between SIGTERM and SIGKILL when a job is stopped"""
    max_output_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    """bytes kept of stdout and of stderr each; past that the head and tail are kept"""
    max_file_bytes: int = Field(default=1024 * 1024 * 1024, ge=1024)
    """the largest file a program may write (RLIMIT_FSIZE); past it the program is stopped"""
    max_disk_bytes: int = Field(default=4 * 1024 * 1024 * 1024, ge=1024)
    """bytes a job may have on disk at once (its output folder, and its files in /tmp where it runs
    under a uid of its own), counted while it runs; past it the job is stopped"""
    max_memory: Size | None = None
    """the most `memory:` a manifest may ask for (512m, 2g); a manifest asking more is rejected. null: no
    maximum but workers.capacity.memory"""
    max_cpus: float | None = Field(default=None, gt=0)
    """the most `cpus:` a manifest may ask for; a manifest asking more is rejected. null: no maximum but
    workers.capacity.cpus"""
    max_tasks: int = Field(default=10_000, ge=1)
    """the most tasks one manifest's `matrix:` may make (an array job); a manifest making more is rejected"""

    @property
    def max_memory_bytes(self) -> int | None:
        return None if self.max_memory is None else parse_size(self.max_memory)

    @model_validator(mode="after")
    def _file_limit_holds_the_captures(self) -> JobDefaults:
        if self.max_file_bytes < self.max_output_bytes:
            raise own("jobs.max_file_bytes must be at least jobs.max_output_bytes (the worker writes captures "
                      "that large)")
        return self


class RetryPolicy(_Section):
    """Exponential backoff between attempts: base * factor**(attempt-1), at most cap seconds."""

    base: float = Field(default=1.0, ge=0)
    """seconds before the second attempt"""
    factor: float = Field(default=2.0, ge=1)
    """each further wait is this many times the one before"""
    cap: float = Field(default=60.0, ge=0)
    """the longest wait, in seconds"""

    def delay(self, attempt: int) -> float:
        return float(min(self.cap, self.base * self.factor ** max(0, attempt - 1)))


class IntakeConfig(_Section):
    """How manifests are found in the inbox and claimed."""

    watch: WatchMode = "auto"
    """how the inbox is watched: inotify (close events), polling (for network filesystems), or auto"""
    settle: float = Field(default=2.0, ge=0)
    """seconds a file must stay unchanged before it is taken, where close events are unavailable"""
    input_grace: float = Field(default=10.0, ge=0)
    """seconds a claimed manifest waits for the input files it names, and for the jobs its `after` names to be
    dropped, before it is rejected"""
    rescan: float = Field(default=30.0, gt=0)
    """seconds between full rescans of the inbox (finds what the watcher missed)"""
    max_manifest_bytes: int = Field(default=64 * 1024, ge=1)
    """manifests larger than this are rejected unread"""
    max_inputs: int = Field(default=1000, ge=1)
    """a manifest naming more input files than this is rejected with the reason (the intake's work for
    a job waiting on its inputs grows with their number)"""
    max_queued: int = Field(default=2000, ge=1)
    """claim no more while this many jobs are queued; the rest wait in the inbox (where they are just as
    safe) and are claimed as the queue drains, so a huge backlog does not compete with the jobs"""


class RetentionConfig(_Section):
    """How long results are kept in the outbox (off unless a limit is set)."""

    max_age: str | None = None
    """remove committed job folders older than this (30d, 12h); null: no age limit"""
    max_bytes: str | None = None
    """remove the oldest committed job folders while the outbox holds more than this (50g, 500m); null: no
    size limit"""
    check_every: float = Field(default=300.0, gt=0)
    """seconds between two looks for folders past a limit"""

    @field_validator("max_age")
    @classmethod
    def _duration(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                parse_duration(value)
            except DropqError as exc:
                raise own(f"config key retention.max_age: {exc}") from None
        return value

    @field_validator("max_bytes")
    @classmethod
    def _size(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                parse_size(value)
            except DropqError as exc:
                raise own(f"config key retention.max_bytes: {exc}") from None
        return value

    @property
    def enabled(self) -> bool:
        return self.max_age is not None or self.max_bytes is not None

    @property
    def age_seconds(self) -> float | None:
        return parse_duration(self.max_age) if self.max_age is not None else None

    @property
    def size_limit(self) -> int | None:
        return parse_size(self.max_bytes) if self.max_bytes is not None else None


class ResultsConfig(_Section):
    """Who may read a published job folder. On a shared host (the daemon runs as root) each job's folder, and
    every file in it, is given to the user who dropped its manifest, with this mode; a daemon that does not run
    as root cannot give files away, and publishes as before. Not under `outbox:`, which is the outbox's path."""

    mode: str | int = "0700"
    """the mode of each job's outbox folder when the daemon runs as root, in octal: 0700 (its owner only),
    0750 (its owner's group may read it too)"""

    @field_validator("mode")
    @classmethod
    def _octal(cls, value: str | int) -> str | int:
        cls.bits(value)
        return value

    @staticmethod
    def bits(value: str | int) -> int:
        """The permission bits `value` says: a string of octal digits ('0700'), or the number YAML makes of an
        unquoted 0700 (it reads a leading 0 as octal)."""
        if isinstance(value, str):
            if not value.isascii() or not value.isdigit() or any(c in "89" for c in value) or len(value) > 4:
                raise own(f"config key results.mode must be octal permission bits such as '0700', not {value!r}")
            bits = int(value, 8)
        else:
            bits = value
        if not 0 <= bits <= 0o777:
            raise own(f"config key results.mode must be permission bits between 0000 and 0777, written in octal "
                      f"with a leading 0 (0700, or quoted: '0700'); {value} is not")
        if bits & 0o500 != 0o500:
            raise own(f"config key results.mode must let the folder's owner read and enter it (0500 at least), "
                      f"or they could not read their own results; {oct(bits).replace('0o', '0')} does not")
        return bits

    @property
    def mode_bits(self) -> int:
        return self.bits(self.mode)


class DiskConfig(_Section):
    """Free space the daemon keeps: below it, new manifests wait in the inbox."""

    min_free: str = "1g"
    """claim no new manifest while the outbox's or the state's filesystem has less free than this (1g, 500m)"""

    @field_validator("min_free")
    @classmethod
    def _size(cls, value: str) -> str:
        try:
            parse_size(value)
        except DropqError as exc:
            raise own(f"config key disk.min_free: {exc}") from None
        return value

    @property
    def min_free_bytes(self) -> int:
        return parse_size(self.min_free)


class NotifyConfig(_Section):
    """Telling someone a job has finished: webhooks a manifest asks for, and a command the operator runs."""

    allowed: list[str] = []
    """URL prefixes a manifest's `notify:` must start with (e.g. https://hooks.example.org/); empty: manifests
    may not ask for a webhook, so a manifest can never make the daemon call an address the operator did not
    allow"""
    secret_file: Path | None = None
    """the file holding the secret webhooks are signed with (X-Dropq-Signature-256, HMAC-SHA256 of the body);
    null: state/notify.secret, made on first use"""
    max_attempts: int = Field(default=8, ge=1, le=100)
    """deliveries of one webhook tried at most this often (back-off 5 s, doubling, at most 10 minutes)"""
    timeout: float = Field(default=10.0, gt=0, le=300)
    """seconds one delivery may take"""
    command: list[str] | None = None
    """a command run after each job is published, with the job's folder as its last argument (e.g.
    [/usr/local/bin/mail-result]); for local integrations. Operator-only: a manifest cannot set it"""
    command_timeout: float = Field(default=30.0, gt=0)
    """seconds the command may run before it is killed"""

    @field_validator("allowed")
    @classmethod
    def _http_prefixes(cls, value: list[str]) -> list[str]:
        for prefix in value:
            if not prefix.startswith(("https://", "http://")) or "/" not in prefix.split("://", 1)[1]:
                raise own(f"config key notify.allowed: {prefix!r} must be an http(s) URL prefix that names the host "
                          "and ends its path with a slash or more, e.g. https://hooks.example.org/dropq/")
        return value

    @field_validator("secret_file", mode="before")
    @classmethod
    def _relative_to_the_file(cls, value: Any, info: ValidationInfo) -> Path | None:
        if value is None:
            return None
        if not isinstance(value, str | Path) or not str(value):
            raise own(f"config key notify.{info.field_name} must be a path (a string), not {kind_of(value)}")
        base: Path = (info.context or {}).get("base", Path.cwd())
        return (base / value).resolve()


class HttpConfig(_Section):
    """The dashboard, the JSON API and /metrics, served by the daemon (read-only; a login when
    token_file is set)."""

    enabled: bool = True
    """serve the dashboard, the JSON API and /metrics"""
    host: str = "127.0.0.1"
    """the address to listen on; keep it on loopback unless a proxy in front adds authentication"""
    port: int = Field(default=8787, ge=0, le=65535)
    """the TCP port; 0 picks a free one (the address in use is shown by `dropq status`)"""
    threads: int = Field(default=4, ge=1, le=64)
    """requests served at once"""
    token_file: Path | None = None
    """a file holding a token (16 characters or more; e.g. `openssl rand -hex 32`): every request but
    /healthz and /login then needs `Authorization: Bearer <token>`, or the session cookie the page's login
    form gives; null: no login (anyone who can connect reads every job's output)"""
    socket: Path | None = None
    """serve on this Unix socket (mode 0660) instead of host:port, so that only the daemon's user and the
    members of socket_group can connect; null: TCP on host:port"""
    socket_group: str | int | None = None
    """the group (a name or a gid) the socket belongs to; null: the daemon's own group"""

    @field_validator("token_file", "socket", mode="before")
    @classmethod
    def _relative_to_the_file(cls, value: Any, info: ValidationInfo) -> Path | None:
        if value is None:
            return None
        if not isinstance(value, str | Path) or not str(value):
            raise own(f"config key http.{info.field_name} must be a path (a string), not {kind_of(value)}")
        base: Path = (info.context or {}).get("base", Path.cwd())
        return (base / value).resolve()

    @model_validator(mode="after")
    def _group_needs_socket(self) -> HttpConfig:
        if self.socket_group is not None and self.socket is None:
            raise own("config key http.socket_group needs http.socket: the group is that of the Unix socket")
        return self


class EnvironmentsConfig(_Section):
    """How programs' dependency environments are built (PEP 723 blocks, requirements.txt, pyproject.toml)."""

    index_url: str | None = None
    """the package index to install from (pip's --index-url); null: PyPI, or what uv is configured with"""
    find_links: Path | None = None
    """a folder of wheels (a wheelhouse, filled with `pip download`) searched besides the index"""
    no_index: bool = False
    """install from `find_links` only, never from an index: for hosts without a network"""
    keep_days: float = Field(default=30.0, gt=0)
    """an environment no job used for this many days is removed (the daemon checks once an hour)"""
    retry_failed_after: float = Field(default=300.0, ge=0)
    """seconds a failed build stands: jobs of that environment fail at once with its error until then,
    and the next job after it builds again (a changed dependency list is a new environment, built now)"""
    build_timeout: float = Field(default=900.0, gt=0)
    """seconds one build may take before it is stopped and counted as failed"""
    local_sdists: bool = False
    """on the local pool, build environments from wheels only (false), since building a source
    distribution runs its code on this host as the daemon's user; the docker pool builds in a container
    and always allows them"""

    @field_validator("find_links", mode="before")
    @classmethod
    def _relative_to_the_file(cls, value: Any, info: ValidationInfo) -> Path | None:
        if value is None:
            return None
        if not isinstance(value, str | Path) or not str(value):
            raise own(f"config key environments.{info.field_name} must be a path (a string), not {kind_of(value)}")
        base: Path = (info.context or {}).get("base", Path.cwd())
        return (base / value).resolve()

    @model_validator(mode="after")
    def _no_index_needs_links(self) -> EnvironmentsConfig:
        if self.no_index and self.find_links is None:
            raise own("config key environments.no_index needs environments.find_links: a folder of wheels to "
                      "install from")
        return self


class AgentTls(_Section):
    """The certificate the agents API is served with (`dropq agents init` makes a self-signed one)."""

    cert: Path
    """the certificate (PEM); agents check it with `dropq agent --ca`"""
    key: Path
    """its private key (PEM), readable by the daemon only"""

    @field_validator("cert", "key", mode="before")
    @classmethod
    def _relative_to_the_file(cls, value: Any, info: ValidationInfo) -> Path:
        if not isinstance(value, str | Path) or not str(value):
            raise own(f"config key agents.tls.{info.field_name} must be a path (a string), not {kind_of(value)}")
        base: Path = (info.context or {}).get("base", Path.cwd())
        return (base / value).resolve()


class AgentsConfig(_Section):
    """Agents on other hosts (`dropq agent`) that lease jobs from this daemon and run them on their own
    pool (README: More than one host)."""

    listen: str = "127.0.0.1:8788"
    """host:port the agents API listens on; an address other than loopback needs `tls` (or `insecure`)"""
    token_file: Path
    """a file holding the token every agent presents (16 characters or more; `dropq agents init` writes one)"""
    tls: AgentTls | None = None
    """serve HTTPS with this certificate and key; null: plain HTTP (loopback only, unless insecure)"""
    lease_seconds: float = Field(default=30.0, ge=1, le=3600)
    """an agent renews the lease of the job it runs this often at the latest; a lease not renewed in time
    ends the attempt as a lost worker (the job is retried elsewhere), and an agent cut off from the daemon
    that long stops its job and drops its result"""
    insecure: bool = False
    """allow plain HTTP on an address other than loopback (the token and the jobs' files travel in clear)"""
    max_upload: Size = "4g"
    """the largest result (output/, stdout, stderr, as a tar) an agent may send back for one job"""

    @field_validator("token_file", mode="before")
    @classmethod
    def _relative_to_the_file(cls, value: Any, info: ValidationInfo) -> Path:
        if not isinstance(value, str | Path) or not str(value):
            raise own(f"config key agents.{info.field_name} must be a path (a string), not {kind_of(value)}")
        base: Path = (info.context or {}).get("base", Path.cwd())
        return (base / value).resolve()

    @model_validator(mode="after")
    def _tls_off_loopback(self) -> AgentsConfig:
        host, _, port = self.listen.rpartition(":")
        if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise own(f"config key agents.listen must be host:port (e.g. 0.0.0.0:8788), not {self.listen!r}")
        if self.tls is None and not self.insecure and not _loopback(host):
            raise own(f"config key agents.listen is {self.listen}, not a loopback address, and agents.tls is not "
                      "set: the token and the jobs' files would cross the network in clear. Set agents.tls "
                      "(`dropq agents init` makes a certificate) or, on a network you trust, agents.insecure: true")
        return self

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])

    @property
    def max_upload_bytes(self) -> int:
        return parse_size(self.max_upload)


def _loopback(host: str) -> bool:
    import ipaddress

    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _folder(default: str, description: str) -> Any:
    # validate_default: the default name, too, is resolved against the config file's folder
    return Field(default=Path(default), validate_default=True, description=description)


class Config(_Section):
    """dropq's configuration (config.yaml). Every key is optional; paths are relative to this file."""

    model_config = ConfigDict(title="dropq configuration (config.yaml)")

    inbox: Path = _folder("inbox", "drop manifests (and their input files) here")
    outbox: Path = _folder("outbox", "one folder per job appears here: result.yaml, stdout.txt, stderr.txt, "
                                     "output/")
    programs: Path = _folder("programs", "the programs jobs may run; nothing outside this folder can be run")
    state: Path = _folder("state", "the SQLite database, the spool, worker sockets and staging folders")
    workers: WorkersConfig = WorkersConfig()
    jobs: JobDefaults = JobDefaults()
    retry: RetryPolicy = RetryPolicy()
    intake: IntakeConfig = IntakeConfig()
    http: HttpConfig = HttpConfig()
    environments: EnvironmentsConfig = EnvironmentsConfig()
    retention: RetentionConfig = RetentionConfig()
    results: ResultsConfig = ResultsConfig()
    disk: DiskConfig = DiskConfig()
    notify: NotifyConfig = NotifyConfig()
    agents: AgentsConfig | None = None
    """agents on other hosts that run this daemon's jobs (README: More than one host); null: none"""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """how much the daemon logs"""
    log_format: Literal["text", "json"] = "text"
    """text: one readable line per event (journald adds the time); json: one object per line"""
    # the file this was read from: not a key of the file, so not a field
    _source: Path | None = PrivateAttr(None)

    @field_validator("inbox", "outbox", "programs", "state", mode="before")
    @classmethod
    def _relative_to_the_file(cls, value: Any, info: ValidationInfo) -> Path:
        if not isinstance(value, str | Path) or not str(value):
            raise own(f"config key {info.field_name} must be a path (a string), not {kind_of(value)}")
        base: Path = (info.context or {})["base"]
        return (base / value).resolve()

    @model_validator(mode="after")
    def _someone_runs_jobs(self) -> Config:
        if self.workers.count == 0 and self.agents is None:
            raise own("config key workers.count is 0 and no agents are configured: nothing would run a job; "
                      "set workers.count to 1 or more, or configure `agents:`")
        return self

    @classmethod
    def load(cls, path: str | Path) -> Config:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path} is not UTF-8 text") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from None
        if data is None:
            data = {}
        try:
            return cls.from_mapping(data, base=path.resolve().parent, source=path.resolve())
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None

    @classmethod
    def from_mapping(cls, data: Any, *, base: Path, source: Path | None = None) -> Config:
        if not isinstance(data, dict):
            raise ConfigError(f"the configuration must be a mapping of keys, not {kind_of(data)}")
        try:
            config = cls.model_validate(data, context={"base": base})
        except ValidationError as exc:
            raise ConfigError(_message(exc)) from None
        config._source = source
        return config

    @property
    def source(self) -> Path | None:
        """The file this was read from (Config.load sets it)."""
        return self._source

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
    def envs_dir(self) -> Path:
        """Programs' environments, one folder per environment id (see dropq.envs)."""
        return self.state / "envs"

    @property
    def compose_dir(self) -> Path:
        """Shared mounts of compose-managed workers: work/<hostname>/ and inputs/<hostname>/."""
        return self.state / "compose"


def _message(exc: ValidationError) -> str:
    """One sentence naming the dotted key, e.g. "config key workers.count must be a whole number, not a
    string ('two')"."""
    problem = first_error(exc)
    if problem.kind == "extra_forbidden":
        known = ", ".join(known_keys(Config, problem.loc[:-1]))
        return f"unknown config key {problem.key}; known keys here: {known}"
    if problem.kind == OWN:
        return problem.says
    if problem.kind.endswith("_type") and problem.kind != "literal_error":
        return f"config key {problem.key} {problem.says}, not {kind_of(problem.value)}{_shown(problem.value)}"
    return f"config key {problem.key} {problem.says}; got {_shown(problem.value).strip(' ()')}"


def _shown(value: Any) -> str:
    """A short rendering of a scalar found in the file, e.g. " ('two')"; nothing for a mapping or list."""
    if isinstance(value, dict | list) or value is None:
        return ""
    text = repr(value)
    return f" ({text if len(text) <= 40 else text[:40] + '...'})"
