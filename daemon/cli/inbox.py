"""Writing into the inbox the way the daemon expects: atomically, under a free name."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from dropq.config import Config
from dropq.errors import DropqError


def place_input(config: Config, path: Path) -> str:
    """An input's name relative to the inbox, copying it in (atomically) if it is elsewhere."""
    real = path.resolve()
    inbox = config.inbox.resolve()
    if real.is_relative_to(inbox):
        return str(real.relative_to(inbox))
    if not real.is_file():
        raise DropqError(f"input file not found: {path}")
    name = real.name
    n = 1
    while (inbox / name).exists():
        n += 1
        name = f"{real.stem}-{n}{real.suffix}"
    tmp = inbox / f".{name}.part"
    shutil.copyfile(real, tmp)
    os.rename(tmp, inbox / name)
    return name


def free_name(config: Config, name: str) -> str:
    stem, dot, suffix = name.rpartition(".")
    candidate, n = name, 1
    while (config.inbox / candidate).exists() or (config.outbox / candidate.rpartition(".")[0]).exists():
        n += 1
        candidate = f"{stem}-{n}{dot}{suffix}"
    return candidate


def drop(inbox: Path, name: str, data: bytes) -> None:
    """Write a dotfile, then rename it into place: the daemon never sees half a manifest."""
    tmp = inbox / f".{name}.{os.getpid()}.tmp"
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.rename(tmp, inbox / name)
