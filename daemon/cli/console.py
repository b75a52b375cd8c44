"""Terminal output for the CLI: tables, durations, a progress bar and a screen that redraws in place.

Plain text when stdout is not a terminal (a pipe, a log, a test), so every view stays grep-able.

Job ids (file names), errors that echo a manifest's keys, program names and worker details come from
whoever writes into the inbox. Everything shown here passes through `printable`: the table's cells,
each line a Screen draws and each line `say` writes, so no control character or bidi override from the
data reaches a terminal raw. The only escapes written are dropq's own (Screen's cursor moves).
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from dropq.escape import printable


def table(head: Sequence[str], rows: Sequence[Sequence[object]], *, right: Sequence[int] = ()) -> list[str]:
    """Columns as wide as their widest cell; the columns in `right` are right-aligned (numbers).

    Every cell is made printable first: one cell is one line, and its width is what the terminal shows."""
    cells = [[printable(str(c)) for c in head], *[["-" if c is None else printable(str(c)) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(head))]
    lines = []
    for row in cells:
        parts = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        lines.append("  ".join(parts).rstrip())
    return lines


def shown(text: str) -> str:
    """Text of several lines, each made printable: the line breaks stay, every other control is escaped."""
    return "\n".join(printable(line) for line in text.split("\n"))


def say(text: str, *, out: TextIO | None = None, end: str = "\n") -> None:
    """Write `text` (to stdout, or `out`) with whatever it quotes from jobs made printable."""
    print(shown(text), end=end, file=out if out is not None else sys.stdout)


def as_json(data: Any) -> str:
    """`data` as JSON, exact: json escapes controls itself, and with ensure_ascii a name that is not
    UTF-8 (a lone surrogate in Python) becomes a \\udcXX escape rather than an error on encoding."""
    return json.dumps(data, indent=2, ensure_ascii=True)


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 120:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 120:
        return f"{minutes}m{secs:02d}s"
    return f"{minutes // 60}h{minutes % 60:02d}m"


def bar(done: int, total: int, width: int = 30) -> str:
    fraction = 1.0 if total <= 0 else min(1.0, done / total)
    filled = int(round(fraction * width))
    return f"[{'#' * filled}{'.' * (width - filled)}] {fraction * 100:5.1f}%"


class Screen:
    """Redraws a block of lines in place on a terminal; elsewhere prints each frame after a blank line."""

    def __init__(self, out: TextIO = sys.stdout) -> None:
        self.out = out
        self.tty = out.isatty()

    def draw(self, lines: list[str]) -> None:
        if self.tty:
            width = shutil.get_terminal_size().columns
            # home, then each line cleared to its end: no flicker, and no scrollback filled with frames
            lines = [printable(line) for line in lines]
            self.out.write("\x1b[H" + "".join(line[:width] + "\x1b[K\n" for line in lines) + "\x1b[J")
        else:
            self.out.write("\n".join(printable(line) for line in lines) + "\n\n")
        self.out.flush()

    def start(self) -> None:
        if self.tty:
            self.out.write("\x1b[2J")

    def line(self, text: str) -> None:
        """One status line that replaces itself on a terminal (for submit --wait)."""
        text = printable(text)
        if self.tty:
            self.out.write("\r" + text + "\x1b[K")
        else:
            self.out.write(text + "\n")
        self.out.flush()

    def end_line(self) -> None:
        if self.tty:
            self.out.write("\n")
            self.out.flush()
