"""`dropq env list|build|prune`: programs' environments, as the daemon builds them (dropq.envs).

`build` works beside a running daemon: both take the environment's build lock, so one builds and the
other takes what it made. `prune` removes only what no job still needs, in one transaction with the check.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any

from dropq.cli.console import as_json, duration, say, table
from dropq.cli.exits import Exit
from dropq.cli.lookup import open_store
from dropq.config import Config
from dropq.envs.builder import Environments
from dropq.envs.install import index_settings
from dropq.errors import DropqError
from dropq.intake.manifest import program_file
from dropq.queue.store import EnvRecord, EnvState, Store


def add_parser(sub: Any) -> None:
    env = sub.add_parser("env", help="programs' environments: list, build ahead, prune",
                         description="Programs that declare dependencies (a PEP 723 block, or requirements.txt "
                                     "or pyproject.toml in a program folder) run in an environment the daemon "
                                     "builds once per dependency list and shares.")
    env_sub = env.add_subparsers(dest="env_command", required=True, metavar="ACTION")
    listing = env_sub.add_parser("list", help="each environment: state, packages, size, last use")
    listing.add_argument("--json", action="store_true")
    build = env_sub.add_parser("build", help="build a program's environment now, before any job needs it",
                               description="Build the environment of PROGRAM (as a manifest names it) and wait "
                                           "for the build; exit 1 if it fails. Beside a running daemon this is "
                                           "safe: one of the two builds, the other takes the result.")
    build.add_argument("program")
    prune = env_sub.add_parser("prune", help="remove environments no job used for a while",
                               description="Remove environments unused for environments.keep_days (or --older-than "
                                           "DAYS), except those a queued or running job needs. The daemon does "
                                           "this by itself once an hour.")
    prune.add_argument("--older-than", type=float, metavar="DAYS",
                       help="unused for this many days (default: environments.keep_days; 0: every unused one)")


def cmd_env(config: Config, args: argparse.Namespace) -> int:
    if args.env_command == "list":
        return _list(config, json_out=args.json)
    if args.env_command == "build":
        return _build(config, args.program)
    return _prune(config, args.older_than)


def _list(config: Config, *, json_out: bool) -> int:
    store = open_store(config)
    try:
        records, waiting = store.envs(), store.held_envs()
    finally:
        store.close()
    if json_out:
        print(as_json([{**r.to_json(), "jobs_waiting": waiting.get(r.id, 0)} for r in records]))
        return int(Exit.OK)
    if not records:
        say("no environments yet: a program that declares dependencies gets one with its first job")
        return int(Exit.OK)
    now = time.time()
    rows = [[r.short, r.state.value, _packages(r), _size(r.size_bytes), _ago(r.last_used, now),
             str(waiting.get(r.id, 0)), r.spec.get("declared_in", "")] for r in records]
    for line in table(["ENV", "STATE", "PACKAGES", "SIZE", "LAST USED", "WAITING", "DECLARED IN"], rows,
                      right=[3, 5]):
        say(line)
    return int(Exit.OK)


def _environments(config: Config, store: Store) -> Environments:
    from dropq.ops.service import host_pool

    pool = host_pool(config)  # the installer of this host's pool; agents build no environments
    # no committer, fail_jobs=False: the daemon fails (and publishes) the jobs of a failed build, not this command
    envs = Environments(config=config, store=store, committer=None,
                        installer=pool.env_installer(index_settings(config)), notify=lambda: None, fail_jobs=False)
    envs.prepare()
    return envs


def _build(config: Config, program: str) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="dropq: %(message)s")
    store = Store(config.database)
    try:
        envs = _environments(config, store)
        record = envs.want_program(program_file(program))
        if record is None:
            say(f"{program} declares no dependencies: it runs on the pool's interpreter as it is")
            return int(Exit.OK)
        if record.state is EnvState.READY:
            say(f"environment {record.short} ({record.summary}) is ready: {_packages(record)}")
            return int(Exit.OK)
        started = time.monotonic()
        done = envs.build(record.id)
    finally:
        store.close()
    if done is None or done.state is not EnvState.READY:
        error = done.error if done is not None else "its record was removed meanwhile"
        say(f"dropq: environment {record.short} ({record.summary}) could not be built: {error}", out=sys.stderr)
        say(f"dropq: the build's log: {envs.log_path(record.id)}", out=sys.stderr)
        return int(Exit.JOB_FAILED)
    say(f"environment {done.short} is ready ({duration(time.monotonic() - started)}): {_packages(done)}, "
        f"{_size(done.size_bytes)}")
    return int(Exit.OK)


def _prune(config: Config, older_than: float | None) -> int:
    days = config.environments.keep_days if older_than is None else older_than
    if days < 0:
        raise DropqError("--older-than takes a number of days, 0 or more")
    store = Store(config.database)
    try:
        removed = _environments_without_pool(config, store).prune(unused_for=days * 86400)
    finally:
        store.close()
    for record in removed:
        say(f"removed environment {record.short} ({record.summary}), {_size(record.size_bytes)}")
    freed = sum(r.size_bytes or 0 for r in removed)
    say(f"{len(removed)} environment(s) removed, {_size(freed)} freed")
    return int(Exit.OK)


def _environments_without_pool(config: Config, store: Store) -> Environments:
    # pruning needs no installer: it removes folders and records
    envs = Environments(config=config, store=store, committer=None, installer=None, notify=lambda: None,
                        fail_jobs=False)
    envs.prepare()
    return envs


def _packages(record: EnvRecord) -> str:
    if record.packages is None:
        return record.summary
    shown = ", ".join(record.packages[:3])
    return shown + (f" (+{len(record.packages) - 3})" if len(record.packages) > 3 else "")


def _size(size: int | None) -> str:
    return "-" if size is None else f"{size / 1e6:.1f} MB"


def _ago(when: float | None, now: float) -> str:
    return "never" if when is None else f"{duration(now - when)} ago"
