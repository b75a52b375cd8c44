"""Sizes and durations as people write them in config.yaml and on the command line: "50g", "512m",
"30d", "90m". One parser each, so every key and option that takes one reads it the same way."""

from __future__ import annotations

import re

from dropq.errors import DropqError

#: bytes in one of each suffix (powers of 1024, as docker and most tools read "g" and "m")
SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
#: seconds in one of each suffix
DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_size(text: str) -> int:
    """"50g" -> bytes; a number with an optional unit b, k, m, g or t (1024-based, any case)."""
    found = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([bkmgt]?)i?b?", text.strip().lower())
    if found is None:
        raise DropqError(f"{text!r} is not a size such as 512m, 50g or 1048576")
    return int(float(found[1]) * SIZE_UNITS[found[2]])


def parse_duration(text: str) -> float:
    """"30d" -> seconds; a number and a unit s, m, h or d."""
    found = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhd])", text.strip().lower())
    if found is None:
        raise DropqError(f"{text!r} is not a duration such as 30s, 15m, 12h or 30d")
    return float(found[1]) * DURATION_UNITS[found[2]]


def size_text(n: float) -> str:
    """Bytes for a person: "1.5 GiB", "12.0 MiB", "512 B"."""
    for unit, size in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"
