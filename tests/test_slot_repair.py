"""A worker slot that fails is repaired in the running daemon, never left broken.

Real daemon processes, real workers (local processes, and containers on a real engine), real faults: the
worker's inputs folder is replaced by a file under the running daemon, so staging the next job's input
raises in the slot's thread (a stray hand in the state folder, or a broken disk). The slot gives the job
back and tries to replace its worker with a back-off; once the file is gone, the repair makes the folder
again and puts a new worker in place. The case where repair keeps failing (the watchdog then stops) is in
test_systemd.py.
"""

from __future__ import annotations

import logging
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import DaemonProcess, Workspace
from dropq.config import Config
from dropq.ops.service import Daemon
from dropq.pools import WorkerHandle
from dropq.queue.balancer import Balancer
from dropq.queue.store import JobRecord
from dropq_worker.protocol import Report
from helpers import containers_of, dropq_json, engine, wait_for_status, wait_until

WATCHDOG = {"WATCHDOG_USEC": "400000"}


class Notices:
    """What systemd would receive on NOTIFY_SOCKET, read as it comes, as systemd does: the daemon's sends
    block once a few are left unread, which would stall its intake during these long tests."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.received: list[tuple[float, dict[str, str]]] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._read, name="notices", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._done.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            self.received.append((time.monotonic(), dict(line.split("=", 1) for line in data.decode().splitlines())))

    def since(self, moment: float, key: str) -> list[str]:
        return [m[key] for t, m in list(self.received) if t >= moment and key in m]

    def close(self) -> None:
        self._done.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture
def notices(workspace: Workspace) -> Iterator[Notices]:
    made = Notices(workspace.root / "notify.sock")
    yield made
    made.close()


def the_worker(ws: Workspace) -> dict[str, Any]:
    [worker] = dropq_json(ws.config, "workers")
    return dict(worker)


def break_inputs(ws: Workspace) -> None:
    """Replace w1's inputs folder by a file, then drop a job with an input: staging it raises in the slot."""
    inputs = ws.state / "workers" / "w1" / "inputs"
    shutil.rmtree(inputs)
    inputs.write_text("not a folder\n")
    ws.put("words.txt", "one two two\n")
    ws.drop("crash.yaml", {"program": "wordcount", "input": "words.txt"})


def wait_repairing(ws: Workspace) -> dict[str, Any]:
    """The slot's state while it is being repaired, as `dropq workers` shows it: the reason, and when next."""
    worker = wait_until(lambda: (w := the_worker(ws))["state"] == "repairing" and w, timeout=30,
                        what="w1 to be shown as repairing")
    detail = str(worker["detail"])
    assert detail.startswith("failed 1 time(s) in a row (NotADirectoryError: "), detail
    # the first replacement fails too, as the file is still in the way; the detail says so, and when it tries next
    assert "something that is not a folder stands there" in detail and "; next attempt at " in detail
    return dict(worker)


def check_repaired(ws: Workspace, daemon: DaemonProcess, before: dict[str, Any]) -> dict[str, Any]:
    """The job the slot held runs again (its second attempt) on w1; so does the next; w1 is a new worker."""
    wait_for_status(ws.config, "crash", "succeeded", timeout=120)
    crash = ws.result("crash")
    assert (crash["status"], crash["worker"], crash["attempts"]) == ("succeeded", "w1", 2)
    assert (ws.outbox / "crash" / "stdout.txt").read_text() == "2 two\n1 one\n"
    ws.drop("after.yaml", {"program": "echo", "args": ["after"]})
    wait_for_status(ws.config, "after", "succeeded")
    assert ws.result("after")["worker"] == "w1"
    after = the_worker(ws)
    assert after["state"] == "idle" and after["detail"] != before["detail"], (before, after)
    log = daemon.log_text()
    assert "slot w1 failed (1 in a row): NotADirectoryError" in log
    assert "slot w1: repaired; serving again" in log
    # the traceback is logged once: the failed replacements that follow are one line each
    assert log.count("Traceback (most recent call last)") == 1, log
    return after


def check_watchdog_fed(notices: Notices) -> None:
    """The daemon stayed healthy all along (never an unhealthy STATUS), and feeds the watchdog now."""
    assert [s for s in notices.since(0, "STATUS") if s.startswith("unhealthy")] == []
    now = time.monotonic()
    wait_until(lambda: len(notices.since(now, "WATCHDOG")) >= 3, timeout=5, what="three watchdog pings")


def test_a_local_slot_that_fails_is_repaired_and_loses_no_job(
        workspace: Workspace, daemon: DaemonProcess, notices: Notices) -> None:
    workspace.configure(workers={"count": 1})
    daemon.start(env={"NOTIFY_SOCKET": str(notices.path), **WATCHDOG})
    wait_until(lambda: notices.since(0, "READY"), what="READY")
    workspace.drop("before.yaml", {"program": "echo", "args": ["before"]})
    wait_for_status(workspace.config, "before", "succeeded")
    before = the_worker(workspace)
    assert before["detail"].startswith("pid ")
    break_inputs(workspace)
    wait_repairing(workspace)
    # systemd's status line says so too (sent every 2 s; the repair fails until the file goes)
    wait_until(lambda: any(s.startswith("degraded: repairing the slot of worker(s) w1; ")
                           for s in notices.since(0, "STATUS")), timeout=15, what="a degraded STATUS")
    # the stray file goes (the repair never removes what it did not make); the folder is the repair's to make
    (workspace.state / "workers" / "w1" / "inputs").unlink()
    after = check_repaired(workspace, daemon, before)
    assert after["detail"].startswith("pid ")
    check_watchdog_fed(notices)


@pytest.mark.docker
def test_a_docker_slot_that_fails_is_repaired_with_a_new_container(
        workspace: Workspace, daemon: DaemonProcess, notices: Notices, docker_image: str) -> None:
    """On docker the new worker matters: the old container still sees the inputs folder that was removed (its
    bind mount holds on to it), so only a new container sees the one the repair makes. Its container is also
    removed from under the daemon while the slot is being repaired."""
    workspace.configure(workers={"pool": "docker", "count": 1, "docker": {"image": docker_image}})
    daemon.start(env={"NOTIFY_SOCKET": str(notices.path), **WATCHDOG})
    wait_until(lambda: notices.since(0, "READY"), what="READY")
    workspace.drop("before.yaml", {"program": "echo", "args": ["before"]})
    wait_for_status(workspace.config, "before", "succeeded", timeout=60)
    before = the_worker(workspace)
    first = containers_of(workspace.state)["w1"].id
    assert before["detail"] == f"container {first[:12]}"
    break_inputs(workspace)
    wait_repairing(workspace)
    client = engine()
    assert client is not None
    try:
        for container in client.containers.list(all=True, filters={"label": [
                f"io.dropq.state={workspace.state.resolve()}", "io.dropq.worker=w1"]}):
            container.remove(force=True)
    finally:
        client.close()
    (workspace.state / "workers" / "w1" / "inputs").unlink()
    after = check_repaired(workspace, daemon, before)
    now = containers_of(workspace.state)["w1"].id
    assert now != first and after["detail"] == f"container {now[:12]}"
    check_watchdog_fed(notices)


def test_a_slot_that_fails_after_recording_an_outcome_never_runs_that_job_again(
        workspace: Workspace, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The slot fails just after its job's outcome was recorded (the job is committing): the committer
    publishes it, and the repair gives nothing back, so it never runs a second time. An in-process daemon
    with real local workers; the fault is injected by wrapping the balancer's commit, once."""
    workspace.configure(workers={"count": 1})
    caplog.set_level(logging.INFO, logger="dropq")
    real_commit = Balancer._commit
    injected: list[str] = []

    def commit_then_fail(self: Balancer, worker: WorkerHandle, job: JobRecord, status: Report) -> None:
        real_commit(self, worker, job, status)
        if not injected:
            injected.append(job.id)
            raise RuntimeError("injected: the slot fails once its job's outcome is recorded")

    monkeypatch.setattr(Balancer, "_commit", commit_then_fail)
    daemon = Daemon(Config.load(workspace.config))
    daemon.start()
    try:
        workspace.drop("once.yaml", {"program": "echo", "args": ["once"]})
        workspace.wait_results(1)
        wait_until(lambda: "slot w1: repaired; serving again" in caplog.text, what="the slot to be repaired")
        workspace.drop("next.yaml", {"program": "echo", "args": ["next"]})
        results = workspace.wait_results(2)
        assert injected == ["once"]
        assert {k: (r["status"], r["attempts"], r["worker"]) for k, r in results.items()} == {
            "once": ("succeeded", 1, "w1"), "next": ("succeeded", 1, "w1")}
        assert (workspace.outbox / "once" / "stdout.txt").read_text().startswith("once\nDROPQ_JOB_ID=once\n")
        assert "job once: attempt 2" not in caplog.text
        assert "slot w1 failed (1 in a row): RuntimeError: injected" in caplog.text
        assert daemon.balancer.trouble() is None
        assert [w["state"] for w in daemon.store.workers()] == ["idle"]
    finally:
        daemon.stop()
