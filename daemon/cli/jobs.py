"""`dropq jobs`: the jobs, newest first, filtered by status and age, as a table or as JSON."""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from typing import Any

from dropq.cli.console import as_json, duration, table
from dropq.cli.exits import Exit
from dropq.cli.lookup import open_store
from dropq.config import Config
from dropq.errors import DropqError
from dropq.queue.jobs import JobStatus
from dropq.queue.store import JobRecord

#: the seconds in one of each unit --since accepts
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
#: errors are cut to this many characters in the table (--json gives them whole)
ERROR_WIDTH = 60


def parse_since(text: str) -> float:
    """`--since` as seconds: a number and a unit (30s, 15m, 1h, 2d)."""
    found = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd])", text.strip())
    if found is None:
        raise DropqError(f"--since takes a number and a unit s, m, h or d (30s, 15m, 1h, 2d), not {text!r}")
    return float(found[1]) * UNITS[found[2]]


def parse_statuses(values: list[str]) -> list[JobStatus]:
    """`--status` as job states: names separated by commas, the option given once or more."""
    names = [name.strip() for value in values for name in value.split(",") if name.strip()]
    known = [s.value for s in JobStatus]
    for name in names:
        if name not in known:
            raise DropqError(f"--status takes job states separated by commas ({', '.join(known)}), not {name!r}")
    if values and not names:
        raise DropqError(f"--status takes job states separated by commas ({', '.join(known)})")
    return [JobStatus(name) for name in dict.fromkeys(names)]


def parse_limit(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise DropqError(f"--limit takes a whole number of jobs, 1 or more, not {text!r}")
    return int(text)


def cmd_jobs(config: Config, args: argparse.Namespace) -> int:
    # parsed here rather than by argparse, so that a bad value is one line (and exit 2) like every error
    statuses = parse_statuses(args.status)
    since = None if args.since is None else time.time() - parse_since(args.since)
    limit = parse_limit(args.limit)
    store = open_store(config)
    try:
        jobs, total = store.page(statuses, limit=limit, since=since)
    finally:
        store.close()
    now = time.time()
    if args.json:
        print(as_json([_as_json(job, now) for job in jobs]))
        return Exit.OK
    if not jobs:
        print("no jobs" + (" match" if statuses or since is not None else ""))
        return Exit.OK
    print("\n".join(table(["ID", "STATUS", "PROGRAM", "SUBMITTED", "DURATION", "ERROR"],
                          [_row(job, now) for job in jobs], right=[4])))
    if total > len(jobs):
        print(f"(the newest {len(jobs)} of {total}; --limit shows more)", file=sys.stderr)
    return Exit.OK


def program_of(job: JobRecord) -> str | None:
    """The program the job's manifest names; None when it was rejected before it was read."""
    if not job.manifest:
        return None
    program = json.loads(job.manifest).get("program")
    return str(program) if program is not None else None


def took(job: JobRecord, now: float) -> float | None:
    """How long the program ran; for a running job, how long it has been running."""
    if job.status is JobStatus.RUNNING and job.started_at:
        return max(0.0, now - job.started_at)
    return job.run_seconds


def _row(job: JobRecord, now: float) -> list[object]:
    error = job.error or ""
    short = error if len(error) <= ERROR_WIDTH else error[:ERROR_WIDTH - 3] + "..."
    submitted = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.submitted_at))
    return [job.id, job.status.value, program_of(job), submitted, duration(took(job, now)), short]


def _as_json(job: JobRecord, now: float) -> dict[str, Any]:
    return {**job.summary(), "program": program_of(job), "seconds": took(job, now)}
