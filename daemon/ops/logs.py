"""The daemon's log lines: readable text for a terminal or journald, or one JSON object per line.

Every line about a job starts with `job <id>:` (the code logs them as `log.info("job %s: ...", job_id)`),
so a job's whole history is one `grep` or one `journalctl -g` away, and the JSON format can give the
id a field of its own without every call site passing it twice.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

from dropq.escape import printable

# journald reads a "<N>" prefix as the line's priority (sd-daemon(3)), so warnings show in colour
# and `journalctl -p warning` works
_SYSLOG_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


def job_of(record: logging.LogRecord) -> str | None:
    """The job a log record is about, by the `job %s:` convention."""
    if hasattr(record, "dropq_job"):
        return record.dropq_job  # type: ignore[no-any-return]
    if isinstance(record.msg, str) and record.msg.startswith("job %s") and isinstance(record.args, tuple):
        return str(record.args[0]) if record.args else None
    return None


class EscapeFilter(logging.Filter):
    """Makes each record's message one line of plain text: file names and job ids come from untrusted
    hands, and a newline in one would otherwise forge whole log lines, an escape sequence act on the
    terminal showing the log. Tracebacks (exc_info) keep their lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "dropq_job"):
            job = job_of(record)
            record.dropq_job = printable(job) if job is not None else None
            record.msg, record.args = printable(record.getMessage()), None
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
                            .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        job = job_of(record)
        if job is not None:
            doc["job"] = job
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


class JournalFormatter(logging.Formatter):
    """No time stamp (journald records its own) and the syslog priority as a prefix."""

    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{_SYSLOG_PRIORITY.get(record.levelno, 6)}>"
        # a traceback is several lines; journald takes each as its own entry, so prefix them all
        return "\n".join(prefix + line for line in super().format(record).splitlines())


def _under_journald(stream: TextIO) -> bool:
    """Whether `stream` is journald's: systemd sets JOURNAL_STREAM to the device:inode of that socket."""
    value = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError):
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def setup(level: str, fmt: str, stream: TextIO = sys.stderr) -> None:
    handler = logging.StreamHandler(stream)
    handler.addFilter(EscapeFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    elif _under_journald(stream):
        handler.setFormatter(JournalFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # watchdog's own debug lines are one per inotify event: far too many, and not about jobs
    logging.getLogger("watchdog").setLevel(max(logging.INFO, root.level))
    # werkzeug, the HTTP server: its info lines are per request (web._Handler turns those off already);
    # its errors, a request's traceback, are kept
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
