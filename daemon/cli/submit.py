"""submit and retry: drop a job into the inbox, and with --wait follow it to its end."""

from __future__ import annotations

import argparse
import os
import shutil
import stat
import sys
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from dropq.cli.console import say
from dropq.cli.exits import Exit
from dropq.cli.inbox import drop, free_name, place_input
from dropq.cli.lookup import get_job, job_folder, last_seq
from dropq.cli.wait import require_daemon, wait
from dropq.config import Config
from dropq.errors import DropqError, ManifestError
from dropq.intake.manifest import Manifest, is_manifest_name
from dropq.intake.manifest_file import OUTBOX_PREFIX
from dropq.queue.jobs import FINAL
from dropq_worker.trees import walk


def cmd_submit(config: Config, args: argparse.Namespace) -> int:
    if args.wait:
        require_daemon(config)
    target = Path(args.target)
    if is_manifest_name(target.name) and target.is_file():
        if args.inputs or args.program_args or args.after or args.matrix or args.glob:
            raise DropqError("give either a manifest file, or a program with inputs, arguments, --after, --matrix "
                             "and --glob, not both (a manifest says `after:` and `matrix:` itself)")
        text = target.read_text(encoding="utf-8")
        name = args.name or target.name
    else:
        text = yaml.safe_dump(_manifest_from_args(config, args), sort_keys=False)
        name = args.name or f"{PurePosixPath(args.inputs[0]).stem if args.inputs else args.target}.yaml"
    if not is_manifest_name(name):
        name = f"{name}.yaml"
    return _drop(config, free_name(config, name), text.encode(), args, said="")


def _manifest_from_args(config: Config, args: argparse.Namespace) -> dict[str, Any]:
    manifest: dict[str, Any] = {"program": args.target}
    # `outbox:JOB/PATH` reads a file of a finished job's outbox folder: given to the daemon as written
    inputs = [p if p.startswith(OUTBOX_PREFIX) else place_input(config, Path(p)) for p in args.inputs]
    if inputs:
        manifest["input"] = inputs[0]
    if len(inputs) > 1:
        manifest["inputs"] = inputs[1:]
    if args.program_args:
        manifest["args"] = args.program_args
    for key in ("output", "timeout", "retries", "priority", "memory", "cpus"):
        if getattr(args, key) is not None:
            manifest[key] = getattr(args, key)
    if args.after:
        manifest["after"] = list(dict.fromkeys(args.after))
    if args.env:
        pairs = [e.partition("=") for e in args.env]
        if any(not sep for _, sep, _ in pairs):
            raise DropqError("--env takes NAME=VALUE")
        manifest["env"] = {k: v for k, _, v in pairs}
    matrix = _matrix_from_args(args)
    if matrix:
        manifest["matrix"] = matrix
        globs = [name for name, values in matrix.items() if isinstance(values, dict)]
        if len(globs) == 1 and not inputs:
            manifest["input"] = f"{{{globs[0]}}}"  # each task reads its own file
    if args.max_failures is not None:
        manifest["max_failures"] = args.max_failures
    return manifest


def _matrix_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """--matrix NAME=V1,V2 and --glob NAME=PATTERN, in the order given, as a manifest's `matrix:`."""
    matrix: dict[str, Any] = {}
    for option, items in (("--matrix", args.matrix), ("--glob", args.glob)):
        for item in items:
            name, sep, value = item.partition("=")
            if not sep or not name or not value:
                raise DropqError(f"{option} takes NAME=" + ("V1,V2,..." if option == "--matrix" else "PATTERN") +
                                 f", not {item!r}")
            if name in matrix:
                raise DropqError(f"{option} {name}: the name is given twice")
            matrix[name] = value.split(",") if option == "--matrix" else {"glob": value}
    return matrix


def cmd_retry(config: Config, args: argparse.Namespace) -> int:
    job = get_job(config, args.id)
    if job.status not in FINAL:
        raise DropqError(f"{job.id} has not finished ({job.status}); only a finished job can be retried")
    if args.wait:
        require_daemon(config)
    folder = job_folder(config, job)  # another user's results: a retry may not read them either
    manifest = folder / "manifest.yaml"
    if not manifest.is_file():
        raise DropqError(f"{job.id} cannot be retried: its manifest is not in {folder}")
    inputs = folder / "inputs"
    fetched = _fetched_inputs(config, manifest)
    # walked without recursion (Path.rglob recurses): the inputs are a tree someone else made
    names = sorted(n for n in (p.relative_to(inputs) for p, st, _ in walk(inputs) if stat.S_ISREG(st.st_mode))
                   if str(n) not in fetched)
    taken = [str(n) for n in names if os.path.lexists(config.inbox / n)]
    if taken:
        raise DropqError(f"inbox/{taken[0]} exists; the retry puts {job.id}'s input there, so move it away first")
    for rel in names:
        target = config.inbox / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.part")
        shutil.copyfile(inputs / rel, tmp)
        os.rename(tmp, target)
    return _drop(config, free_name(config, f"{job.id}-retry.yaml"), manifest.read_bytes(), args,
                 said=f" (a retry of {job.id})")


def _fetched_inputs(config: Config, manifest: Path) -> set[str]:
    """The inputs a job read from other jobs' outbox folders (inputs/outbox/JOB/PATH): a retry reads them
    from there again, so they are not copied into the inbox."""
    try:
        parsed = Manifest.parse(manifest.read_bytes(), defaults=config.jobs,
                                max_bytes=config.intake.max_manifest_bytes)
    except ManifestError:
        return set()  # the daemon rejects it again, saying why
    return set(parsed.inputs) - set(parsed.inbox_inputs())


def _drop(config: Config, name: str, data: bytes, args: argparse.Namespace, *, said: str) -> int:
    """Drop the manifest `data` into the inbox as `name`, say so, and with --wait follow the job to its end."""
    since = last_seq(config)  # before the drop: the job made from it comes after
    drop(config.inbox, name, data)
    say(f"submitted {config.inbox / name}{said}", out=sys.stderr)
    if not args.wait:
        return Exit.OK
    return wait(config, name, since, args.wait_timeout)
