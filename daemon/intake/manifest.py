"""Job manifests: untrusted YAML bytes in, a validated frozen Manifest out, or one ManifestError.

The bytes are checked here (size, UTF-8, YAML aliases, `yaml.safe_load`); the mapping they hold is
validated by the pydantic model in manifest_file.py, whose JSON Schema `dropq schema manifest` prints.
The error messages are what a person reads in result.yaml, so each names the key and says what is
expected.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any, TypeVar

import yaml
from pydantic import ValidationError

from dropq.config import JobDefaults
from dropq.errors import ManifestError
from dropq.intake.manifest_file import KEYS, GlobValues, ManifestFile, is_from_outbox, placed_input, refusal
from dropq.paths import check_relative
from dropq.units import human_size
from dropq.validation import first_error

__all__ = ["KEYS", "MANIFEST_SUFFIXES", "Manifest", "ManifestFile", "is_manifest_name", "program_file"]

MANIFEST_SUFFIXES = (".yaml", ".yml")
_SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
#: a manifest needs no YAML aliases at all; a handful is tolerated, an alias bomb ("billion laughs")
#: is refused before any object is built from it
MAX_ALIASES = 16


def is_manifest_name(name: str) -> bool:
    """Whether a file in the inbox is a manifest: *.yaml or *.yml, and not a dotfile. Any stem will do
    (`7.yml` too); `.yml` alone is a dotfile."""
    return name.endswith(MANIFEST_SUFFIXES) and not name.startswith(".")


@dataclass(frozen=True, kw_only=True)
class Manifest:
    #: the program's path inside programs/, e.g. "wordcount.py"
    program: str
    #: input files, as they are placed in the job's inputs/ folder: `input` first, then `inputs`; a file
    #: read from a finished job's outbox folder (`outbox:JOB/PATH`) is outbox/JOB/PATH
    inputs: tuple[str, ...] = ()
    args: tuple[str, ...] = ()
    #: if set, stdout is saved as output/<output> instead of stdout.txt
    output: str | None = None
    env: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    timeout: float
    retries: int
    priority: int = 0
    #: exit codes that mean "try again" (like HTCondor's retry_until): retried up to `retries` times
    retry_on_exit: tuple[int, ...] = ()
    #: ids of the jobs this one runs after (`after`, then those its `outbox:` inputs read from)
    after: tuple[str, ...] = ()
    #: the inputs read from finished jobs' outbox folders, as JOB/PATH (each is inputs/outbox/JOB/PATH)
    from_outbox: tuple[str, ...] = ()
    #: the webhook to POST the result to once published (checked against notify.allowed at claim)
    notify: str | None = None

    def inbox_inputs(self) -> tuple[str, ...]:
        """The input files taken from the inbox (not those read from an outbox folder)."""
        fetched = {placed_input(f"outbox:{item}") for item in self.from_outbox}
        return tuple(rel for rel in self.inputs if rel not in fetched)
    #: bytes of memory the job asks for (its limit while it runs), or None
    memory: int | None = None
    #: CPUs the job asks for, or None
    cpus: float | None = None
    #: an array's parameters in manifest order: (name, values, glob pattern or None); a glob's values are
    #: filled in when the manifest is claimed (dropq.intake.arrays.resolve). Empty: not an array
    matrix: tuple[tuple[str, tuple[str, ...], str | None], ...] = ()
    #: an array's input files as written, with placeholders (its `inputs` are then every task's files)
    task_inputs: tuple[str, ...] = ()
    #: an array's tasks not yet started are cancelled once this many have failed
    max_failures: int | None = None
    #: a task's parameter values, in the matrix's order
    parameters: tuple[tuple[str, str], ...] = ()

    @property
    def is_array(self) -> bool:
        return bool(self.matrix)
    #: start the program in a new interpreter, never forked from a warm one (dropq_worker.warm)
    fresh_interpreter: bool = False

    @classmethod
    def parse(cls, raw: bytes, *, defaults: JobDefaults, max_bytes: int) -> Manifest:
        if len(raw) > max_bytes:
            raise ManifestError(f"the manifest is {len(raw)} bytes; the limit is {max_bytes}")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ManifestError("the manifest is not UTF-8 text") from None
        data = _load_yaml(text)
        if not isinstance(data, dict):
            raise ManifestError("the manifest must be a YAML mapping with at least a `program:` key")
        return cls.from_mapping(data, defaults=defaults)

    @classmethod
    def from_mapping(cls, data: Mapping[Any, Any], *, defaults: JobDefaults) -> Manifest:
        try:
            doc = ManifestFile.model_validate(data)
        except ValidationError as exc:
            raise refusal(first_error(exc)) from None
        named = doc.input_files()
        return cls(
            program=program_file(doc.program),
            inputs=tuple(placed_input(item) for item in named),
            args=tuple(str(a) for a in doc.args or ()),
            output=doc.output,
            env=MappingProxyType({name: str(value) for name, value in (doc.env or {}).items()}),
            timeout=float(defaults.timeout if doc.timeout is None else doc.timeout),
            retries=defaults.retries if doc.retries is None else doc.retries,
            priority=doc.priority,
            retry_on_exit=doc.exit_codes(),
            after=doc.upstream(),
            from_outbox=tuple(item.split(":", 1)[1] for item in named if is_from_outbox(item)),
            notify=doc.notify,
            memory=_within("memory", doc.memory_bytes(), defaults.max_memory_bytes, human_size),
            cpus=_within("cpus", doc.cpus, defaults.max_cpus, lambda n: f"{n:g}"),
            matrix=tuple((name, (), values.glob) if isinstance(values, GlobValues) else
                         (name, tuple(str(v) for v in values), None) for name, values in (doc.matrix or {}).items()),
            max_failures=doc.max_failures,
            fresh_interpreter=doc.fresh_interpreter,
        )

    def to_json(self) -> str:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        return json.dumps({**data, "env": dict(self.env)}, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        data = json.loads(text)
        return cls(
            **{**data, "inputs": tuple(data["inputs"]), "args": tuple(data["args"]),
               "env": MappingProxyType(data["env"]), "retry_on_exit": tuple(data.get("retry_on_exit", ())),
               # absent from a manifest stored before pipelines
               "after": tuple(data.get("after", ())), "from_outbox": tuple(data.get("from_outbox", ())),
               "notify": data.get("notify"), "fresh_interpreter": data.get("fresh_interpreter", False),
               # absent from a manifest stored before arrays
               "matrix": tuple((name, tuple(values), pattern) for name, values, pattern in data.get("matrix", ())),
               "task_inputs": tuple(data.get("task_inputs", ())),
               "parameters": tuple((name, value) for name, value in data.get("parameters", ()))}
        )


_N = TypeVar("_N", int, float)


def _within(key: str, value: _N | None, maximum: _N | None, say: Callable[[_N], str]) -> _N | None:
    """A manifest's resource request, refused when it is more than the config's maximum (jobs.max_<key>)."""
    if value is not None and maximum is not None and value > maximum:
        raise ManifestError(f"`{key}` asks for {say(value)}, more than a job may ask for: {say(maximum)} "
                            f"(the config's jobs.max_{key})")
    return value


def program_file(value: object) -> str:
    """The file a `program:` value names inside programs/: a bare name gets `.py`."""
    if not isinstance(value, str):
        raise ManifestError("`program` must be a program name such as `wordcount`")
    path = check_relative(value, what="program")
    if not path.suffix:
        path = path.with_suffix(".py")
    return str(path)


def _load_yaml(text: str) -> Any:
    try:
        # an alias needs a '*': most manifests have none and skip this second pass
        aliases = 0
        if "*" in text:
            aliases = sum(isinstance(e, yaml.AliasEvent) for e in yaml.parse(text, Loader=_SafeLoader))
        if aliases > MAX_ALIASES:
            raise ManifestError(f"the manifest uses {aliases} YAML aliases; at most {MAX_ALIASES} are allowed")
        return yaml.load(text, Loader=_SafeLoader)  # noqa: S506 - the safe loader, C-accelerated when available
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" (line {where.line + 1}, column {where.column + 1})" if where else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ManifestError(f"the manifest is not valid YAML{at}: {problem}") from None


