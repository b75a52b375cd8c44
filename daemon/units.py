"""Sizes and durations as people write them in config.yaml, manifests and on the command line: "512m",
"2g", "30d", "90m". One parser each, so a size means the same in a manifest, in the config and to the
engine, and every key and option that takes a duration reads it the same way."""

from __future__ import annotations

import re

from dropq.errors import DropqError


class UnitError(DropqError, ValueError):
    """Not a size or a duration (a ValueError too, so pydantic validators and callers alike catch it)."""


#: what a size may look like: a number, then optionally b, k, m or g (any case), optionally followed by "b"
#: ("512mb"), as `docker run --memory` takes it
SIZE = r"^\s*[0-9]+(\.[0-9]+)?\s*([bBkKmMgG][bB]?)?\s*$"
_SIZE = re.compile(SIZE)
_UNITS = {"b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
#: seconds in one of each suffix
DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_size(value: str | int) -> int:
    """Bytes in `value`: an int is bytes already; a string in docker's syntax (1024-based units)."""
    if isinstance(value, bool):
        raise UnitError("a size is a number of bytes or a string such as 512m")
    if isinstance(value, int):
        if value < 0:
            raise UnitError("a size cannot be negative")
        return value
    match = _SIZE.match(value)
    if match is None:
        raise UnitError(f"{value!r} is not a size such as 512m or 2g")
    text = value.strip().lower()
    unit = match.group(2).lower()[0] if match.group(2) else "b"
    number = text.rstrip("bkmg ").strip()
    return int(float(number) * _UNITS[unit])


def human_size(n: float) -> str:
    """`n` bytes in words: "64 MiB", "1.5 GiB"."""
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.4g} {unit}"
    return f"{int(n)} bytes"


def parse_duration(text: str) -> float:
    """"30d" -> seconds; a number and a unit s, m, h or d."""
    found = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhd])", text.strip().lower())
    if found is None:
        raise UnitError(f"{text!r} is not a duration such as 30s, 15m, 12h or 30d")
    return float(found[1]) * DURATION_UNITS[found[2]]
