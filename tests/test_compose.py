"""docker-compose.yml: a scalable worker service that the daemon adopts (real engine, real compose)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator

import pytest

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
    down = subprocess.run([*base, "down", "-t", "1"], capture_output=True, text=True,
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
