"""Where a job's stdout and stderr are (in its worker's staging folder while it runs, in its outbox folder
once published), and reading their head and tail without loading the whole file."""

from __future__ import annotations

import os
import re
import unicodedata
from pathlib import Path
from typing import Any, Literal

from dropq.config import Config
from dropq.pools.base import find_staging
from dropq.publish.outbox import job_key, key_secret
from dropq.queue.jobs import FINAL, JobStatus
from dropq.queue.store import JobRecord

Stream = Literal["stdout", "stderr"]

#: an ANSI escape sequence (colours, cursor moves): CSI ... final byte, or ESC and one more character
_ANSI = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|[@-Z\\-_])")


def stream_path(config: Config, job: JobRecord, stream: Stream, *, array: JobRecord | None = None) -> Path | None:
    """The file holding `stream` of `job` now, or None while there is none (queued, or gone). A task that
    ended is in its array's folder: being assembled in the spool, or published (`array`: its record)."""
    outcome = job.outcome or {}
    if job.status in FINAL and job.parent is not None:
        within = Path("tasks", str(job.task_index))
        folder = config.spool / job.parent / within
        if array is not None and array.status in FINAL:
            folder = config.outbox / array.folder / within
        saved_as = outcome.get("stdout_as")
        path = folder / "output" / saved_as if stream == "stdout" and saved_as else folder / f"{stream}.txt"
    elif job.status in FINAL:
        folder = config.outbox / job.folder
        saved_as = outcome.get("stdout_as")
        path = folder / "output" / saved_as if stream == "stdout" and saved_as else folder / f"{stream}.txt"
    elif job.status in (JobStatus.RUNNING, JobStatus.COMMITTING) and job.worker:
        try:
            key = job_key(job, key_secret(config.state))
        except OSError:  # the daemon's secret is not readable here (another user): no live output
            return None
        staging = find_staging(config, job.worker, key)
        if staging is None:
            return None
        path = staging.stdout if stream == "stdout" else staging.stderr
    else:
        return None
    # opened by name only if it is a plain file: a program may have left a link where its output was
    return path if path.is_file() and not path.is_symlink() else None


def head_and_tail(path: Path | None, limit: int) -> dict[str, Any]:
    """Up to `limit` bytes from the start and, when there is more, `limit` from the end, as text."""
    if path is None:
        return {"size": 0, "head": "", "tail": "", "omitted": 0}
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            head = fh.read(limit)
            tail = b""
            if size > 2 * limit:
                fh.seek(size - limit)
                tail = fh.read(limit)
            elif size > limit:
                tail = fh.read(size - limit)
    except FileNotFoundError:  # published or removed between the lookup and the open
        return {"size": 0, "head": "", "tail": "", "omitted": 0}
    return {"size": size, "head": head.decode("utf-8", "replace"), "tail": tail.decode("utf-8", "replace"),
            "omitted": max(0, size - len(head) - len(tail))}


def last_line(path: Path, *, limit: int = 4096, width: int = 200) -> str | None:
    """The last non-empty line of the file at `path`, as one safe line of text; None if there is none.

    Reads at most its last `limit` bytes (a program may leave gigabytes of stderr). The line is made
    safe to show anywhere (result.yaml, a terminal, the dashboard): escape sequences and every other
    control or format character are dropped, and it is cut to `width` characters.
    """
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            fh.seek(max(0, size - limit))
            data = fh.read(limit)
    except OSError:  # gone, unreadable, not a file: the error is then only the exit code, as before
        return None
    for line in reversed(data.decode("utf-8", "replace").splitlines()):
        text = "".join(ch for ch in _ANSI.sub("", line) if not unicodedata.category(ch).startswith("C")).strip()
        if text:
            return text if len(text) <= width else text[:width - 3] + "..."
    return None
