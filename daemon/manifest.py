"""Job manifests: untrusted YAML bytes in, a validated frozen Manifest out, or one ManifestError.

The error messages are what a person reads in result.yaml, so each names the key and says what is
expected.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import PurePosixPath
from types import MappingProxyType
from typing import Any

import yaml

from .config import JobDefaults
from .errors import ManifestError
from .paths import check_relative

MANIFEST_SUFFIXES = (".yaml", ".yml")
KEYS = ("program", "input", "inputs", "args", "output", "env", "timeout", "retries", "priority", "retry_on_exit")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
#: the daemon sets these itself; a manifest may not override them
_RESERVED_ENV = frozenset({"DROPQ_OUTPUT", "DROPQ_JOB_ID", "DROPQ_INPUTS"})
_MAX_TIMEOUT = 7 * 24 * 3600
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
    #: input files, relative to inbox/: `input` first, then `inputs`
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
        unknown = sorted(_short(k) for k in data if not isinstance(k, str) or k not in KEYS)
        if unknown:
            raise ManifestError(f"unknown key `{unknown[0]}`; a manifest may have: {', '.join(KEYS)}")
        if "program" not in data:
            raise ManifestError("the manifest has no `program:` key naming the program to run")
        inputs: list[str] = []
        if data.get("input") is not None:
            inputs.append(str(check_relative(data["input"], what="input")))
        for item in _str_list(data, "inputs"):
            inputs.append(str(check_relative(item, what="input")))
        if len(set(inputs)) != len(inputs):
            raise ManifestError("the same input file is named twice")
        return cls(
            program=program_file(data["program"]),
            inputs=tuple(inputs),
            args=tuple(_str_list(data, "args", scalars=True)),
            output=_output(data.get("output")),
            env=MappingProxyType(_env(data.get("env"))),
            timeout=_timeout(data.get("timeout", defaults.timeout)),
            retries=_int(data, "retries", defaults.retries, low=0, high=100),
            priority=_int(data, "priority", 0, low=-1_000_000, high=1_000_000),
            retry_on_exit=_exit_codes(data.get("retry_on_exit")),
        )

    def to_json(self) -> str:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        return json.dumps({**data, "env": dict(self.env)}, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        data = json.loads(text)
        return cls(
            **{**data, "inputs": tuple(data["inputs"]), "args": tuple(data["args"]),
               "env": MappingProxyType(data["env"]), "retry_on_exit": tuple(data.get("retry_on_exit", ()))}
        )


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


def _str_list(data: Mapping[Any, Any], key: str, *, scalars: bool = False) -> list[str]:
    value = data.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise ManifestError(f"`{key}` must be a list, e.g. {key}: [a, b]")
    out = []
    for item in value:
        if scalars and isinstance(item, int | float) and not isinstance(item, bool):
            item = str(item)
        if not isinstance(item, str):
            # the type only: a repr of an untrusted nested value can be enormous
            raise ManifestError(f"every item of `{key}` must be a string, not {type(item).__name__}")
        if "\x00" in item:
            raise ManifestError(f"an item of `{key}` contains a NUL byte")
        out.append(item)
    return out


def _output(value: object) -> str | None:
    if value is None:
        return None
    path = check_relative(value, what="output")
    if len(path.parts) != 1 or path.name in (".", ""):
        raise ManifestError("`output` must be a plain file name such as counts.txt, without folders")
    return str(PurePosixPath(path.name))


def _env(value: object) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ManifestError("`env` must be a mapping of variable names to values, e.g. env: {LANG: C.UTF-8}")
    env = {}
    for name, item in value.items():
        if not isinstance(name, str) or not _ENV_NAME.match(name):
            raise ManifestError(f"`env` has an invalid variable name {_short(name)}")
        if name in _RESERVED_ENV:
            raise ManifestError(f"`env` may not set {name}; dropq sets it")
        if isinstance(item, bool) or not isinstance(item, str | int | float):
            raise ManifestError(f"`env.{name}` must be a string")
        text = str(item)
        if "\x00" in text:
            raise ManifestError(f"`env.{name}` contains a NUL byte")
        env[name] = text
    return env


def _timeout(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ManifestError("`timeout` must be a positive number of seconds")
    if value > _MAX_TIMEOUT:
        raise ManifestError(f"`timeout` may be at most {_MAX_TIMEOUT} seconds (a week)")
    return float(value)


def _short(value: object, limit: int = 60) -> str:
    """An untrusted value for an error message: a string, shortened; anything else, its type only."""
    if isinstance(value, str):
        return value if len(value) <= limit else value[:limit] + "..."
    if isinstance(value, int | float | bool) or value is None:
        return str(value)
    return f"<{type(value).__name__}>"


def _exit_codes(value: object) -> tuple[int, ...]:
    if value is None:
        return ()
    items = value if isinstance(value, list) else [value]
    if not all(isinstance(c, int) and not isinstance(c, bool) and 1 <= c <= 255 for c in items):
        raise ManifestError("`retry_on_exit` must be an exit code from 1 to 255, or a list of them")
    return tuple(items)


def _int(data: Mapping[Any, Any], key: str, default: int, *, low: int, high: int) -> int:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ManifestError(f"`{key}` must be a whole number")
    if not low <= value <= high:
        raise ManifestError(f"`{key}` must be between {low} and {high}")
    return value
