"""docker-compose.yml: a scalable worker service that the daemon adopts (real engine, real compose)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import ROOT, DaemonProcess, Workspace, _skip_or_fail
from helpers import dropq_json

pytestmark = pytest.mark.docker


def compose_command() -> list[str]:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True)
    if probe.returncode == 0:
        return ["docker", "compose"]
    _skip_or_fail("neither docker-compose nor the docker compose plugin is installed")
    raise AssertionError("unreachable")


@pytest.fixture
def compose(workspace: Workspace, docker_image: str) -> Iterator[list[str]]:
    shutil.copy(ROOT / "docker-compose.yml", workspace.root / "docker-compose.yml")
    # compose v1 checks that the service's build folder exists even for `down`
    os.symlink(ROOT / "worker", workspace.root / "worker")
    workspace.configure(workers={"pool": "docker", "docker": {"managed_by": "compose", "image": docker_image}})
    project = f"dq{uuid.uuid4().hex[:10]}"
    base = [*compose_command(), "-p", project, "-f", str(workspace.root / "docker-compose.yml")]
    yield base
    down = subprocess.run([*base, "down", "-v", "-t", "1"], capture_output=True, text=True,
                          env={**os.environ, "DROPQ_IMAGE": docker_image})
    left = subprocess.run(["docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project={project}"],
                          capture_output=True, text=True).stdout.split()
    if left:  # whatever happened above, nothing of this test may keep running
        subprocess.run(["docker", "rm", "-f", *left], capture_output=True)
    assert down.returncode == 0 and not left, f"compose down failed: {down.stderr[-2000:]}"


def test_the_daemon_adopts_scaled_compose_workers_and_runs_jobs_on_them(
        workspace: Workspace, daemon: DaemonProcess, compose: list[str], docker_image: str) -> None:
    daemon.start()
    assert "no compose workers yet" in daemon.log_text()
    up = subprocess.run([*compose, "up", "-d", "--no-build", "--scale", "worker=2"], capture_output=True,
                        text=True, env={**os.environ, "DROPQ_IMAGE": docker_image}, timeout=120)
    assert up.returncode == 0, up.stderr
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and daemon.log_text().count("adopted compose container") < 2:
        time.sleep(0.1)
    assert daemon.log_text().count("adopted compose container") == 2
    for i in range(6):
        workspace.drop(f"c{i}.yaml", {"program": "sleep", "args": ["0.3"]})
    results = workspace.wait_results(6, timeout=60)
    assert all(r["status"] == "succeeded" for r in results.values())
    hosts = {r["worker"] for r in results.values()}
    assert len(hosts) == 2, "both replicas ran jobs"
    names = {w["name"] for w in dropq_json(workspace.config, "status")["workers"]}
    assert names == hosts


T = TypeVar("T")
Pool = dict[str, dict[str, Any]]

#: a job that runs until the test opens its gate (a file beside the program, on the read-only programs
#: mount every replica sees): it is surely running while the replicas are scaled away, however slow
#: compose is, and finishes at once when retried after the gate is open
GATE = """\
import pathlib, sys, time
gate = pathlib.Path(__file__).with_name("gate.open")
deadline = time.monotonic() + 120
while not gate.exists() and time.monotonic() < deadline:
    time.sleep(0.05)
print("through the gate" if gate.exists() else "the gate never opened")
sys.exit(0 if gate.exists() else 1)
"""


def wait_for(predicate: Callable[[], T | None], what: str, timeout: float = 60.0) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")


def scale(compose: list[str], image: str, replicas: int) -> None:
    up = subprocess.run([*compose, "up", "-d", "--no-build", "-t", "5", "--scale", f"worker={replicas}"],
                        capture_output=True, text=True, env={**os.environ, "DROPQ_IMAGE": image}, timeout=180)
    assert up.returncode == 0, up.stderr


def replica_hosts(compose: list[str]) -> set[str]:
    """The hostnames (dropq's worker names) of the project's running replicas, as the engine has them."""
    project = compose[compose.index("-p") + 1]
    ids = subprocess.run(["docker", "ps", "-q", "--filter", f"label=com.docker.compose.project={project}"],
                         capture_output=True, text=True, check=True).stdout.split()
    if not ids:
        return set()
    inspect = subprocess.run(["docker", "inspect", "--format", "{{.Config.Hostname}}", *ids],
                             capture_output=True, text=True, check=True)
    return set(inspect.stdout.split())


def pool(workspace: Workspace) -> Pool:
    return {w["name"]: w for w in dropq_json(workspace.config, "workers")}


def pool_if(workspace: Workspace, check: Callable[[Pool], bool]) -> Pool | None:
    """The pool as `dropq workers --json` lists it, if `check` holds for it."""
    listed = pool(workspace)
    return listed if check(listed) else None


def worker_metrics(daemon: DaemonProcess) -> dict[str, float]:
    text = daemon.get("/metrics").text
    return {s.labels["state"]: s.value for family in text_string_to_metric_families(text)
            for s in family.samples if s.name == "dropq_workers"}


def test_scaling_down_takes_the_removed_replicas_out_of_the_pool_and_retries_their_jobs(
        workspace: Workspace, daemon: DaemonProcess, compose: list[str], docker_image: str) -> None:
    (workspace.programs / "gate.py").write_text(GATE)
    daemon.start()
    scale(compose, docker_image, 4)
    four = replica_hosts(compose)
    assert len(four) == 4
    wait_for(lambda: set(pool(workspace)) == four and all(w["state"] == "idle" for w in pool(workspace).values()),
             "the four replicas listed idle")
    for i in range(4):
        workspace.drop(f"warm{i}.yaml", {"program": "sleep", "args": ["0.2"]})
    assert all(r["status"] == "succeeded" for r in workspace.wait_results(4).values())

    # one gated job per replica, with no retries to spare: a scale-down must not cost the job an attempt
    for i in range(4):
        workspace.drop(f"long{i}.yaml", {"program": "gate", "retries": 0})
    busy = wait_for(lambda: pool_if(workspace, lambda p: len(p) == 4 and all(w["state"] == "busy" for w in p.values())),
                    "all four replicas busy with a gated job")
    ran_on = {w["job"]: name for name, w in busy.items()}
    assert set(ran_on) == {f"long{i}" for i in range(4)}

    scale(compose, docker_image, 1)
    (kept,) = replica_hosts(compose)
    removed = four - {kept}
    # the engine's events take the destroyed replicas out at once: the pool, the CLI and /metrics agree
    wait_for(lambda: set(pool(workspace)) == {kept}, "the pool to list only the remaining replica", timeout=30)
    wait_for(lambda: sum(worker_metrics(daemon).values()) == 1, "/metrics to count one worker", timeout=10)

    (workspace.programs / "gate.open").write_text("")
    results = workspace.wait_results(8)
    for job, worker in ran_on.items():
        result = results[job]
        assert result["status"] == "succeeded", result
        # every gated job ends on the remaining replica: the one that ran there, and the three that ran on
        # a removed replica and were retried there, uncounted (retries: 0 would have failed them)
        assert result["worker"] == kept and result["attempts"] == 1, (job, worker, result)
    requeued = {job for job, worker in ran_on.items() if worker in removed}
    assert len(requeued) == 3
    log = daemon.log_text()
    for job in requeued:
        assert f"job {job}: its worker left the pool" in log

    # later jobs go only to the remaining replica, each on its first attempt
    for i in range(4):
        workspace.drop(f"after{i}.yaml", {"program": "sleep", "args": ["0.1"]})
    results = workspace.wait_results(12)
    for i in range(4):
        assert results[f"after{i}"]["worker"] == kept and results[f"after{i}"]["attempts"] == 1
    final = wait_for(lambda: pool_if(workspace, lambda p: p.get(kept, {}).get("state") == "idle"), "the replica idle")
    assert set(final) == {kept}
    assert final[kept]["detail"] == f"container {kept}"  # compose names a replica's host by its short id
    wait_for(lambda: worker_metrics(daemon) == {"idle": 1.0, "busy": 0.0}, "/metrics to count the replica idle")


def test_a_replica_that_crashes_leaves_the_pool_until_compose_restarts_it_and_its_job_counts_an_attempt(
        workspace: Workspace, daemon: DaemonProcess, compose: list[str], docker_image: str) -> None:
    (workspace.programs / "gate.py").write_text(GATE)
    daemon.start()
    scale(compose, docker_image, 1)
    (host,) = replica_hosts(compose)
    wait_for(lambda: pool_if(workspace, lambda p: p.get(host, {}).get("state") == "idle"), "the replica idle")
    workspace.drop("victim.yaml", {"program": "gate", "retries": 1})
    wait_for(lambda: pool_if(workspace, lambda p: p[host]["job"] == "victim"), "the job running")
    # a crash, not a stop: the container's first process killed from outside the engine, which then sends no
    # kill event; compose's restart policy starts the same container again
    pid = subprocess.run(["docker", "inspect", "--format", "{{.State.Pid}}", host], capture_output=True,
                         text=True, check=True).stdout.strip()
    os.kill(int(pid), signal.SIGKILL)
    wait_for(lambda: "compose container " + host + " died" in daemon.log_text(), "the pool to see it die")
    (workspace.programs / "gate.open").write_text("")
    result = workspace.wait_results(1)["victim"]
    assert (result["status"], result["worker"], result["attempts"]) == ("succeeded", host, 2), result
    assert "its worker left the pool" not in daemon.log_text()
    assert daemon.log_text().count(f"adopted compose container {host}") == 2
    assert set(pool(workspace)) == {host}
