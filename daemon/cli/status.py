"""status (once, or --watch) and workers: the queue and the workers at a glance."""

from __future__ import annotations

import argparse
import os
import time

from dropq.cli.console import Screen, as_json, bar, duration, say, table
from dropq.cli.exits import Exit
from dropq.cli.lookup import daemon_alive, open_store
from dropq.config import Config
from dropq.intake.manifest import is_manifest_name
from dropq.ops import fleet
from dropq.queue.jobs import FINAL, JobStatus
from dropq.queue.store import Store
from dropq_worker.protocol import WorkerState

#: the waiting jobs `dropq status` lists, with what each waits for
WAITING_SHOWN = 5


def cmd_status(config: Config, args: argparse.Namespace) -> int:
    if args.watch:
        return _watch(config, args.interval, until_idle=args.until_idle)
    snap = _Snapshot.of(config)
    if args.json:
        print(as_json({"daemon": {"running": snap.running, **snap.meta}, "jobs": snap.counts,
                       "waiting_for_environments": snap.waiting,
                       "waiting": [{"id": i, "reason": r} for i, r in snap.after], "workers": snap.workers,
                       "recent": [j.summary() for j in snap.recent]}))
        return Exit.OK
    say("\n".join(_status_lines(snap)))
    return Exit.OK


class _Snapshot:
    @classmethod
    def of(cls, config: Config) -> _Snapshot:
        """One look at the store, through a connection of its own that is closed at once."""
        store = open_store(config)
        try:
            return cls(store)
        finally:
            store.close()

    def __init__(self, store: Store, recent: int = 10) -> None:
        self.now = time.time()
        self.counts = store.counts()
        self.meta = store.meta()
        self.running = daemon_alive(self.meta.get("pid", ""))
        #: grouped by agent (this host's own first), each with its agent's state and last contact
        self.workers = fleet.workers(store, now=self.now, running=self.running)
        self.recent = store.recent(recent)
        self.waiting = store.waiting_for()
        #: a few waiting jobs, each with what it waits for (the jobs it runs after, or its inputs)
        self.after = [(j.id, store.waiting_reason(j))
                      for j in store.with_status(JobStatus.WAITING, limit=WAITING_SHOWN)]
        self.jobs = {w["job"]: store.find(w["job"]) for w in self.workers if w["job"]}


def _status_lines(snap: _Snapshot) -> list[str]:
    meta = snap.meta
    lines = [f"daemon   {'running (pid ' + meta['pid'] + ')' if snap.running else 'not running'}"
             f"   pool: {meta.get('pool', '?')}"
             + (f"   dashboard: {meta['http']}" if snap.running and meta.get("http") else ""),
             f"watcher  {meta.get('watcher', '?')}, {meta.get('watcher_rescans', '0')} rescans, "
             f"{meta.get('watcher_missed', '0')} manifests missed by events and found by a rescan"]
    if snap.running and meta.get("disk_low"):
        lines.append(f"disk     claiming paused: {meta['disk_low']}")
    if snap.running and meta.get("intake_trouble"):
        lines.append(f"intake   {meta['intake_trouble']} (retried with back-off; see the daemon's log)")
    order = [s.value for s in JobStatus]
    lines.append("jobs     " + ("   ".join(f"{s}: {snap.counts[s]}" for s in order if snap.counts.get(s)) or "none"))
    lines += [f"env      {w['reason']}: {w['jobs']} queued job(s) wait for it" for w in snap.waiting]
    lines += [f"waiting  {job_id}: {reason}" for job_id, reason in snap.after if reason]
    lines += ["", *_worker_lines(snap)]
    if snap.recent:
        lines.append("")
        lines += table(["RECENT JOB", "STATUS", "ATTEMPTS", "TOOK", "ERROR"],
                       [[j.id[:28], j.status.value, j.attempts, duration(j.run_seconds), (j.error or "")[:60]]
                        for j in snap.recent], right=[2, 3])
    return lines


def _worker_lines(snap: _Snapshot) -> list[str]:
    lines: list[str] = []
    group: str | None = None
    rows: list[list[object]] = []
    for w in snap.workers:
        if w["agent"] != group:  # a line per agent above its workers: where they run, and whether it is there
            if rows:
                lines += table(["WORKER", "STATE", "JOB", "ELAPSED", "DETAIL"], rows, right=[3])
                rows = []
            group = w["agent"]
            lines += ["", f"agent {group} on {w['host']}: {w['agent_state']}, last contact "
                          f"{duration(w['last_contact_seconds'])} ago"]
        job = snap.jobs.get(w["job"]) if w["job"] else None
        elapsed = snap.now - job.started_at if job and job.started_at and w["state"] == WorkerState.BUSY else None
        state = w["state"] if snap.running else "stopped"
        if w["agent_state"] == "lost":
            state = "lost"
        rows.append([w["name"], state, w["job"] or "-", duration(elapsed), w["detail"] or ""])
    if rows or not lines:
        lines += table(["WORKER", "STATE", "JOB", "ELAPSED", "DETAIL"], rows, right=[3])
    return lines[1:] if lines and lines[0] == "" else lines


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
                store = open_store(config)
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
    if args.workers_command == "remove":
        from dropq.pools.docker import remove_workers

        removed = remove_workers(config)
        print("\n".join(removed) if removed else f"no worker containers of the daemon on {config.state}")
        return Exit.OK
    snap = _Snapshot.of(config)
    if args.json:
        print(as_json(snap.workers))
    else:
        say("\n".join(_worker_lines(snap)))
    return Exit.OK
