"""Commands about one job: show, logs, cancel."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, BinaryIO

import yaml

from dropq.cli.console import as_json, say
from dropq.cli.exits import Exit
from dropq.cli.inbox import drop
from dropq.cli.lookup import check_may_cancel, get_job, job_folder, open_store
from dropq.cli.wait import print_result
from dropq.config import Config
from dropq.publish.streams import Stream, stream_path
from dropq.queue.jobs import FINAL, JobStatus


def cmd_show(config: Config, args: argparse.Namespace) -> int:
    job = get_job(config, args.id)
    doc = job.summary()
    if job.owner_uid is not None:  # who dropped it: on a shared host, whose its results are
        doc["owner"] = {"uid": job.owner_uid, "gid": job.owner_gid}
    store = open_store(config)
    try:
        if job.held is not None or job.status is JobStatus.WAITING:
            doc["waiting"] = store.waiting_reason(job)
        progress = store.progress(job)
        if progress is not None:
            doc["tasks"] = progress["text"]
            if args.json:
                doc["tasks"] = progress
        delivery = store.delivery(job.id)
    finally:
        store.close()
    if delivery is not None:
        doc["notify"] = {k: delivery[k] for k in ("url", "state", "attempts", "last_error", "delivered_at")}
    if args.json:
        print(as_json(doc))
        return Exit.OK
    if job.status in FINAL:
        print_result(config, job)
        if progress is not None:
            say(f"# {progress['text']}")
    else:
        say(yaml.safe_dump({k: v for k, v in doc.items() if k != "notify"}, sort_keys=False), end="")
    if delivery is not None:
        say(f"# notify: {_delivery_words(delivery, config.notify.max_attempts)}")
    return Exit.OK


def _delivery_words(delivery: dict[str, Any], most: int) -> str:
    """A webhook's last state, for a person: delivered, or failing with the status or error."""
    state, attempts, error = delivery["state"], delivery["attempts"], delivery["last_error"]
    if state == "delivered":
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(delivery["delivered_at"]))
        return f"delivered to {delivery['url']} at {when} (attempt {attempts})"
    if state == "failed":
        return f"not delivered to {delivery['url']}: gave up after {attempts} attempts; last: {error}"
    if attempts == 0:
        return f"to be delivered to {delivery['url']}"
    nxt = time.strftime("%H:%M:%S", time.localtime(delivery["next_at"]))
    return f"failing: {error} (attempt {attempts} of {most}); next attempt at {nxt}"


def cmd_cancel(config: Config, args: argparse.Namespace) -> int:
    job = get_job(config, args.id)
    if job.parent is not None:
        say(f"dropq: {job.id} is task {job.task_index} of the array {job.parent}, whose tasks are cancelled together: "
            f"dropq cancel {job.parent}", out=sys.stderr)
        return Exit.USAGE
    if job.status in FINAL:
        say(f"dropq: job {job.id} already finished ({job.status}); nothing to cancel", out=sys.stderr)
        return Exit.ALREADY_FINISHED
    check_may_cancel(config, job)
    drop(config.inbox, f"{job.id}.cancel", b"")
    say(f"cancel requested for {job.id} ({job.status})")
    return Exit.OK


def cmd_logs(config: Config, args: argparse.Namespace) -> int:
    streams: list[tuple[Stream, BinaryIO]] = []
    if not args.stderr:
        streams.append(("stdout", sys.stdout.buffer))
    if not args.stdout:
        streams.append(("stderr", sys.stderr.buffer))
    store = open_store(config)
    offsets = {name: 0 for name, _ in streams}
    job_id = args.id
    try:
        if getattr(args, "task", None) is not None:
            array = store.get(args.id)
            if array.tasks is None:
                say(f"dropq: job {array.id} is not an array (it has no `matrix:`), so it has no tasks",
                    out=sys.stderr)
                return Exit.USAGE
            if not 0 <= args.task < array.tasks:
                say(f"dropq: job {array.id} has tasks 0 to {array.tasks - 1}; there is no task {args.task}",
                    out=sys.stderr)
                return Exit.USAGE
            job_id = f"{array.id}/{args.task}"
        while True:
            job = store.get(job_id)
            array_job = store.find(job.parent) if job.parent is not None else None
            if job.status in FINAL:
                job_folder(config, array_job or job)  # another user's results: said in words, not "Permission denied"
            for name, out in streams:
                offsets[name] = _copy_from(stream_path(config, job, name, array=array_job), offsets[name], out)
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
