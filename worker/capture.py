"""Capped capture of a job's stdout or stderr: the head is written as it comes, the tail is kept.

A program that floods its output must neither fill the disk nor lose the end of its output (the end
usually holds the error), so past the cap the middle is cut and a marker says how much.
"""

from __future__ import annotations

from pathlib import Path

#: at most this much of the tail is held in memory, whatever the cap
_MAX_TAIL = 1024 * 1024


class CappedFile:
    def __init__(self, path: Path, *, cap: int) -> None:
        # unbuffered: each chunk read from the pipe is on disk at once, for `dropq logs --follow` and the
        # dashboard; the chunks are pipe-sized, so this costs no extra system calls worth counting
        self._file = open(path, "wb", buffering=0)  # closed in close()
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
