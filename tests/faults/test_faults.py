"""Fault injection: each fault repeated while jobs flow; every job must end committed exactly once.

The table of figures is printed at the end of the run. `--faults-heavy` runs more jobs and faults.
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest

from conftest import DaemonProcess, Workspace
from helpers import account, containers_of, dropq_json, wait_until

FAST = "#!/bin/sh\necho \"ok $1\"\n"


def scale(request: pytest.FixtureRequest, normal: int, heavy: int) -> int:
    return heavy if request.config.getoption("--faults-heavy") else normal


def fast_program(ws: Workspace) -> None:
    path = ws.programs / "fast.sh"
    path.write_text(FAST)
    path.chmod(0o755)


def committed(ws: Workspace) -> set[str]:
    return {n for n in os.listdir(ws.outbox) if not n.startswith(".")}


ACTIVE = {"waiting", "queued", "running", "committing"}


def settle_all(ws: Workspace, expected: set[str], timeout: float) -> None:
    """Wait until every expected job is committed and nothing more can be: no job active in the store
    and no manifest left in the inbox (a duplicate could only come from one of those)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if expected <= committed(ws):
            jobs = dropq_json(ws.config, "status")["jobs"]
            manifests = [n for n in os.listdir(ws.inbox) if n.endswith((".yaml", ".yml")) and n[0] != "."]
            if not ACTIVE & set(jobs) and not manifests:
                return
        time.sleep(0.1)


def assert_clean(counts: dict[str, int], expected: int) -> None:
    assert counts == {"committed": expected, "lost": 0, "duplicated": 0, "stuck": 0}


def test_kill_9_of_the_daemon_at_random_moments(workspace: Workspace, daemon: DaemonProcess,
                                                request: pytest.FixtureRequest) -> None:
    jobs, kills = scale(request, 200, 1000), scale(request, 20, 60)
    rng = random.Random(7)
    daemon.start()
    expected = set()
    for i in range(jobs):
        workspace.drop(f"k{i}.yaml", {"program": "echo", "args": [str(i)]})
        expected.add(f"k{i}")
    for _ in range(kills):
        time.sleep(rng.uniform(0.05, 0.5))
        daemon.kill()
        daemon.start()
    settle_all(workspace, expected, timeout=180)
    counts = account("kill -9 of the daemon", workspace=workspace, expected=expected, faults=kills)
    assert_clean(counts, jobs)
    for i in range(0, jobs, 37):
        assert (workspace.outbox / f"k{i}" / "stdout.txt").read_text().startswith(f"{i}\n")
    assert os.listdir(workspace.state / "spool") == []


def test_dropped_while_the_daemon_is_down_then_more_while_it_starts(workspace: Workspace, daemon: DaemonProcess,
                                                                    request: pytest.FixtureRequest) -> None:
    fast_program(workspace)
    before, during = scale(request, 200, 2000), scale(request, 200, 2000)
    expected = set()
    for i in range(before):
        workspace.drop(f"d{i}.yaml", {"program": "fast.sh"})
        expected.add(f"d{i}")
    daemon.start(wait=False)
    for i in range(during):
        workspace.drop(f"s{i}.yaml", {"program": "fast.sh"})
        expected.add(f"s{i}")
    daemon.wait_running()
    settle_all(workspace, expected, timeout=120)
    assert_clean(account("dropped while down, more during start", workspace=workspace, expected=expected,
                         faults=1), before + during)


def test_manifests_whose_events_an_inotify_overflow_lost_are_all_claimed(
        workspace: Workspace, daemon: DaemonProcess, request: pytest.FixtureRequest) -> None:
    """A real overflow of the daemon's own inotify queue, without root: the daemon is paused (SIGSTOP)
    while more events than fs.inotify.max_queued_events arrive, then the manifests, whose events the
    kernel drops (IN_Q_OVERFLOW). Lowering the sysctl instead needs a writable /proc/sys, which
    containers and CI do not have, and a test that skips there proves nothing."""
    fast_program(workspace)
    jobs = scale(request, 300, 3000)
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    daemon.start()
    assert daemon.proc is not None
    expected = set()
    os.kill(daemon.proc.pid, signal.SIGSTOP)
    try:
        # two dotfiles written in turn: the kernel merges an event only into an identical last one, so
        # each write queues one IN_MODIFY (dotfiles are not manifests: the daemon ignores them)
        with open(workspace.inbox / ".flood-a", "wb", buffering=0) as a, \
                open(workspace.inbox / ".flood-b", "wb", buffering=0) as b:
            for _ in range(limit // 2 + 1):
                a.write(b"x")
                b.write(b"x")
        for i in range(jobs):
            workspace.drop(f"o{i}.yaml", {"program": "fast.sh"})
            expected.add(f"o{i}")
        # the rescan counts a manifest as missed by events once it is unchanged for 2 s, by its ctime
        # (which utime cannot set back): keep the daemon paused until the newest one is that old
        newest = max(os.lstat(workspace.inbox / f"o{i}.yaml").st_ctime for i in range(jobs))
        wait_until(lambda: time.time() >= newest + 2.2, timeout=30, what="the manifests to be 2 s old")
    finally:
        os.kill(daemon.proc.pid, signal.SIGCONT)
    settle_all(workspace, expected, timeout=300)
    counts = account("inotify queue overflow (daemon paused)", workspace=workspace, expected=expected, faults=1)
    assert_clean(counts, jobs)
    watcher = dropq_json(workspace.config, "status")["daemon"]
    assert int(watcher["watcher_missed"]) > 0, "the events were lost, and rescans made up for it"


def test_a_setsid_grandchild_holding_stdout_at_timeout(workspace: Workspace, daemon: DaemonProcess,
                                                        request: pytest.FixtureRequest) -> None:
    (workspace.programs / "escape.py").write_text(
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import os, time; os.setsid(); time.sleep(120)'])\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(120)\n")
    runs = scale(request, 4, 12)
    daemon.start()
    expected = set()
    for i in range(runs):
        workspace.drop(f"e{i}.yaml", {"program": "escape", "timeout": 1})
        expected.add(f"e{i}")
    settle_all(workspace, expected, timeout=60)
    assert_clean(account("setsid grandchild at timeout", workspace=workspace, expected=expected, faults=runs), runs)
    for job_id in expected:
        result = workspace.result(job_id)
        assert result["status"] == "timed_out"
        assert result["duration_seconds"] < 1 + 1 + 1, "within timeout + kill_grace"
        pid = int((workspace.outbox / job_id / "stdout.txt").read_text())
        assert not Path(f"/proc/{pid}").exists(), "the escaped grandchild was killed and reaped"


def test_a_poison_job_that_kills_its_workers_does_not_stall_the_others(workspace: Workspace,
                                                                       daemon: DaemonProcess) -> None:
    (workspace.programs / "poison.py").write_text("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n")
    daemon.start()
    # started fresh: its parent is then the worker itself (forked from a warm interpreter, it would be the fork
    # server, which the worker replaces without losing the job: tests/test_warm_equivalence.py)
    workspace.drop("poison.yaml", {"program": "poison", "retries": 2, "fresh_interpreter": True})
    expected = {"poison"}
    for i in range(30):
        workspace.drop(f"n{i}.yaml", {"program": "echo"})
        expected.add(f"n{i}")
    settle_all(workspace, expected, timeout=120)
    assert_clean(account("poison job kills its worker", workspace=workspace, expected=expected, faults=3), 31)
    poison = workspace.result("poison")
    assert poison["status"] == "failed" and poison["attempts"] == 3
    assert "lost 3 time(s)" in poison["error"]
    assert all(workspace.result(f"n{i}")["status"] == "succeeded" for i in range(30))


@pytest.mark.docker
def test_docker_kill_of_busy_workers(workspace: Workspace, daemon: DaemonProcess, docker_image: str,
                                     request: pytest.FixtureRequest) -> None:
    workspace.configure(workers={"pool": "docker", "count": 2, "docker": {"image": docker_image}})
    jobs, kills = scale(request, 30, 100), scale(request, 5, 20)
    daemon.start()
    expected = set()
    for i in range(jobs):
        workspace.drop(f"c{i}.yaml", {"program": "sleep", "args": ["0.3"], "retries": 5})
        expected.add(f"c{i}")
    done = 0
    # bounded: by the faults wanted, by a deadline, and by the jobs (once all are committed, no worker
    # will be busy again and waiting for one would never end)
    deadline = time.monotonic() + 120
    while done < kills and time.monotonic() < deadline and not expected <= committed(workspace):
        busy = [w["name"] for w in dropq_json(workspace.config, "status")["workers"] if w["state"] == "busy"]
        containers = containers_of(workspace.state)
        if busy and busy[0] in containers:
            containers[busy[0]].kill(signal="SIGKILL")
            done += 1
            time.sleep(0.6)  # pacing only: let the pool replace it and the job be retried before the next
        else:
            time.sleep(0.05)
    assert done > 0, "no worker was ever seen busy: no fault was injected"
    settle_all(workspace, expected, timeout=180)
    assert_clean(account("docker kill of a busy worker", workspace=workspace, expected=expected, faults=done), jobs)
    assert all(workspace.result(j)["status"] == "succeeded" for j in expected)
