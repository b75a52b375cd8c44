"""What a person may write in a manifest: the pydantic model that validates it, and its JSON Schema.

`ManifestFile` is the file as written (`input` and `inputs` apart, numbers in `args`, defaults left
to the config); `dropq.manifest.Manifest` is the job made from it. The schema `dropq schema manifest`
prints is this model's, so what an editor accepts is what the daemon accepts. Why pydantic:
daemon/validation.py.

A refusal is one ManifestError (an UnsafePathError for a path that would leave its folder) whose
message names the key: it is what the person reads in result.yaml. Manifests are untrusted, so a
message shows a value found in one only shortened, and a nested value only by its type.
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator, model_validator

from dropq.errors import ManifestError, UnsafePathError
from dropq.intake.claims import MAX_ID_BYTES
from dropq.paths import check_relative
from dropq.units import SIZE, parse_size
from dropq.validation import OWN, UNSAFE_PATH, Problem, own, unsafe_path

ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"
#: the daemon sets these itself; a manifest may not override them
RESERVED_ENV = ("DROPQ_OUTPUT", "DROPQ_JOB_ID", "DROPQ_INPUTS", "DROPQ_TASK_INDEX", "DROPQ_TASK_COUNT")
MAX_TIMEOUT = 7 * 24 * 3600
MAX_RETRIES = 100
MAX_PRIORITY = 1_000_000
#: an input written `outbox:JOB/PATH` is file PATH of finished job JOB's outbox folder
OUTBOX_PREFIX = "outbox:"
#: such an input is placed in the job's inputs/ under this folder: inputs/outbox/JOB/PATH
OUTBOX_FOLDER = "outbox"
#: the least `memory:` a job may ask for: the engine refuses a container limit below 6 MiB
MIN_MEMORY = 6 * 1024 * 1024
MAX_CPUS = 1024

ExitCode = Annotated[int, Field(ge=1, le=255)]
#: a scalar passed to the program as text; strict mode refuses true/false here
Scalar = str | int | float
#: a matrix parameter's name, as `{name}` placeholders use it
PARAM_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"


class GlobValues(BaseModel):
    """`{glob: "photos/*.jpg"}`: the files in inbox/ the pattern matches, sorted, each claimed as an input"""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)
    glob: str = Field(min_length=1, max_length=1024)


def _schema_extra(schema: dict[str, Any]) -> None:
    """What the types cannot say in JSON Schema: env names are a closed set, three of them reserved."""
    for option in schema["properties"]["env"]["anyOf"]:
        if option.get("type") == "object":
            option["additionalProperties"] = False
            option["propertyNames"] = {"pattern": ENV_NAME, "not": {"enum": list(RESERVED_ENV)}}


class ManifestFile(BaseModel):
    """A dropq job manifest: drop it into inbox/ as NAME.yaml, and the job's results appear in outbox/NAME/."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, use_attribute_docstrings=True,
                              title="dropq job manifest", json_schema_extra=_schema_extra)

    program: str = Field(examples=["wordcount"])
    """the program to run, inside programs/ (a bare name gets .py: `wordcount` runs programs/wordcount.py)"""
    input: str | None = None
    """an input file, relative to inbox/ (drop it before the manifest), or `outbox:JOB/PATH`, file PATH of the
    outbox folder of job JOB, which this job then runs after (e.g. outbox:prep/output/clean.csv); passed as the
    first argument"""
    inputs: list[str] | None = None
    """more input files, relative to inbox/ or written `outbox:JOB/PATH`, passed after `input`"""
    args: list[Scalar] | None = None
    """further arguments for the program (numbers are passed as text)"""
    output: str | None = None
    """a file name: stdout is saved as output/NAME instead of stdout.txt"""
    env: dict[Annotated[str, Field(pattern=ENV_NAME)], Scalar] | None = None
    """environment variables for the program, e.g. {LANG: C.UTF-8}"""
    timeout: Annotated[float, Field(gt=0, le=MAX_TIMEOUT, allow_inf_nan=False)] | None = None
    """seconds the program may run before it is stopped (default: the config's jobs.timeout)"""
    retries: Annotated[int, Field(ge=0, le=MAX_RETRIES)] | None = None
    """further attempts when the worker running the job is lost (default: the config's jobs.retries)"""
    priority: int = Field(default=0, ge=-MAX_PRIORITY, le=MAX_PRIORITY)
    """higher runs first; first in, first out within a priority"""
    retry_on_exit: ExitCode | list[ExitCode] | None = None
    """exit codes that mean "try again": such a run is retried, up to `retries` times"""
    notify: str | None = Field(default=None, max_length=2048)
    """a URL the daemon POSTs the job's result to once it is published (signed; see README), which must start
    with one of the daemon's notify.allowed prefixes"""
    after: list[str] | None = None
    """ids of jobs this one runs after, e.g. [prep, fetch]: it waits until each has ended, and runs only if all
    of them succeeded (otherwise it is cancelled, naming the one that did not)"""
    memory: Annotated[str, Field(pattern=SIZE, examples=["2g"])] | Annotated[int, Field(ge=MIN_MEMORY)] | None = None
    """memory the job may use, in docker's syntax (512m, 2g) or bytes: its limit while it runs, and what it
    counts as against workers.capacity (at most the config's jobs.max_memory)"""
    cpus: Annotated[float, Field(gt=0, le=MAX_CPUS, allow_inf_nan=False)] | None = None
    """CPUs the job may use, e.g. 1.5: its share while it runs (docker pool), and what it counts as against
    workers.capacity (at most the config's jobs.max_cpus)"""
    fresh_interpreter: StrictBool = False
    """true: start the program in a new interpreter, never fork it from the worker's warm one (README: The warm
    interpreter)"""

    matrix: dict[Annotated[str, Field(pattern=PARAM_NAME)], list[Scalar] | GlobValues] | None = None
    """makes the job an array: it runs once per combination of these values (the cartesian product, keys in
    the order written), e.g. {size: [64, 128], photo: {glob: "photos/*.jpg"}}; `{size}` in args, input, inputs,
    output and env values is replaced by the task's value (`{{` is a brace)"""
    max_failures: Annotated[int, Field(ge=1)] | None = None
    """for an array: once this many tasks have failed, the tasks not yet started are cancelled (default: no
    limit)"""

    @field_validator("program", "output")
    @classmethod
    def _a_relative_path(cls, value: str | None, info: Any) -> str | None:
        return None if value is None else _relative(value, what=info.field_name)

    @field_validator("input")
    @classmethod
    def _an_input(cls, value: str | None) -> str | None:
        return None if value is None else _input(value)

    @field_validator("inputs")
    @classmethod
    def _relative_paths(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else [_input(item) for item in value]

    @field_validator("after")
    @classmethod
    def _job_ids(cls, value: list[str] | None) -> list[str] | None:
        for item in value or ():
            _job_id(item, what="`after`")
        if value is not None and len(set(value)) != len(value):
            raise own("`after` names the same job twice")
        return value

    @field_validator("notify")
    @classmethod
    def _a_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.startswith(("https://", "http://")) or any(c.isspace() or ord(c) < 32 for c in value):
            raise own("`notify` must be an http:// or https:// URL without spaces")
        return value

    @field_validator("matrix")
    @classmethod
    def _some_values(cls, value: dict[str, list[Scalar] | GlobValues] | None) -> Any:
        for name, values in (value or {}).items():
            if isinstance(values, list) and not values:
                raise own(f"`matrix.{name}` has no values")
            if isinstance(values, GlobValues):
                _relative(values.glob, what=f"matrix.{name}.glob")
        if value is not None and not value:
            raise own("`matrix` names no parameter")
        return value

    @field_validator("output")
    @classmethod
    def _a_plain_name(cls, value: str | None) -> str | None:
        if value is None:
            return None
        path = PurePosixPath(value)
        if len(path.parts) != 1 or path.name in (".", ""):
            raise own("`output` must be a plain file name such as counts.txt, without folders")
        return path.name

    @field_validator("args")
    @classmethod
    def _no_nul_in_args(cls, value: list[Scalar] | None) -> list[Scalar] | None:
        if any(isinstance(item, str) and "\x00" in item for item in value or ()):
            raise own("an item of `args` contains a NUL byte")
        return value

    @field_validator("env")
    @classmethod
    def _env_left_to_dropq(cls, value: dict[str, Scalar] | None) -> dict[str, Scalar] | None:
        for name, item in (value or {}).items():
            if name in RESERVED_ENV:
                raise own(f"`env` may not set {name}; dropq sets it")
            if isinstance(item, str) and "\x00" in item:
                raise own(f"`env.{name}` contains a NUL byte")
        return value

    @field_validator("memory")
    @classmethod
    def _enough_memory(cls, value: str | int | None) -> str | int | None:
        if value is not None and parse_size(value) < MIN_MEMORY:
            raise own("`memory` must be at least 6m (the least a container may be given)")
        return value

    def memory_bytes(self) -> int | None:
        return None if self.memory is None else parse_size(self.memory)

    @model_validator(mode="after")
    def _each_input_once(self) -> ManifestFile:
        named = self.input_files()
        if len(set(named)) != len(named):
            raise own("the same input file is named twice")
        placed: dict[str, str] = {}
        for item in named:
            # `outbox/prep/x` from the inbox and `outbox:prep/x` would both be inputs/outbox/prep/x
            if (other := placed.setdefault(placed_input(item), item)) != item:
                raise own(f"inputs {short(other)!r} and {short(item)!r} would both be "
                          f"inputs/{short(placed_input(item))}")
        return self

    def input_files(self) -> tuple[str, ...]:
        """Every input file: `input` first, then `inputs`."""
        return (*([self.input] if self.input is not None else []), *(self.inputs or ()))

    def upstream(self) -> tuple[str, ...]:
        """The jobs this one runs after: those of `after`, then those `outbox:` inputs read from, each once."""
        named = [*(self.after or ()), *(upstream_of(item) for item in self.input_files() if is_from_outbox(item))]
        return tuple(dict.fromkeys(named))

    def exit_codes(self) -> tuple[int, ...]:
        if self.retry_on_exit is None:
            return ()
        return tuple(self.retry_on_exit) if isinstance(self.retry_on_exit, list) else (self.retry_on_exit,)


def is_from_outbox(item: str) -> bool:
    """Whether input `item` (as validated) is read from a finished job's outbox folder."""
    return item.startswith(OUTBOX_PREFIX)


def upstream_of(item: str) -> str:
    """The job an `outbox:JOB/PATH` input reads from."""
    return PurePosixPath(item[len(OUTBOX_PREFIX):]).parts[0]


def placed_input(item: str) -> str:
    """Where input `item` is in the job's inputs/ folder: its inbox path, or outbox/JOB/PATH."""
    return f"{OUTBOX_FOLDER}/{item[len(OUTBOX_PREFIX):]}" if is_from_outbox(item) else item


def _input(value: str) -> str:
    """An input as written: a path relative to inbox/, or `outbox:JOB/PATH` (normalised, checked as strictly)."""
    if not value.startswith(OUTBOX_PREFIX):
        return _relative(value, what="input")
    rest = PurePosixPath(_relative(value[len(OUTBOX_PREFIX):], what="input"))
    if len(rest.parts) < 2:
        raise own(f"input {short(value)!r} must name a file in a job's outbox folder, "
                  "e.g. outbox:prep/output/clean.csv")
    _job_id(rest.parts[0], what=f"input {short(value)!r}")
    return f"{OUTBOX_PREFIX}{rest}"


def _job_id(value: str, *, what: str) -> None:
    """Refuse what cannot be a job id (an outbox folder's name)."""
    if not value or value in (".", "..") or value.startswith(".") or "/" in value or "\x00" in value:
        raise own(f"{what} names {short(value)!r}, which is not a job id (a job's id is its manifest's "
                  "name without .yaml, as in outbox/<id>/)")
    if len(value.encode("utf-8", "surrogateescape")) > MAX_ID_BYTES:
        raise own(f"{what} names a job id longer than {MAX_ID_BYTES} bytes")


def _relative(value: str, *, what: str) -> str:
    """`value` as a normalised relative path ("./a//b" is "a/b"), or an error that makes an UnsafePathError."""
    try:
        return str(check_relative(value, what=what))
    except UnsafePathError as exc:
        raise unsafe_path(str(exc)) from None


#: for a wrong type anywhere under these keys, the one sentence that says what is expected
_EXPECTED = {
    "program": "`program` must be a program name such as `wordcount`",
    "input": "`input` must be a path relative to inbox/, such as data.csv",
    "inputs": "`inputs` must be a list, e.g. inputs: [a.csv, b.csv]",
    "args": "`args` must be a list, e.g. args: [--top, 10]",
    "output": "`output` must be a plain file name such as counts.txt",
    "env": "`env` must be a mapping of variable names to values, e.g. env: {LANG: C.UTF-8}",
    "timeout": "`timeout` must be a positive number of seconds",
    "retries": "`retries` must be a whole number",
    "priority": "`priority` must be a whole number",
    "retry_on_exit": "`retry_on_exit` must be an exit code from 1 to 255, or a list of them",
    "after": "`after` must be a list of job ids, e.g. after: [prep, fetch]",
    "notify": "`notify` must be an http:// or https:// URL, at most 2048 characters",
    "memory": "`memory` must be a size such as 512m or 2g (docker's syntax), or a number of bytes",
    "cpus": "`cpus` must be a positive number of CPUs, such as 1.5",
    "matrix": "`matrix` must map parameter names to lists of values or to {glob: PATTERN}, e.g. "
              "matrix: {size: [64, 128]}",
    "max_failures": "`max_failures` must be a whole number of at least 1",
    "fresh_interpreter": "`fresh_interpreter` must be true or false",
}
_RANGES = {
    "timeout": f"`timeout` may be at most {MAX_TIMEOUT} seconds (a week)",
    "retries": f"`retries` must be between 0 and {MAX_RETRIES}",
    "priority": f"`priority` must be between {-MAX_PRIORITY} and {MAX_PRIORITY}",
    "memory": "`memory` must be at least 6m (the least a container may be given)",
    "cpus": f"`cpus` may be at most {MAX_CPUS}",
}


def refusal(problem: Problem) -> ManifestError:
    """The ManifestError that says `problem` to the person who wrote the manifest."""
    if problem.kind == UNSAFE_PATH:
        return UnsafePathError(problem.says)
    return ManifestError(_sentence(problem))


def _sentence(problem: Problem) -> str:
    loc, kind = problem.loc, problem.kind
    key = str(loc[0]) if loc else ""
    if kind in ("extra_forbidden", "invalid_key") and key == "matrix" and len(loc) > 1:
        return f"`matrix.{short(problem.raw_loc[1])}` may have only `glob:` (a pattern of files in inbox/)"
    if kind in ("extra_forbidden", "invalid_key"):
        return f"unknown key `{short(loc[0] if loc else '')}`; a manifest may have: {', '.join(KEYS)}"
    if kind == "missing":
        return "the manifest has no `program:` key naming the program to run"
    if kind == OWN:
        return problem.says
    if key == "env" and len(problem.raw_loc) >= 2:
        # ("env", NAME, "[key]") for the name itself, ("env", NAME, member) for its value
        name = short(problem.raw_loc[1])
        if problem.raw_loc[2:] == ("[key]",):
            return f"`env` has an invalid variable name {name}"
        return f"`env.{name}` must be a string"
    if key in ("inputs", "args", "after") and len(loc) >= 2:
        # the type only: a repr of an untrusted nested value can be enormous
        return f"every item of `{key}` must be a string, not {type(problem.value).__name__}"
    if key in _RANGES and kind in ("less_than_equal", "greater_than_equal"):
        return _RANGES[key]
    return _EXPECTED.get(key, f"`{key}` {problem.says}")


def short(value: object, limit: int = 60) -> str:
    """An untrusted value for an error message: a string, shortened; anything else, its type only."""
    if isinstance(value, str):
        return value if len(value) <= limit else value[:limit] + "..."
    if isinstance(value, int | float | bool) or value is None:
        return str(value)
    return f"<{type(value).__name__}>"


#: the keys a manifest may have, in the order the reference lists them
KEYS = tuple(ManifestFile.model_fields)
