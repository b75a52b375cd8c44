"""The argument parser: every command, its options, and the examples of `dropq --help`."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dropq.cli import agents, env, prune, schema
from dropq.queue.jobs import JobStatus
from dropq.units import parse_size

#: the configuration file when neither -c/--config nor $DROPQ_CONFIG names one
DEFAULT_CONFIG = Path("config.yaml")

EPILOG = """\
examples:
  dropq run                                   run the daemon on ./config.yaml
  dropq submit wordcount moby.txt --wait      copy moby.txt into the inbox, run wordcount on it, wait
  dropq submit job.yaml                       drop an existing manifest into the inbox
  dropq submit sleep --timeout 5 -- 30        arguments after -- go to the program
  dropq submit wordcount outbox:clean/output/clean.txt --after fetch
                                              run once jobs clean and fetch have succeeded, on clean's output
  dropq submit train data.csv --memory 2g --cpus 1.5   a job with its own memory and CPU limits
  dropq status                                the queue and the workers at a glance
  dropq status --watch                        the same, live, with the backlog's progress
  dropq workers                               each worker, its state and its job
  dropq workers remove                        stop and remove the docker workers a stopped daemon left
  dropq jobs --status failed --since 1h       the jobs that failed in the last hour, newest first
  dropq show moby                             one job's result
  dropq logs moby --follow                    a job's stdout and stderr, as it runs
  dropq cancel moby                           cancel a queued or running job
  dropq retry moby --wait                     run a finished job again, on the same inputs
  dropq image build --from-debian             build the worker image from Debian packages, no registry
  dropq image build --agent --from-debian     the agent image (dropq-agent:latest) for deploy/swarm/stack.yml
  dropq env build report                      build the environment of program report ahead of its jobs
  dropq env list                              programs' environments: packages, size, last use
  dropq prune --older-than 30d --dry-run      which published job folders a prune would remove
  dropq agent --server https://HOST:8788 --token-file T --ca C   run a daemon's jobs on this host
  dropq agents init                           a token and a certificate for the daemon's agents API
  sudo dropq service install                  run the daemon on this config under systemd
  dropq schema manifest > manifest.schema.json   a JSON Schema editors check manifests with

the configuration file: -c/--config PATH after the command, else -c/--config PATH before it,
else $DROPQ_CONFIG, else ./config.yaml (`dropq run -c /srv/dropq/config.yaml` = `dropq -c ... run`)

exit codes: 0 ok, 1 job did not succeed, 2 usage, 3 config error (or state from a newer dropq),
            4 not found, 5 wait timed out, 6 daemon could not start (or --wait found none running),
            7 the system refused (permission, disk full), 8 cancel: the job had already finished
"""


class CommandParser(argparse.ArgumentParser):
    """The parser of a command (and of its actions): it accepts -c/--config after the command too.

    Nested subparsers are made of the same class, so every command, present and future, takes the option.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # SUPPRESS: an action's parser must not overwrite with None a --config given to its command
        self.add_argument("-c", "--config", dest="config_after", type=Path, default=argparse.SUPPRESS,
                          metavar="CONFIG", help="the configuration file; overrides one given before the command")


def config_path(args: argparse.Namespace, environ: Mapping[str, str]) -> Path:
    """The configuration file: --config after the command, else before it, else $DROPQ_CONFIG, else the default."""
    after: Path | None = getattr(args, "config_after", None)
    before: Path | None = args.config
    return after or before or (Path(environ["DROPQ_CONFIG"]) if environ.get("DROPQ_CONFIG") else DEFAULT_CONFIG)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dropq", description="A drop-folder batch processor.",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", type=Path, default=None,
                        help="the configuration file (default: $DROPQ_CONFIG, else ./config.yaml); "
                             "it may also follow the command")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=CommandParser)

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
    submit.add_argument("inputs", nargs="*", metavar="INPUT",
                        help="input files (copied into the inbox), or outbox:JOB/PATH, a file of finished job JOB")
    submit.add_argument("--output", help="save stdout as output/NAME instead of stdout.txt")
    submit.add_argument("--timeout", type=float, help="seconds before the program is stopped")
    submit.add_argument("--retries", type=int, help="further attempts when its worker is lost")
    submit.add_argument("--priority", type=int, help="higher runs first")
    submit.add_argument("--memory", type=_size, metavar="SIZE",
                        help="memory the job may use, e.g. 512m or 2g (its limit, and its share of workers.capacity)")
    submit.add_argument("--cpus", type=_cpus, metavar="N", help="CPUs the job may use, e.g. 1.5")
    submit.add_argument("--env", action="append", default=[], metavar="NAME=VALUE")
    submit.add_argument("--after", action="append", default=[], metavar="ID",
                        help="run after job ID has succeeded (cancelled if it does not); repeatable")
    submit.add_argument("--matrix", action="append", default=[], metavar="NAME=V1,V2",
                        help="an array job: run once per value (repeat for a cartesian product); {NAME} in the "
                             "arguments, --env values and --output is the task's value")
    submit.add_argument("--glob", action="append", default=[], metavar="NAME=PATTERN",
                        help="an array job over the files in inbox/ that PATTERN matches (e.g. 'photo=photos/*.jpg'); "
                             "without INPUT arguments, each task's input is its file ({NAME})")
    submit.add_argument("--max-failures", type=int, metavar="N",
                        help="of an array: cancel the tasks not yet started once N have failed")
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
    workers_sub = workers.add_subparsers(dest="workers_command", metavar="[ACTION]")
    workers_sub.add_parser(
        "remove", help="stop and remove this daemon's docker worker containers (the daemon must be stopped)",
        description="Stop and remove the worker containers the docker pool made for this config's state "
                    "directory, which workers.docker.on_shutdown: leave keeps running after the daemon stops. "
                    "Only containers labelled with this state directory are touched (compose's replicas are "
                    "compose's: use `docker compose down`). Refused while the daemon runs.")

    logs = sub.add_parser("logs", help="a job's stdout and stderr (while it runs, too)",
                          description="Print a job's stdout (to stdout) and stderr (to stderr). With --follow, "
                                      "keep printing as the program writes, until the job ends; the exit code is "
                                      "then 0 if it succeeded, else 1. The output is the program's own bytes, "
                                      "written unchanged (control characters included), unlike every other "
                                      "command, which escapes what it shows of a job.")
    logs.add_argument("id")
    logs.add_argument("-f", "--follow", action="store_true")
    which = logs.add_mutually_exclusive_group()
    which.add_argument("--stdout", action="store_true", help="only stdout")
    which.add_argument("--stderr", action="store_true", help="only stderr")
    logs.add_argument("--task", type=int, metavar="N", help="of an array job: task N's output (from 0)")

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
                                        "then SIGKILL after jobs.kill_grace. Its result is `cancelled`. A job "
                                        "that has already finished is left as it is (exit 8).")
    cancel.add_argument("id")

    image = sub.add_parser("image", help="the worker image for the docker pool")
    image_sub = image.add_subparsers(dest="image_command", required=True, metavar="ACTION")
    build = image_sub.add_parser(
        "build", help="build the worker image (skipped when it is current)",
        description="Build workers.docker.image from the worker's Dockerfile. --from-debian needs no container "
                    "registry, but a Debian mirror: it makes the base image from Debian packages with debootstrap "
                    "(as root) and docker import, then builds the worker on it without network.")
    build.add_argument("--from-debian", action="store_true",
                       help="make the base image from Debian packages (needs root, debootstrap and a Debian mirror)")
    build.add_argument("--mirror", metavar="URL",
                       help="the Debian mirror for --from-debian, e.g. a local one (implies --from-debian; "
                            "default: http://deb.debian.org/debian)")
    # the old name, which promised a build without network; kept for scripts, with a warning
    build.add_argument("--offline", action="store_true", help=argparse.SUPPRESS)
    build.add_argument("--force", action="store_true", help="rebuild even when the image is current")
    build.add_argument("--tag", help="image name (default: workers.docker.image from the config; with --agent, "
                                     "dropq-agent:latest)")
    build.add_argument("--agent", action="store_true",
                       help="build the agent image instead: the whole dropq, for `dropq agent` under Docker Swarm "
                            "(deploy/swarm/stack.yml); its wheels are fetched first by this host's pip, the "
                            "build itself needs no network with --from-debian")

    jobs = sub.add_parser("jobs", help="the jobs, newest first, filtered by status and age",
                          description="List jobs, newest first: id, status, program, when it was submitted, how "
                                      "long it ran (or has been running) and its error, cut short (--json gives "
                                      "everything).",
                          epilog="example: dropq jobs --status failed,timed_out --since 2d --limit 10")
    jobs.add_argument("--status", action="append", default=[], metavar="S,...",
                      help="only jobs in these states: " + ", ".join(s.value for s in JobStatus))
    jobs.add_argument("--since", metavar="AGE", help="only jobs submitted in the last AGE: 30s, 15m, 1h, 2d")
    jobs.add_argument("--limit", default="50", metavar="N", help="at most N jobs (default: 50)")
    jobs.add_argument("--json", action="store_true", help="a JSON list, with the whole error")

    show = sub.add_parser("show", help="one job: its result, or where it is")
    show.add_argument("id")
    show.add_argument("--json", action="store_true")

    env.add_parser(sub)
    prune.add_parser(sub)
    agents.add_parsers(sub)
    schema.add_parser(sub)
    return parser


def _add_wait(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--wait", action="store_true",
                        help="show where the job is until it ends, then print its result.yaml; exit 1 unless it "
                             "succeeded")
    parser.add_argument("--wait-timeout", type=float, default=None, metavar="SECONDS",
                        help="with --wait: give up after this long (exit 5)")


def _size(text: str) -> str:
    """--memory: kept as written (the manifest says it so), once it reads as a size."""
    try:
        parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _cpus(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of CPUs such as 1.5") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError("the number of CPUs must be more than 0")
    return value
