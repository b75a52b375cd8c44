"""Sizes in docker's syntax ("512m", "2g", "1.5g", or a number of bytes), as config.yaml and manifests write
them, and back into words. One parser, so a size means the same in a manifest, in the config and to the engine.
"""

from __future__ import annotations

import re

#: what a size may look like: a number, then optionally b, k, m or g (any case), optionally followed by "b"
#: ("512mb"), as `docker run --memory` takes it
SIZE = r"^\s*[0-9]+(\.[0-9]+)?\s*([bBkKmMgG][bB]?)?\s*$"
_SIZE = re.compile(SIZE)
_UNITS = {"b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def parse_size(value: str | int) -> int:
    """Bytes in `value`: an int is bytes already; a string in docker's syntax. ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError("a size is a number of bytes or a string such as 512m")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    match = _SIZE.match(value)
    if match is None:
        raise ValueError(f"{value!r} is not a size such as 512m or 2g")
    text = value.strip().lower()
    unit = match.group(2).lower()[0] if match.group(2) else "b"
    number = text.rstrip("bkmg ").strip()
    return int(float(number) * _UNITS[unit])


def human_size(n: int) -> str:
    """`n` bytes in words: "64 MiB", "1.5 GiB"."""
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.4g} {unit}"
    return f"{n} bytes"
