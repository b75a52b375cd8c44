"""Validation of config.yaml and of manifests by pydantic v2, and its errors as one sentence a person reads.

Why pydantic v2 (and not msgspec): the same model that validates a file also writes its JSON Schema
(`dropq schema`), with a title and a description per key that editors show as the file is typed, so
the schema cannot drift from the validator; field validators carry our own messages; it is typed for
mypy; and it has wheels for every platform we run on. msgspec is faster, but validation speed does not
matter for a few files a second, and its schemas carry no per-field descriptions without duplicating
them. Only the daemon needs it (the worker image does not). Debian bookworm's python3-pydantic is
1.10 (v1), so there dropq takes pydantic from PyPI, like its other dependencies.

Models run in strict mode: YAML already gives typed values, and a `"2"` where a number belongs is a
mistake to report, not to coerce.

pydantic reports every problem it finds; a person fixing a file reads one at a time, so `first_error`
picks the most useful one (an unknown key before anything else, since a typo explains the rest) and
says it in one sentence that names the dotted key.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from pydantic_core import ErrorDetails, PydanticCustomError

#: error type of the messages our own validators write in full (they are used as they are)
OWN = "dropq"
#: error type of a path that leaves its folder (turned into an UnsafePathError)
UNSAFE_PATH = "dropq_unsafe_path"

_PHRASES: dict[str, str] = {
    "int_type": "must be a whole number",
    "int_from_float": "must be a whole number",
    "float_type": "must be a number",
    "finite_number": "must be a finite number",
    "string_type": "must be a string",
    "bool_type": "must be true or false",
    "list_type": "must be a list",
    "dict_type": "must be a mapping",
    "model_type": "must be a mapping",
    "model_attributes_type": "must be a mapping",
    "string_pattern_mismatch": "is not allowed here",
}
#: tried first: these explain the errors that follow them (a misspelt key leaves another one missing)
_FIRST = ("extra_forbidden", "missing")


def own(message: str) -> PydanticCustomError:
    """An error whose message is already the sentence to show (raise it from a validator)."""
    return PydanticCustomError(OWN, message)


def unsafe_path(message: str) -> PydanticCustomError:
    return PydanticCustomError(UNSAFE_PATH, message)


@dataclass(frozen=True)
class Problem:
    """One validation error, ready to be said: where (the dotted key), and what is wrong."""

    #: the keys leading to the value, e.g. ("workers", "count"); an int is an item's index
    loc: tuple[str | int, ...]
    #: pydantic's own location, union members' names included (a key a person wrote may look like one)
    raw_loc: tuple[str | int, ...]
    #: pydantic's error type, or OWN / UNSAFE_PATH
    kind: str
    #: the phrase after the key ("must be a whole number"), or the whole sentence for OWN / UNSAFE_PATH
    says: str
    #: the value found
    value: Any

    @property
    def key(self) -> str:
        return ".".join(str(p) for p in self.loc)


def first_error(exc: ValidationError) -> Problem:
    """The one error to report from a ValidationError."""
    errors = exc.errors(include_url=False)
    ranked = sorted(range(len(errors)), key=lambda i: (_rank(errors[i]), i))
    return _problem(errors[ranked[0]])


def _rank(error: ErrorDetails) -> int:
    kind = error["type"]
    return _FIRST.index(kind) if kind in _FIRST else len(_FIRST)


def _problem(error: ErrorDetails) -> Problem:
    kind, ctx = error["type"], error.get("ctx") or {}
    # a union reports one error per member, under the member's name (e.g. ("args", 0, "str")); the
    # member's name is not a key the person wrote. The first part is always a field's name, and the
    # last part of an unknown key is that key, whatever it looks like.
    raw = tuple(error["loc"])
    keep_last = kind in _FIRST or kind == "invalid_key"
    loc = tuple(p for i, p in enumerate(raw)
                if i == 0 or (keep_last and i == len(raw) - 1) or isinstance(p, int) or not _is_member_tag(p))
    if kind in (OWN, UNSAFE_PATH):
        says = error["msg"]
    elif kind == "literal_error":
        says = f"must be one of {_choices(ctx.get('expected', ''))}"
    elif kind in ("greater_than_equal", "less_than_equal", "greater_than", "less_than"):
        says = _range_phrase(kind, ctx)
    else:
        says = _PHRASES.get(kind, error["msg"][:1].lower() + error["msg"][1:])
    return Problem(loc=loc, raw_loc=raw, kind=kind, says=says, value=error.get("input"))


def _is_member_tag(part: str) -> bool:
    return part in ("str", "int", "float", "bool", "list[int]", "list[str]") or part.startswith(
        ("constrained-", "function-", "literal[")
    )


def _choices(expected: str) -> str:
    """pydantic's "'auto', 'local' or 'docker'" as "auto, local, docker"."""
    return ", ".join(p.strip(" '") for p in expected.replace(" or ", ",").split(","))


def _range_phrase(kind: str, ctx: Mapping[str, Any]) -> str:
    bound = next(iter(ctx.values()), "")
    return {
        "greater_than_equal": f"must be at least {bound}",
        "less_than_equal": f"must be at most {bound}",
        "greater_than": "must be positive" if bound == 0 else f"must be greater than {bound}",
        "less_than": f"must be less than {bound}",
    }[kind]


def kind_of(value: Any) -> str:
    """What a YAML value is, in words: "a string", "a list", "true/false"."""
    return {dict: "a mapping", list: "a list", str: "a string", bool: "true/false", type(None): "null",
            int: "a whole number", float: "a decimal number"}.get(type(value), type(value).__name__)


def known_keys(model: type[Any], loc: Sequence[str | int]) -> list[str]:
    """The keys a nested model at `loc` (the parent of an unknown key) accepts."""
    for part in loc:
        field = model.model_fields.get(part)
        if field is None or not hasattr(field.annotation, "model_fields"):
            return []
        model = field.annotation
    return sorted(model.model_fields)

