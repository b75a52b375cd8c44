"""Capped capture of a job's stdout or stderr: the head is written as it comes, the tail is kept.

A program that floods its output must neither fill the disk nor lose the end of its output (the end
usually holds the error), so past the cap the middle is cut and a marker says how much.
"""

from __future__ import annotations

import os
from pathlib import Path

#: at most this much of the tail is held in memory, whatever the cap
_MAX_TAIL = 1024 * 1024


#: a capture file is made new, never opened through whatever is at its path (a planted symlink or FIFO)
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def create_new(path: Path, owner: tuple[int, int] | None = None) -> int:
    """A new file at `path`, made before the job starts, readable by its owner only (the daemon opens
    it up once published: a job that learnt another job's key still cannot read its output).

    Whatever was there (left by a worker that died, or planted where a job could write) is unlinked,
    never followed or opened: O_EXCL fails on a symlink or FIFO rather than going through it, and
    O_NOFOLLOW makes sure of it."""
    try:
        fd = os.open(path, _CREATE, 0o600)
    except FileExistsError:
        os.unlink(path)  # unlinks a symlink itself, a FIFO without opening it
        fd = os.open(path, _CREATE, 0o600)
    if owner is not None:
        os.fchown(fd, *owner)  # the daemon's, to read while the job runs and to move afterwards
    return fd


class CappedFile:
    def __init__(self, path: Path, *, cap: int, owner: tuple[int, int] | None = None) -> None:
        # unbuffered: each chunk read from the pipe is on disk at once, for `dropq logs --follow` and the
        # dashboard; the chunks are pipe-sized, so this costs no extra system calls worth counting
        self._file = open(create_new(path, owner), "wb", buffering=0)  # closed in close()
        self._tail_cap = min(cap // 2, _MAX_TAIL)
        self._head_cap = cap - self._tail_cap
        self._written = 0
        self._tail = bytearray()
        self.total = 0

    def write(self, data: bytes) -> None:
        self.total += len(data)
        if self._written < self._head_cap:
            n = min(len(data), self._head_cap - self._written)
            self._file.write(data[:n])
            self._written += n
            data = data[n:]
        if data:
            self._tail += data
            if len(self._tail) > self._tail_cap:
                del self._tail[: len(self._tail) - self._tail_cap]

    @property
    def truncated(self) -> bool:
        return self.total > self._written + len(self._tail)

    def close(self) -> None:
        if self.truncated:
            cut = self.total - self._written - len(self._tail)
            self._file.write(f"\n[... dropq cut {cut} bytes here; the output limit was reached ...]\n".encode())
        self._file.write(self._tail)
        self._file.close()
