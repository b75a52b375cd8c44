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

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dropq.errors import ManifestError, UnsafePathError
from dropq.paths import check_relative
from dropq.sizes import SIZE, parse_size
from dropq.validation import OWN, UNSAFE_PATH, Problem, own, unsafe_path

ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"
#: the daemon sets these itself; a manifest may not override them
RESERVED_ENV = ("DROPQ_OUTPUT", "DROPQ_JOB_ID", "DROPQ_INPUTS")
MAX_TIMEOUT = 7 * 24 * 3600
MAX_RETRIES = 100
MAX_PRIORITY = 1_000_000
#: the least `memory:` a job may ask for: the engine refuses a container limit below 6 MiB
MIN_MEMORY = 6 * 1024 * 1024
MAX_CPUS = 1024

ExitCode = Annotated[int, Field(ge=1, le=255)]
#: a scalar passed to the program as text; strict mode refuses true/false here
Scalar = str | int | float


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
    """an input file, relative to inbox/ (drop it before the manifest); passed as the first argument"""
    inputs: list[str] | None = None
    """more input files, relative to inbox/, passed after `input`"""
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
    memory: Annotated[str, Field(pattern=SIZE, examples=["2g"])] | Annotated[int, Field(ge=MIN_MEMORY)] | None = None
    """memory the job may use, in docker's syntax (512m, 2g) or bytes: its limit while it runs, and what it
    counts as against workers.capacity (at most the config's jobs.max_memory)"""
    cpus: Annotated[float, Field(gt=0, le=MAX_CPUS, allow_inf_nan=False)] | None = None
    """CPUs the job may use, e.g. 1.5: its share while it runs (docker pool), and what it counts as against
    workers.capacity (at most the config's jobs.max_cpus)"""

    @field_validator("program", "input", "output")
    @classmethod
    def _a_relative_path(cls, value: str | None, info: Any) -> str | None:
        return None if value is None else _relative(value, what=info.field_name)

    @field_validator("inputs")
    @classmethod
    def _relative_paths(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else [_relative(item, what="input") for item in value]

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
        return self

    def input_files(self) -> tuple[str, ...]:
        """Every input file: `input` first, then `inputs`."""
        return (*([self.input] if self.input is not None else []), *(self.inputs or ()))

    def exit_codes(self) -> tuple[int, ...]:
        if self.retry_on_exit is None:
            return ()
        return tuple(self.retry_on_exit) if isinstance(self.retry_on_exit, list) else (self.retry_on_exit,)


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
    "memory": "`memory` must be a size such as 512m or 2g (docker's syntax), or a number of bytes",
    "cpus": "`cpus` must be a positive number of CPUs, such as 1.5",
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
    if key in ("inputs", "args") and len(loc) >= 2:
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
