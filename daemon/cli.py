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
from typing import Any, BinaryIO

import yaml

from dropq_worker.protocol import WorkerState

from .config import Config
from .console import Screen, bar, duration, table
from .errors import ConfigError, DaemonRunning, DropqError, PoolError, SchemaError, StoreError
from .jobs import FINAL, JobStatus
from .manifest import is_manifest_name
from .store import JobRecord, Store
from .streams import Stream, stream_path


class Exit(IntEnum):
    OK = 0
    #: the job waited for did not succeed
    JOB_FAILED = 1
    USAGE = 2
    CONFIG = 3
    NOT_FOUND = 4
    #: --wait gave up before the job finished
    TIMEOUT = 5
    #: the daemon could not start (another one runs, workers would not start, the state directory
    #: is from a newer dropq)
    DAEMON = 6
    #: the system refused: a permission, a full disk, a missing folder
    SYSTEM = 7


EPILOG = """\
examples:
  dropq run                                   run the daemon on ./config.yaml
  dropq submit wordcount moby.txt --wait      copy moby.txt into the inbox, run wordcount on it, wait
  dropq submit job.yaml                       drop an existing manifest into the inbox
  dropq submit sleep --timeout 5 -- 30        arguments after -- go to the program
  dropq status                                the queue and the workers at a glance
  dropq status --watch                        the same, live, with the backlog's progress
  dropq workers                               each worker, its state and its job
  dropq show moby                             one job's result
  dropq logs moby --follow                    a job's stdout and stderr, as it runs
  dropq cancel moby                           cancel a queued or running job
  dropq retry moby --wait                     run a finished job again, on the same inputs
  dropq image build --offline                 build the worker image without a registry
  sudo dropq service install                  run the daemon on this config under systemd

exit codes: 0 ok, 1 job did not succeed, 2 usage, 3 config error, 4 not found, 5 wait timed out,
            6 daemon could not start (or its state is from a newer dropq), 7 the system refused
            (permission, disk full)
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
    _add_wait(submit)

    status = sub.add_parser("status", help="the queue and the workers at a glance")
    status.add_argument("--json", action="store_true", help="everything as one JSON document")
    status.add_argument("--watch", action="store_true",
                        help="redraw every --interval seconds, with a progress bar of the backlog (Ctrl-C ends)")
    status.add_argument("--interval", type=float, default=1.0, metavar="SECONDS")
    status.add_argument("--until-idle", action="store_true",
                        help="with --watch: end once nothing is queued, running or waiting in the inbox")

    workers = sub.add_parser("workers", help="each worker, its state and the job it runs")
    workers.add_argument("--json", action="store_true")

    logs = sub.add_parser("logs", help="a job's stdout and stderr (while it runs, too)",
                          description="Print a job's stdout (to stdout) and stderr (to stderr). With --follow, "
                                      "keep printing as the program writes, until the job ends; the exit code is "
                                      "then 0 if it succeeded, else 1.")
    logs.add_argument("id")
    logs.add_argument("-f", "--follow", action="store_true")
    which = logs.add_mutually_exclusive_group()
    which.add_argument("--stdout", action="store_true", help="only stdout")
    which.add_argument("--stderr", action="store_true", help="only stderr")

    retry = sub.add_parser("retry", help="run a finished job again, as a new job on the same inputs",
                           description="Drop the job's manifest into the inbox again, with copies of its inputs "
                                       "from its outbox folder. The new job is named ID-retry (or ID-retry-2, ...); "
                                       "the old result stays as it is.")
    retry.add_argument("id")
    _add_wait(retry)

    service = sub.add_parser("service", help="run the daemon under systemd")
    service_sub = service.add_subparsers(dest="service_command", required=True, metavar="ACTION")
    install = service_sub.add_parser(
        "install", help="write a systemd unit for this config (and with --now, enable and start it)",
        description="Write UNIT_DIR/NAME.service, which runs `dropq run` on this config with Type=notify, a "
                    "watchdog, and the filesystem closed except for the workspace. Run it again after moving "
                    "the workspace or upgrading into another virtualenv.")
    install.add_argument("--name", default="dropq", help="unit name (default: dropq)")
    install.add_argument("--unit-dir", type=Path, default=Path("/etc/systemd/system"))
    install.add_argument("--user", help="run the daemon as this user (default: root)")
    install.add_argument("--now", action="store_true", help="also daemon-reload, enable and (re)start it")
    service_sub.add_parser("unit", help="print the unit that install would write")

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


def _add_wait(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--wait", action="store_true",
                        help="show where the job is until it ends, then print its result.yaml; exit 1 unless it "
                             "succeeded")
    parser.add_argument("--wait-timeout", type=float, default=None, metavar="SECONDS",
                        help="with --wait: give up after this long (exit 5)")


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
    except (DaemonRunning, PoolError, SchemaError) as exc:
        return _fail(Exit.DAEMON, str(exc))
    except StoreError as exc:
        return _fail(Exit.NOT_FOUND, str(exc))
    except DropqError as exc:
        return _fail(Exit.USAGE, str(exc))
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        return _fail(Exit.SYSTEM, f"{exc.strerror or exc}{where}")
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
    """Follow the job made from inbox/`name` to its end, with one line of progress on stderr."""
    deadline = None if timeout is None else time.monotonic() + timeout
    store: Store | None = None
    screen = Screen(sys.stderr)
    shown = ""
    try:
        while deadline is None or time.monotonic() < deadline:
            if store is None and config.database.exists():
                store = Store(config.database, readonly=True)
            job = store.by_source(name, after_seq=since) if store else None
            line = _progress(store, job) if store is not None and job is not None else f"{name}: in the inbox"
            # on a terminal the line updates in place; in a log, only changes of state are written
            if line != shown and (screen.tty or line.split(",")[0] != shown.split(",")[0]):
                screen.line(line)
                shown = line
            if job is not None and job.status in FINAL:
                screen.end_line()
                _print_result(config, job)
                return Exit.OK if job.status is JobStatus.SUCCEEDED else Exit.JOB_FAILED
            time.sleep(0.1)
    finally:
        if store is not None:
            store.close()
    screen.end_line()
    print(f"dropq: gave up waiting for {name} after {timeout:g} seconds", file=sys.stderr)
    return Exit.TIMEOUT


def _progress(store: Store, job: JobRecord) -> str:
    if job.status is JobStatus.QUEUED:
        return f"{job.id}: queued, {store.ahead_of(job)} ahead"
    if job.status is JobStatus.RUNNING and job.started_at:
        return f"{job.id}: running on {job.worker} (attempt {job.attempts}), {duration(time.time() - job.started_at)}"
    return f"{job.id}: {job.status}"


def _result_path(config: Config, job: JobRecord) -> Path:
    return config.outbox / job.folder / "result.yaml"


def _print_result(config: Config, job: JobRecord) -> None:
    path = _result_path(config, job)
    print(path.read_text() if path.exists() else f"{job.id}: {job.status} (its outbox folder is gone)", end="")


# --- status and show ---------------------------------------------------------------------------

def _open_store(config: Config) -> Store:
    return Store(config.database, readonly=True)


def cmd_status(config: Config, args: argparse.Namespace) -> int:
    if args.watch:
        return _watch(config, args.interval, until_idle=args.until_idle)
    store = _open_store(config)
    try:
        snap = _Snapshot(store)
    finally:
        store.close()
    if args.json:
        print(json.dumps({"daemon": {"running": snap.running, **snap.meta}, "jobs": snap.counts,
                          "workers": snap.workers, "recent": [j.summary() for j in snap.recent]}, indent=2))
        return Exit.OK
    print("\n".join(_status_lines(snap)))
    return Exit.OK


class _Snapshot:
    def __init__(self, store: Store, recent: int = 10) -> None:
        self.now = time.time()
        self.counts = store.counts()
        self.workers = store.workers()
        self.meta = store.meta()
        self.recent = store.recent(recent)
        self.jobs = {w["job"]: store.find(w["job"]) for w in self.workers if w["job"]}
        self.running = _daemon_alive(self.meta.get("pid", ""))


def _status_lines(snap: _Snapshot) -> list[str]:
    meta = snap.meta
    lines = [f"daemon   {'running (pid ' + meta['pid'] + ')' if snap.running else 'not running'}"
             f"   pool: {meta.get('pool', '?')}"
             + (f"   dashboard: {meta['http']}" if snap.running and meta.get("http") else ""),
             f"watcher  {meta.get('watcher', '?')}, {meta.get('watcher_rescans', '0')} rescans, "
             f"{meta.get('watcher_missed', '0')} manifests missed by events and found by a rescan"]
    order = [s.value for s in JobStatus]
    lines.append("jobs     " + ("   ".join(f"{s}: {snap.counts[s]}" for s in order if snap.counts.get(s)) or "none"))
    lines += ["", *_worker_lines(snap)]
    if snap.recent:
        lines.append("")
        lines += table(["RECENT JOB", "STATUS", "ATTEMPTS", "TOOK", "ERROR"],
                       [[j.id[:28], j.status.value, j.attempts, duration(j.run_seconds), (j.error or "")[:60]]
                        for j in snap.recent], right=[2, 3])
    return lines


def _worker_lines(snap: _Snapshot) -> list[str]:
    rows = []
    for w in snap.workers:
        job = snap.jobs.get(w["job"]) if w["job"] else None
        elapsed = snap.now - job.started_at if job and job.started_at and w["state"] == WorkerState.BUSY else None
        rows.append([w["name"], w["state"] if snap.running else "stopped", w["job"] or "-", duration(elapsed),
                     w["detail"] or ""])
    return table(["WORKER", "STATE", "JOB", "ELAPSED", "DETAIL"], rows, right=[3])


def _inbox_manifests(config: Config) -> int:
    """Manifests still in the inbox: the part of a backlog the daemon has not claimed yet."""
    try:
        with os.scandir(config.inbox) as entries:
            return sum(1 for e in entries if not e.name.startswith(".") and is_manifest_name(e.name))
    except FileNotFoundError:
        return 0


def _watch(config: Config, interval: float, *, until_idle: bool) -> int:
    screen = Screen()
    screen.start()
    store: Store | None = None
    first_done: int | None = None
    started = time.monotonic()
    try:
        while True:
            if store is None and config.database.exists():
                store = _open_store(config)
            if store is None:
                screen.draw([f"waiting for the daemon to create {config.database} ..."])
                time.sleep(interval)
                continue
            snap = _Snapshot(store)
            done = sum(n for s, n in snap.counts.items() if JobStatus(s) in FINAL)
            first_done = done if first_done is None else first_done
            remaining = (sum(n for s, n in snap.counts.items() if JobStatus(s) not in FINAL)
                         + _inbox_manifests(config))
            finished_here = done - first_done
            rate = finished_here / max(1e-9, time.monotonic() - started)
            eta = f", about {duration(remaining / rate)} to go" if rate > 0 and remaining else ""
            progress = (f"backlog  {bar(finished_here, finished_here + remaining)}  {finished_here} done, "
                        f"{remaining} to go ({rate:.1f} jobs/s{eta})")
            screen.draw([time.strftime("%H:%M:%S") + "  dropq status --watch (Ctrl-C ends)", progress,
                         *_status_lines(snap)])
            if until_idle and remaining == 0:
                return Exit.OK
            time.sleep(interval)
    except KeyboardInterrupt:
        return Exit.OK
    finally:
        if store is not None:
            store.close()


def cmd_workers(config: Config, args: argparse.Namespace) -> int:
    store = _open_store(config)
    try:
        snap = _Snapshot(store)
    finally:
        store.close()
    if args.json:
        print(json.dumps(snap.workers, indent=2))
    else:
        print("\n".join(_worker_lines(snap)))
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
        print(json.dumps(job.summary(), indent=2))
    elif job.status in FINAL:
        _print_result(config, job)
    else:
        print(yaml.safe_dump(job.summary(), sort_keys=False), end="")
    return Exit.OK


def cmd_cancel(config: Config, args: argparse.Namespace) -> int:
    job = _get_job(config, args.id)
    if job.status in FINAL:
        print(f"{job.id} has already finished: {job.status}")
        return Exit.OK
    _drop(config.inbox, f"{job.id}.cancel", b"")
    print(f"cancel requested for {job.id} ({job.status})")
    return Exit.OK


def cmd_logs(config: Config, args: argparse.Namespace) -> int:
    streams: list[tuple[Stream, BinaryIO]] = []
    if not args.stderr:
        streams.append(("stdout", sys.stdout.buffer))
    if not args.stdout:
        streams.append(("stderr", sys.stderr.buffer))
    store = _open_store(config)
    offsets = {name: 0 for name, _ in streams}
    try:
        while True:
            job = store.get(args.id)
            for name, out in streams:
                offsets[name] = _copy_from(stream_path(config, job, name), offsets[name], out)
            if job.status in FINAL or not args.follow:
                if args.follow:
                    return Exit.OK if job.status is JobStatus.SUCCEEDED else Exit.JOB_FAILED
                return Exit.OK
            time.sleep(0.2)
    finally:
        store.close()


def _copy_from(path: Path | None, offset: int, out: BinaryIO) -> int:
    """Write what `path` holds past `offset` to `out`; returns the new offset."""
    if path is None:
        return offset
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            while chunk := fh.read(1 << 16):
                out.write(chunk)
                offset += len(chunk)
    except FileNotFoundError:  # moved into the outbox between the lookup and the open: next turn
        return offset
    out.flush()
    return offset


def cmd_retry(config: Config, args: argparse.Namespace) -> int:
    job = _get_job(config, args.id)
    if job.status not in FINAL:
        raise DropqError(f"{job.id} has not finished ({job.status}); only a finished job can be retried")
    folder = config.outbox / job.folder
    manifest = folder / "manifest.yaml"
    if not manifest.is_file():
        raise DropqError(f"{job.id} cannot be retried: its manifest is not in {folder}")
    inputs = folder / "inputs"
    names = [p.relative_to(inputs) for p in sorted(inputs.rglob("*")) if p.is_file() and not p.is_symlink()]
    taken = [str(n) for n in names if os.path.lexists(config.inbox / n)]
    if taken:
        raise DropqError(f"inbox/{taken[0]} exists; the retry puts {job.id}'s input there, so move it away first")
    for rel in names:
        target = config.inbox / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.part")
        shutil.copyfile(inputs / rel, tmp)
        os.rename(tmp, target)
    name = _free_name(config, f"{job.id}-retry.yaml")
    since = _last_seq(config)
    _drop(config.inbox, name, manifest.read_bytes())
    print(f"submitted {config.inbox / name} (a retry of {job.id})", file=sys.stderr)
    if not args.wait:
        return Exit.OK
    return _wait(config, name, since, args.wait_timeout)


def cmd_service(config: Config, args: argparse.Namespace) -> int:
    from . import systemd

    if args.service_command == "unit":
        print(systemd.unit_text(config, exe=systemd.dropq_executable()), end="")
        return Exit.OK
    for line in systemd.install(config, name=args.name, unit_dir=args.unit_dir, user=args.user, start=args.now):
        print(line)
    return Exit.OK


def cmd_image(config: Config, args: argparse.Namespace) -> int:
    from .image import build

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="dropq: %(message)s")
    print(build(args.tag or config.workers.docker.image, offline=args.offline, mirror=args.mirror,
                force=args.force))
    return Exit.OK


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
            "cancel": cmd_cancel, "workers": cmd_workers, "logs": cmd_logs, "retry": cmd_retry,
            "service": cmd_service}
