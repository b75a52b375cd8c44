"""The docker pool's workers as the CLI shows and clears them: `dropq workers` names each container by its
short id, and `dropq workers remove` clears the containers `on_shutdown: leave` keeps after the daemon.
Real engine, real daemon, the real `dropq` entry point."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from conftest import DaemonProcess, Workspace
from helpers import containers_of, dropq, dropq_json, engine

pytestmark = pytest.mark.docker


@pytest.fixture
def docker_ws(workspace: Workspace, docker_image: str) -> Workspace:
    workspace.configure(workers={"pool": "docker", "count": 2,
                                 "docker": {"image": docker_image, "on_shutdown": "leave"}})
    return workspace


@pytest.fixture
def decoy(docker_image: str) -> Iterator[Any]:
    """A worker container of another daemon (another state directory), created but never started: the
    removal must leave it alone."""
    client = engine(timeout=30)
    assert client is not None  # docker_image made sure an engine answers
    other = f"/tmp/not-this-state-{uuid.uuid4().hex[:8]}"
    container = client.containers.create(
        docker_image, name=f"dq-decoy-{uuid.uuid4().hex[:10]}",
        labels={"io.dropq.role": "worker", "io.dropq.instance": uuid.uuid4().hex[:12], "io.dropq.worker": "w1",
                "io.dropq.state": other})
    yield container
    container.remove(force=True)
    client.close()


def test_workers_show_the_short_container_id_labelled_as_a_container(
        docker_ws: Workspace, daemon: DaemonProcess) -> None:
    daemon.start()
    ids = {name: c.id for name, c in containers_of(docker_ws.state).items()}
    assert set(ids) == {"w1", "w2"}
    listed = {w["name"]: w["detail"] for w in dropq_json(docker_ws.config, "workers")}
    assert listed == {name: f"container {cid[:12]}" for name, cid in ids.items()}
    # the dashboard reads the same rows through the API
    api = {w["name"]: w["detail"] for w in daemon.get("/api/summary").json()["workers"]}
    assert api == listed
    text = dropq(docker_ws.config, "workers")
    assert text.returncode == 0, text.stderr
    for name, cid in ids.items():
        assert re.search(rf"^{name}\s.*\scontainer {cid[:12]}$", text.stdout, re.MULTILINE), text.stdout
    assert "pid" not in text.stdout


def test_workers_remove_clears_the_containers_a_stopped_daemon_left_and_only_those(
        docker_ws: Workspace, daemon: DaemonProcess, decoy: Any) -> None:
    daemon.start()
    left = {name: c.id for name, c in containers_of(docker_ws.state).items()}
    assert set(left) == {"w1", "w2"}

    refused = dropq(docker_ws.config, "workers", "remove")
    assert refused.returncode == 6, refused
    assert "daemon is running" in refused.stderr and "stop it first" in refused.stderr
    assert {n: c.id for n, c in containers_of(docker_ws.state).items()} == left, "nothing removed while it runs"

    assert daemon.stop() == 0
    assert {n: c.id for n, c in containers_of(docker_ws.state).items()} == left, "on_shutdown: leave kept them"

    done = dropq(docker_ws.config, "workers", "remove")
    assert done.returncode == 0, done.stderr
    assert sorted(done.stdout.splitlines()) == sorted(
        f"worker {name}: removed container {cid[:12]} (it was running)" for name, cid in left.items())
    client = engine(timeout=30)
    assert client is not None
    try:
        ours = client.containers.list(all=True, filters={"label": f"io.dropq.state={docker_ws.state}"})
        assert ours == [], "every container of this daemon is gone, stopped ones too"
        decoy.reload()  # raises NotFound if the command removed another daemon's container
        assert decoy.status == "created"
    finally:
        client.close()

    again = dropq(docker_ws.config, "workers", "remove")
    assert again.returncode == 0 and again.stdout.strip() == f"no worker containers of the daemon on {docker_ws.state}"
