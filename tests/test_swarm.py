"""deploy/swarm/stack.yml's agent on a real single-node Docker Swarm, running a daemon's jobs in hardened workers.

The daemon is a test process on 127.0.0.1 (so that its records can be read); the agent is the stack's own
`agent` service, rendered from deploy/swarm/stack.yml with the daemon service left out, deployed with
`docker stack deploy` (the Docker CLI: the engine's API has no stacks) as a global service on the labelled
node, with its token and the daemon's certificate as Swarm secrets. The swarm is made (on loopback only)
when the engine is in none, and left exactly as found: the node label, the secrets, the stack and every
container are removed.

The deploying test skips without an engine, and fails instead when DROPQ_REQUIRE_DOCKER=1 (as in CI).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import ROOT, DaemonProcess, Workspace, _skip_or_fail
from dropq.pools.docker import WORKER_CAPS
from helpers import dropq_json, engine, remove_containers, wait_until

STACK = ROOT / "deploy" / "swarm" / "stack.yml"
#: the agent image the test deploys; a branch builds its own (DROPQ_TEST_AGENT_IMAGE=dropq-agent:mybranch)
AGENT_IMAGE = os.environ.get("DROPQ_TEST_AGENT_IMAGE", "dropq-agent:latest")
TEST_LABEL = "io.dropq.test-swarm"

PROBE = '''
import json, os, socket
facts = {"uid": os.getuid()}
try:
    open("/probe-written-to-root", "w").close()
    facts["root_writable"] = True
except OSError:
    facts["root_writable"] = False
facts["interfaces"] = sorted(name for _, name in socket.if_nameindex())
print(json.dumps(facts))
'''


@pytest.fixture(scope="session")
def agent_image() -> str:
    """The agent image on the real engine, built (offline, on the Debian base) when missing or out of date."""
    client = engine()
    if client is None:
        _skip_or_fail("no Docker engine answers")
    from dropq.errors import DropqError
    from dropq.pools.agent_image import agent_image_is_current, build_agent

    try:
        if not agent_image_is_current(client, AGENT_IMAGE):
            try:
                build_agent(AGENT_IMAGE, from_debian=True)
            except DropqError as exc:
                _skip_or_fail(f"the agent image could not be built: {exc}")
    finally:
        client.close()
    return AGENT_IMAGE


@pytest.fixture
def swarm() -> Iterator[Any]:
    """A client of an engine that is a swarm manager; the swarm made (on 127.0.0.1) only when there was none,
    and then left again."""
    if shutil.which("docker") is None:
        _skip_or_fail("no docker command: the stack is deployed with `docker stack deploy`")
    client = engine(timeout=60)
    if client is None:
        _skip_or_fail("no Docker engine answers")
    found = client.info()["Swarm"]
    made = False
    try:
        if found["LocalNodeState"] == "inactive":
            client.swarm.init(advertise_addr="127.0.0.1", listen_addr="127.0.0.1:2377")
            made = True
        elif found["LocalNodeState"] != "active" or not found.get("ControlAvailable"):
            _skip_or_fail(f"the engine is in a swarm as {found['LocalNodeState']}, not as a manager: "
                          "the stack cannot be deployed from here")
        yield client
    finally:
        if made:
            client.swarm.leave(force=True)
        client.close()


@pytest.fixture
def labelled(swarm: Any) -> Iterator[str]:
    """This node, labelled dropq=true for the test (the label removed after, unless it was there before)."""
    node = swarm.nodes.get(swarm.info()["Swarm"]["NodeID"])
    had = node.attrs["Spec"].get("Labels", {}).get("dropq")
    if had != "true":
        spec = node.attrs["Spec"]
        spec["Labels"] = {**spec.get("Labels", {}), "dropq": "true"}
        node.update(spec)
    try:
        yield str(node.id)
    finally:
        if had != "true":
            node.reload()
            spec = node.attrs["Spec"]
            labels = dict(spec.get("Labels", {}))
            if had is None:
                labels.pop("dropq", None)
            else:
                labels["dropq"] = had
            spec["Labels"] = labels
            node.update(spec)


def render_agent_stack(into: Path) -> Path:
    """deploy/swarm/stack.yml with only its agent service (and what that service uses): the test's daemon is
    a process, not the stack's daemon service."""
    stack = yaml.safe_load(STACK.read_text())
    agent = stack["services"]["agent"]
    used = {s["source"] if isinstance(s, dict) else s for s in agent.get("secrets", [])}
    nets = agent.get("networks", [])
    rendered = {
        "version": stack["version"],
        "services": {"agent": agent},
        "networks": {n: stack["networks"][n] for n in nets},
        "secrets": {s: stack["secrets"][s] for s in used},
    }
    path = into / "agent-stack.yml"
    path.write_text(yaml.safe_dump(rendered, sort_keys=False))
    return path


def docker_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> str:
    done = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    assert done.returncode == 0, f"docker {' '.join(args)}: {done.stderr}"
    return done.stdout


def agents_url(ws: Workspace) -> str:
    db = sqlite3.connect(f"file:{ws.state / 'dropq.sqlite3'}?mode=ro", uri=True)
    try:
        row = db.execute("SELECT value FROM meta WHERE key = 'agents'").fetchone()
    finally:
        db.close()
    return str(row[0]) if row and row[0] else ""


def test_the_stack_gives_the_socket_to_the_agent_only_and_the_daemon_to_a_manager() -> None:
    """What the stack file promises, read from the file (no engine needed)."""
    stack = yaml.safe_load(STACK.read_text())
    daemon, agent = stack["services"]["daemon"], stack["services"]["agent"]
    assert daemon["deploy"]["placement"]["constraints"] == ["node.role == manager"]
    assert daemon["deploy"]["replicas"] == 1
    assert agent["deploy"]["mode"] == "global"
    assert agent["deploy"]["placement"]["constraints"] == ["node.labels.dropq == true"]

    def sources(service: dict[str, Any]) -> set[str]:
        return {v["source"] for v in service.get("volumes", [])}
    assert "/var/run/docker.sock" in sources(agent) and "/var/run/docker.sock" not in sources(daemon)
    # the work folder at the host's own path: the agent's workers' bind mounts are resolved by the host's engine
    work = next(v for v in agent["volumes"] if v["source"] != "/var/run/docker.sock")
    assert work["source"] == work["target"] and f"--work-dir={work['target']}" in agent["command"]
    assert "--token-file=/run/secrets/dropq_agent_token" in agent["command"]
    for service in (daemon, agent):
        assert stack["networks"][service["networks"][0]] == {"external": True, "name": "host"}
        assert {s["target"]: s["mode"] for s in service["secrets"]}["dropq_agent_token"] == 0o400
    assert stack["secrets"]["dropq_agent_token"]["external"] is True


def test_the_agent_updates_its_programs_in_the_folder_its_docker_workers_have_mounted(tmp_path: Path) -> None:
    """A bind mount holds the folder it was made on: programs are replaced inside it, the folder itself kept."""
    from dropq.agent import _replace_contents

    current, fresh = tmp_path / "programs", tmp_path / "fresh"
    for folder in (current, fresh):
        folder.mkdir()
    (current / "gone.py").write_text("old")
    (current / "kept.py").write_text("old")
    (current / "pkg").mkdir()
    (current / "pkg" / "stale.py").write_text("old")
    (fresh / "kept.py").write_text("new")
    (fresh / "added.py").write_text("new")
    (fresh / "pkg").mkdir()
    (fresh / "pkg" / "mod.py").write_text("new")
    inode = current.stat().st_ino
    _replace_contents(current, fresh)
    assert current.stat().st_ino == inode
    assert sorted(p.relative_to(current).as_posix() for p in current.rglob("*")) == [
        "added.py", "kept.py", "pkg", "pkg/mod.py"]
    assert (current / "kept.py").read_text() == "new"


@pytest.mark.docker
def test_the_stacks_agent_runs_jobs_in_hardened_workers(workspace: Workspace, daemon: DaemonProcess,
                                                        docker_image: str, agent_image: str, swarm: Any,
                                                        labelled: str) -> None:
    ws = workspace
    keys = ws.root / "agents"
    init = subprocess.run([sys.executable, "-m", "dropq", "agents", "init", "--dir", str(keys), "--name", "127.0.0.1",
                           "--name", "localhost"], capture_output=True, text=True, timeout=60)
    assert init.returncode == 0, init.stderr
    (ws.programs / "probe.py").write_text(PROBE)
    ws.configure(workers={"count": 0},
                 agents={"listen": "127.0.0.1:0", "token_file": str(keys / "agents.token"), "lease_seconds": 10,
                         "tls": {"cert": str(keys / "agents.crt"), "key": str(keys / "agents.key")}})
    daemon.start()
    url = wait_until(lambda: agents_url(ws), timeout=10, what="the agents API's address")
    assert url.startswith("https://127.0.0.1:")

    # the agent's work folder: a host path, bind-mounted at the same path (its workers' mounts are host paths)
    work = ws.root / "agent"
    work.mkdir()
    (work / "agent.yaml").write_text(yaml.safe_dump(
        {"workers": {"docker": {"image": docker_image, "memory": "128m", "pids_limit": 64}}}))
    run = uuid.uuid4().hex[:8]
    stack = f"dqswarm{run}"
    names = {"token": f"dropq-test-token-{run}", "cert": f"dropq-test-cert-{run}"}
    env = {"DROPQ_SERVER": url, "DROPQ_IMAGE": agent_image, "DROPQ_AGENT_DIR": str(work), "DROPQ_WORKERS": "2",
           "DROPQ_TOKEN_SECRET": names["token"], "DROPQ_CERT_SECRET": names["cert"]}
    secrets: list[Any] = []
    try:
        secrets.append(swarm.secrets.create(name=names["token"], data=(keys / "agents.token").read_bytes(),
                                            labels={TEST_LABEL: run}))
        secrets.append(swarm.secrets.create(name=names["cert"], data=(keys / "agents.crt").read_bytes(),
                                            labels={TEST_LABEL: run}))
        docker_cli("stack", "deploy", "--resolve-image", "never", "-c", str(render_agent_stack(ws.root)), stack,
                   env=env)
        check_the_agent(ws, daemon, swarm, stack, work, docker_image)
    finally:
        # the agent's log: shown by pytest only when the test failed
        print(f"--- the agent's log ---\n{_service_logs(stack)}")
        try:
            _remove_stack(swarm, stack)
        finally:
            remove_containers(work / "state")
            for secret in secrets:
                secret.remove()
    assert not swarm.containers.list(all=True, filters={"label": f"io.dropq.state={work / 'state'}"})
    assert not swarm.secrets.list(filters={"label": f"{TEST_LABEL}={run}"})


def check_the_agent(ws: Workspace, daemon: DaemonProcess, swarm: Any, stack: str, work: Path,
                    docker_image: str) -> None:
    """The deployed agent service registers, runs the jobs dropped, and runs them in hardened workers."""
    service = swarm.services.get(f"{stack}_agent")
    assert "Global" in service.attrs["Spec"]["Mode"]
    assert "node.labels.dropq == true" in service.attrs["Spec"]["TaskTemplate"]["Placement"]["Constraints"]

    host = socket.gethostname().lower()
    expected = {f"{host}-w1", f"{host}-w2"}
    wait_until(lambda: f"agent {host} registered" in daemon.log_text(), timeout=40,
               what=f"the agent's registration (service tasks: {_tasks(service)})")

    ws.put("moby.txt", "the whale the sea the end\n")
    ws.drop("moby.yaml", {"program": "wordcount", "input": "moby.txt"})
    for i in range(3):
        ws.drop(f"probe{i}.yaml", {"program": "probe"})
    results = ws.wait_results(4, timeout=40)

    # from the daemon's records: every job ran, once, on the agent's workers
    assert {r["status"] for r in results.values()} == {"succeeded"}, results
    assert {r["attempts"] for r in results.values()} == {1}
    assert {r["worker"] for r in results.values()} <= expected, results
    listed = {w["name"]: w for w in dropq_json(ws.config, "workers")}
    assert set(listed) == expected, listed  # workers.count 0: the agent's are the daemon's only workers
    assert {(w["agent"], w["host"], w["agent_state"]) for w in listed.values()} == {(host, host, "connected")}
    assert _agent_row(ws, host)["pool"] == "docker"
    assert (ws.outbox / "moby" / "stdout.txt").read_text().startswith("3 the\n")
    for i in range(3):
        facts = json.loads((ws.outbox / f"probe{i}" / "stdout.txt").read_text())
        assert facts["uid"] != 0 and facts["root_writable"] is False and facts["interfaces"] == ["lo"], facts

    # the agent is the Swarm task, on the host network, with the socket and its work folder at the host's path
    agent_container = _agent_container(swarm, stack)
    mounts = {m["Destination"]: m for m in agent_container.attrs["Mounts"]}
    assert mounts["/var/run/docker.sock"]["Source"] == "/var/run/docker.sock"
    assert mounts[str(work)]["Source"] == str(work)
    assert agent_container.attrs["HostConfig"]["NetworkMode"] == "host"
    # its workers are containers the agent made through the host's engine, not Swarm tasks, and hardened
    workers = swarm.containers.list(filters={"label": f"io.dropq.state={work / 'state'}"})
    assert len(workers) == 2
    for container in workers:
        assert not any(k.startswith("com.docker.swarm") for k in container.labels), container.labels
        hc = container.attrs["HostConfig"]
        assert hc["NetworkMode"] == "none"
        assert hc["ReadonlyRootfs"] is True
        assert hc["CapDrop"] == ["ALL"]
        assert sorted(c.removeprefix("CAP_") for c in hc["CapAdd"]) == sorted(WORKER_CAPS)
        assert "no-new-privileges" in hc["SecurityOpt"]
        assert hc["Privileged"] is False
        assert hc["Memory"] == 128 * 1024 * 1024 and hc["PidsLimit"] == 64
        assert docker_image in container.image.tags


def _agent_row(ws: Workspace, name: str) -> dict[str, Any]:
    db = sqlite3.connect(f"file:{ws.state / 'dropq.sqlite3'}?mode=ro", uri=True)
    db.row_factory = sqlite3.Row
    try:
        row = db.execute("SELECT * FROM agents WHERE name = ?", (name,)).fetchone()
    finally:
        db.close()
    assert row is not None, f"the daemon has no record of agent {name}"
    return dict(row)


def _service_logs(stack: str) -> str:
    done = subprocess.run(["docker", "service", "logs", "--raw", f"{stack}_agent"], capture_output=True, text=True,
                          timeout=30)
    return (done.stdout + done.stderr)[-20000:]


def _tasks(service: Any) -> list[Any]:
    return [(t.get("Status", {}).get("State"), t.get("Status", {}).get("Err")) for t in service.tasks()]


def _agent_container(client: Any, stack: str) -> Any:
    def running() -> Any:
        found = client.containers.list(filters={"label": f"com.docker.stack.namespace={stack}"})
        return found[0] if found else None
    return wait_until(running, timeout=10, what="the agent's task container")


def _remove_stack(client: Any, stack: str) -> None:
    """`docker stack rm`, then wait for its task containers to be gone (the removal itself is asynchronous)."""
    # (a stack that was never deployed: "Nothing found in stack", and nothing to wait for)
    subprocess.run(["docker", "stack", "rm", stack], capture_output=True, text=True, timeout=60)
    label = {"label": f"com.docker.stack.namespace={stack}"}
    wait_until(lambda: not client.containers.list(all=True, filters=label), timeout=40,
               what=f"the stack {stack}'s containers to go")
