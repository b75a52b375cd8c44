"""The `dropq` command line. Errors are one clear line on stderr and a named exit code."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from enum import IntEnum
from pathlib import Path
from typing import Any

import yaml

from .config import Config
from .errors import ConfigError, DaemonRunning, DropqError, PoolError, StoreError
from .jobs import FINAL, JobStatus
from .manifest import is_manifest_name
from .store import JobRecord, Store


class Exit(IntEnum):
    OK = 0
    #: the job waited for did not succeed
    JOB_FAILED = 1
    USAGE = 2
    CONFIG = 3
    NOT_FOUND = 4
    #: --wait gave up before the job finished
    TIMEOUT = 5
    #: the daemon could not start (another one runs, workers would not start)
    DAEMON = 6


EPILOG = """\
examples:
  dropq run                                   run the daemon on ./config.yaml
  dropq submit wordcount moby.txt --wait      copy moby.txt into the inbox, run wordcount on it, wait
  dropq submit job.yaml                       drop an existing manifest into the inbox
  dropq submit sleep --timeout 5 -- 30        arguments after -- go to the program
  dropq status                                the queue and the workers at a glance
  dropq show moby                             one job's result
  dropq cancel moby                           cancel a queued or running job
  dropq image build --offline                 build the worker image without a registry

exit codes: 0 ok, 1 job did not succeed, 2 usage, 3 config error, 4 not found, 5 wait timed out,
            6 daemon could not start
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dropq", description="A drop-folder batch processor.",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", type=Path, default=Path("config.yaml"),
                        help="the configuration file (default: ./config.yaml)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the daemon in the foreground (stops cleanly on SIGTERM/Ctrl-C)")
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                     help="overrides log_level in the config")
    run.add_argument("--log-format", choices=["text", "json"],
                     help="text (readable; journald adds the time) or json (one object per line, for log "
                          "shippers); overrides log_format in the config")

    submit = sub.add_parser("submit", help="drop a job into the inbox (atomically)",
                            description="Drop a manifest, or build one from PROGRAM and INPUT files. "
                                        "Input files outside the inbox are copied into it first.",
                            epilog="arguments after -- are passed to the program")
    submit.add_argument("target", metavar="MANIFEST.yaml|PROGRAM")
    submit.add_argument("inputs", nargs="*", metavar="INPUT", help="input files (copied into the inbox)")
    submit.add_argument("--output", help="save stdout as output/NAME instead of stdout.txt")
    submit.add_argument("--timeout", type=float, help="seconds before the program is stopped")
    submit.add_argument("--retries", type=int, help="further attempts when its worker is lost")
    submit.add_argument("--priority", type=int, help="higher runs first")
    submit.add_argument("--env", action="append", default=[], metavar="NAME=VALUE")
    submit.add_argument("--name", help="the manifest's file name in the inbox (and so the job's id)")
    submit.add_argument("--wait", action="store_true", help="wait for the result; exit 1 unless it succeeded")
    submit.add_argument("--wait-timeout", type=float, default=None, metavar="SECONDS")

    status = sub.add_parser("status", help="the queue and the workers at a glance")
    status.add_argument("--json", action="store_true")

    cancel = sub.add_parser("cancel", help="cancel a queued or running job",
                            description="Cancel a job by dropping ID.cancel into the inbox (which works "
                                        "without this command too). A running job is stopped: SIGTERM, "
                                        "then SIGKILL after jobs.kill_grace. Its result is `cancelled`.")
    cancel.add_argument("id")

    image = sub.add_parser("image", help="the worker image for the docker pool")
    image_sub = image.add_subparsers(dest="image_command", required=True, metavar="ACTION")
    build = image_sub.add_parser(
        "build", help="build the worker image (skipped when it is current)",
        description="Build workers.docker.image from worker/Dockerfile. --offline needs no registry: it "
                    "makes the base from Debian packages with debootstrap (as root) and docker import.")
    build.add_argument("--offline", action="store_true", help="make the base image from Debian packages")
    build.add_argument("--mirror", default="http://deb.debian.org/debian", help="Debian mirror for --offline")
    build.add_argument("--force", action="store_true", help="rebuild even when the image is current")
    build.add_argument("--tag", help="image name (default: workers.docker.image from the config)")

    show = sub.add_parser("show", help="one job: its result, or where it is")
    show.add_argument("id")
    show.add_argument("--json", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    program_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, program_args = argv[:cut], argv[cut + 1:]
    args = build_parser().parse_args(argv)
    args.program_args = program_args
    try:
        config = Config.load(args.config)
        return int(COMMANDS[args.command](config, args))
    except ConfigError as exc:
        return _fail(Exit.CONFIG, str(exc))
    except (DaemonRunning, PoolError) as exc:
        return _fail(Exit.DAEMON, str(exc))
    except StoreError as exc:
        return _fail(Exit.NOT_FOUND, str(exc))
    except DropqError as exc:
        return _fail(Exit.USAGE, str(exc))
    except KeyboardInterrupt:
        return 130


def _fail(code: Exit, message: str) -> int:
    print(f"dropq: {message}", file=sys.stderr)
    return int(code)


# --- run ---------------------------------------------------------------------------------------

def cmd_run(config: Config, args: argparse.Namespace) -> int:
    from . import logs
    from .service import run

    logs.setup(args.log_level or config.log_level, args.log_format or config.log_format)
    return run(config)


# --- submit ------------------------------------------------------------------------------------

def cmd_submit(config: Config, args: argparse.Namespace) -> int:
    target = Path(args.target)
    if is_manifest_name(target.name) and target.is_file():
        if args.inputs or args.program_args:
            raise DropqError("give either a manifest file, or a program with inputs and arguments, not both")
        text = target.read_text(encoding="utf-8")
        name = args.name or target.name
    else:
        text = yaml.safe_dump(_manifest_from_args(config, args), sort_keys=False)
        name = args.name or f"{Path(args.inputs[0]).stem if args.inputs else args.target}.yaml"
    if not is_manifest_name(name):
        name = f"{name}.yaml"
    name = _free_name(config, name)
    since = _last_seq(config)
    _drop(config.inbox, name, text.encode())
    print(f"submitted {config.inbox / name}", file=sys.stderr)
    if not args.wait:
        return Exit.OK
    return _wait(config, name, since, args.wait_timeout)


def _manifest_from_args(config: Config, args: argparse.Namespace) -> dict[str, Any]:
    manifest: dict[str, Any] = {"program": args.target}
    inputs = [_place_input(config, Path(p)) for p in args.inputs]
    if inputs:
        manifest["input"] = inputs[0]
    if len(inputs) > 1:
        manifest["inputs"] = inputs[1:]
    if args.program_args:
        manifest["args"] = args.program_args
    for key in ("output", "timeout", "retries", "priority"):
        if getattr(args, key) is not None:
            manifest[key] = getattr(args, key)
    if args.env:
        pairs = [e.partition("=") for e in args.env]
        if any(not sep for _, sep, _ in pairs):
            raise DropqError("--env takes NAME=VALUE")
        manifest["env"] = {k: v for k, _, v in pairs}
    return manifest


def _place_input(config: Config, path: Path) -> str:
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


def _free_name(config: Config, name: str) -> str:
    stem, dot, suffix = name.rpartition(".")
    candidate, n = name, 1
    while (config.inbox / candidate).exists() or (config.outbox / candidate.rpartition(".")[0]).exists():
        n += 1
        candidate = f"{stem}-{n}{dot}{suffix}"
    return candidate


def _drop(inbox: Path, name: str, data: bytes) -> None:
    """Write a dotfile, then rename it into place: the daemon never sees half a manifest."""
    tmp = inbox / f".{name}.{os.getpid()}.tmp"
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.rename(tmp, inbox / name)


def _last_seq(config: Config) -> int:
    try:
        store = Store(config.database, readonly=True)
    except StoreError:
        return 0
    try:
        return store.last_seq()
    finally:
        store.close()


def _wait(config: Config, name: str, since: int, timeout: float | None) -> int:
    deadline = None if timeout is None else time.monotonic() + timeout
    store: Store | None = None
    shown = None
    try:
        while deadline is None or time.monotonic() < deadline:
            if store is None and config.database.exists():
                store = Store(config.database, readonly=True)
            job = store.by_source(name, after_seq=since) if store else None
            if job is not None and job.status != shown:
                shown = job.status
                print(f"{job.id}: {job.status}", file=sys.stderr)
            if job is not None and job.status in FINAL:
                _print_result(config, job)
                return Exit.OK if job.status is JobStatus.SUCCEEDED else Exit.JOB_FAILED
            time.sleep(0.1)
    finally:
        if store is not None:
            store.close()
    print(f"dropq: gave up waiting for {name} after {timeout:g} seconds", file=sys.stderr)
    return Exit.TIMEOUT


def _result_path(config: Config, job: JobRecord) -> Path:
    folder = (job.outcome or {}).get("folder", job.id)
    return config.outbox / folder / "result.yaml"


def _print_result(config: Config, job: JobRecord) -> None:
    path = _result_path(config, job)
    print(path.read_text() if path.exists() else f"{job.id}: {job.status} (its outbox folder is gone)", end="")


# --- status and show ---------------------------------------------------------------------------

def _open_store(config: Config) -> Store:
    return Store(config.database, readonly=True)


def cmd_status(config: Config, args: argparse.Namespace) -> int:
    store = _open_store(config)
    try:
        counts = store.counts()
        workers = store.workers()
        meta = store.meta()
        recent = store.recent(10)
    finally:
        store.close()
    running = _daemon_alive(meta.get("pid", ""))
    if args.json:
        print(json.dumps({"daemon": {"running": running, **meta}, "jobs": counts, "workers": workers,
                          "recent": [_job_summary(j) for j in recent]}, indent=2))
        return Exit.OK
    print(f"daemon   {'running (pid ' + meta['pid'] + ')' if running else 'not running'}"
          f"   pool: {meta.get('pool', '?')}")
    print(f"watcher  {meta.get('watcher', '?')}, {meta.get('watcher_rescans', '0')} rescans, "
          f"{meta.get('watcher_missed', '0')} manifests missed by events and found by a rescan")
    order = [s.value for s in JobStatus]
    print("jobs     " + "   ".join(f"{s}: {counts.get(s, 0)}" for s in order if counts.get(s)) or "jobs     none")
    print()
    print(f"{'WORKER':<10} {'STATE':<8} {'JOB':<24} DETAIL")
    for w in workers:
        state = w["state"] if running else "stopped"
        print(f"{w['name']:<10} {state:<8} {w['job'] or '-':<24} {w['detail'] or ''}")
    if recent:
        print()
        print(f"{'RECENT JOB':<28} {'STATUS':<11} {'ATTEMPTS':>8}  ERROR")
        for j in recent:
            print(f"{j.id[:28]:<28} {j.status.value:<11} {j.attempts:>8}  {(j.error or '')[:60]}")
    return Exit.OK


def _get_job(config: Config, job_id: str) -> JobRecord:
    store = _open_store(config)
    try:
        return store.get(job_id)
    finally:
        store.close()


def cmd_show(config: Config, args: argparse.Namespace) -> int:
    job = _get_job(config, args.id)
    if args.json:
        print(json.dumps(_job_summary(job), indent=2))
    elif job.status in FINAL:
        _print_result(config, job)
    else:
        print(yaml.safe_dump(_job_summary(job), sort_keys=False), end="")
    return Exit.OK


def cmd_cancel(config: Config, args: argparse.Namespace) -> int:
    job = _get_job(config, args.id)
    if job.status in FINAL:
        print(f"{job.id} has already finished: {job.status}")
        return Exit.OK
    _drop(config.inbox, f"{job.id}.cancel", b"")
    print(f"cancel requested for {job.id} ({job.status})")
    return Exit.OK


def cmd_image(config: Config, args: argparse.Namespace) -> int:
    from .image import build

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="dropq: %(message)s")
    print(build(args.tag or config.workers.docker.image, offline=args.offline, mirror=args.mirror,
                force=args.force))
    return Exit.OK


def _job_summary(job: JobRecord) -> dict[str, Any]:
    return {"id": job.id, "status": job.status.value, "priority": job.priority, "attempts": job.attempts,
            "worker": job.worker, "error": job.error, "manifest": job.source,
            "submitted_at": job.submitted_at, "started_at": job.started_at, "finished_at": job.finished_at}


def _daemon_alive(pid: str) -> bool:
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


COMMANDS = {"run": cmd_run, "submit": cmd_submit, "status": cmd_status, "show": cmd_show, "image": cmd_image,
            "cancel": cmd_cancel}
