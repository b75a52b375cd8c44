"""`dropq prune`: remove published job folders from the outbox by age and status, by hand (the daemon
does it by itself with `retention.*`). The jobs stay in the store, marked pruned."""

from __future__ import annotations

import argparse
from typing import Any

from dropq.cli.console import as_json, say, table
from dropq.cli.exits import Exit
from dropq.cli.jobs import parse_statuses
from dropq.config import Config
from dropq.errors import DropqError
from dropq.publish.retention import Retention
from dropq.queue.store import Store
from dropq.units import human_size, parse_duration


def add_parser(sub: Any) -> None:
    prune = sub.add_parser("prune", help="remove published job folders from the outbox (by age, status)",
                           description="Remove the outbox folders of finished jobs older than AGE (and, with "
                                       "retention.max_bytes set, the oldest others while the outbox holds more). "
                                       "The jobs stay listed by `dropq jobs`, marked pruned. Without "
                                       "--older-than, the config's retention.* limits apply.",
                           epilog="example: dropq prune --older-than 7d --status succeeded --dry-run")
    prune.add_argument("--older-than", metavar="AGE", help="finished more than AGE ago: 30s, 15m, 12h, 7d")
    prune.add_argument("--status", action="append", default=[], metavar="S,...",
                       help="only jobs that ended in these states (default: any)")
    prune.add_argument("--dry-run", action="store_true", help="say what would be removed; remove nothing")
    prune.add_argument("--json", action="store_true")


def cmd_prune(config: Config, args: argparse.Namespace) -> int:
    statuses = parse_statuses(args.status)
    unfinished = [s.value for s in statuses if not s.is_final]
    if unfinished:
        raise DropqError(f"--status: only finished jobs have folders to prune, not {', '.join(unfinished)}")
    if args.older_than is not None:
        max_age: float | None = parse_duration(args.older_than)
        max_bytes = None
    elif config.retention.enabled:
        max_age, max_bytes = config.retention.age_seconds, config.retention.size_limit
    else:
        raise DropqError("say which folders: --older-than AGE, or set retention.max_age / retention.max_bytes "
                         "in the config")
    store = Store(config.database)
    try:
        done = Retention(config=config, store=store).prune(max_age=max_age, max_bytes=max_bytes, statuses=statuses,
                                                          dry_run=args.dry_run)
    finally:
        store.close()
    verb = "would remove" if args.dry_run else "removed"
    if args.json:
        print(as_json({"dry_run": args.dry_run, "freed_bytes": done.freed,
                       "jobs": [{"id": j.id, "status": j.status.value, "folder": j.folder, "bytes": size}
                                for j, size in done.jobs]}))
        return int(Exit.OK)
    if done.jobs:
        for line in table(["JOB", "STATUS", "FOLDER", "SIZE"],
                          [[j.id, j.status.value, j.folder, human_size(size)] for j, size in done.jobs], right=[3]):
            say(line)
    say(f"{verb} {len(done.jobs)} job folder(s), {human_size(done.freed)}")
    return int(Exit.OK)
