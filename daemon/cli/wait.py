"""Following one job from the inbox to its end, with one line of progress (--wait)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from dropq.cli.console import Screen, duration, say
from dropq.cli.exits import Exit
from dropq.cli.lookup import daemon_alive, daemon_running, job_folder
from dropq.config import Config
from dropq.errors import NoDaemon
from dropq.escape import printable
from dropq.queue.jobs import FINAL, JobStatus
from dropq.queue.store import JobRecord, Store

#: seconds without a live daemon before a --wait gives up: a restart (systemd's, say) takes less
DAEMON_GONE_AFTER = 10.0


def require_daemon(config: Config) -> None:
    """Refuse a --wait at once, before anything is dropped, when no daemon would ever end it."""
    if not daemon_running(config):
        raise NoDaemon(f"no dropq daemon is running on {config.state}; start one (dropq run), or submit "
                       "without --wait to leave the job in the inbox until one runs")


def wait(config: Config, name: str, since: int, timeout: float | None) -> int:
    """Follow the job made from inbox/`name` to its end, with one line of progress on stderr."""
    deadline = None if timeout is None else time.monotonic() + timeout
    store: Store | None = None
    screen = Screen(sys.stderr)
    shown = ""
    gone_since: float | None = None
    try:
        while deadline is None or time.monotonic() < deadline:
            if store is None and config.database.exists():
                store = Store(config.database, readonly=True)
            # the intake records the manifest's name as printable (controls and undecodable bytes escaped)
            job = store.by_source(printable(name), after_seq=since) if store else None
            line = _progress(store, job) if store is not None and job is not None else f"{name}: in the inbox"
            # on a terminal the line updates in place; in a log, only changes of state are written
            if line != shown and (screen.tty or line.split(",")[0] != shown.split(",")[0]):
                screen.line(line)
                shown = line
            if job is not None and job.status in FINAL:
                screen.end_line()
                print_result(config, job)
                return Exit.OK if job.status is JobStatus.SUCCEEDED else Exit.JOB_FAILED
            # checked after the job: one that ended just before its daemon stopped is still reported
            if store is not None and not daemon_alive(store.meta().get("pid", "")):
                gone_since = gone_since or time.monotonic()
                if time.monotonic() - gone_since > DAEMON_GONE_AFTER:
                    screen.end_line()
                    raise NoDaemon(f"the dropq daemon on {config.state} stopped while {name} waited; the job "
                                   "carries on when a daemon runs again")
            else:
                gone_since = None
            time.sleep(0.1)
    finally:
        if store is not None:
            store.close()
    screen.end_line()
    say(f"dropq: gave up waiting for {name} after {timeout:g} seconds", out=sys.stderr)
    return Exit.TIMEOUT


def _progress(store: Store, job: JobRecord) -> str:
    if job.status is JobStatus.WAITING:
        return f"{job.id}: {store.waiting_reason(job) or 'waiting'}"
    if job.status is JobStatus.QUEUED:
        return f"{job.id}: queued, {store.waiting_reason(job) or f'{store.ahead_of(job)} ahead'}"
    if job.status is JobStatus.RUNNING and job.started_at:
        return f"{job.id}: running on {job.worker} (attempt {job.attempts}), {duration(time.time() - job.started_at)}"
    return f"{job.id}: {job.status}"


def _result_path(config: Config, job: JobRecord) -> Path:
    return job_folder(config, job) / "result.yaml"


def print_result(config: Config, job: JobRecord) -> None:
    path = _result_path(config, job)
    # result.yaml is written escaped, but it sits in a folder anyone with the outbox can edit: shown escaped
    if job.pruned_at is not None:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(job.pruned_at))
        gone = f"its outbox folder was removed by retention on {when}"
    else:
        gone = "its outbox folder is gone"
    say(path.read_text(errors="surrogateescape") if path.exists() else f"{job.id}: {job.status} ({gone})\n", end="")
