"""The docker pool on a real Docker engine: every job in a hardened container.

These skip without an engine, and fail instead when DROPQ_REQUIRE_DOCKER=1 (as in CI).
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from conftest import DaemonProcess, Workspace
from dropq.pools.docker import WORKER_CAPS
from helpers import containers_of, dropq_json, engine

pytestmark = pytest.mark.docker

PROBE = '''
import json, os, socket
facts = {"uid": os.getuid(), "gid": os.getgid()}
try:
    open("/probe-written-to-root", "w").close()
    facts["root_writable"] = True
except OSError:
    facts["root_writable"] = False
facts["interfaces"] = sorted(name for _, name in socket.if_nameindex())
facts["mounts"] = []
for line in open("/proc/self/mountinfo"):
    fields = line.split()
    facts["mounts"].append({"root": fields[3], "point": fields[4], "options": fields[5]})
facts["cwd"] = os.getcwd()
print(json.dumps(facts))
'''

BALLOON = '''
chunks = []
while True:
    chunks.append(bytearray(16 * 1024 * 1024))
'''


@pytest.fixture
def docker_ws(workspace: Workspace, docker_image: str) -> Workspace:
    (workspace.programs / "probe.py").write_text(PROBE)
    (workspace.programs / "balloon.py").write_text(BALLOON)
    workspace.configure(workers={"pool": "docker", "count": 2,
                                 "docker": {"image": docker_image, "memory": "128m", "pids_limit": 64}})
    return workspace


def busy_worker(ws: Workspace, job_id: str, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for w in dropq_json(ws.config, "status")["workers"]:
            if w["job"] == job_id and w["state"] == "busy":
                return str(w["name"])
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never started")


def test_jobs_run_and_commit_through_containers(docker_ws: Workspace, daemon: DaemonProcess) -> None:
    daemon.start()
    assert "worker pool: docker" in daemon.log_text()
    docker_ws.put("moby.txt", "the whale the sea the end\n")
    docker_ws.drop("moby.yaml", {"program": "wordcount", "input": "moby.txt"})
    docker_ws.drop("parts.yaml", {"program": "makefiles", "args": ["2"]})
    docker_ws.drop("bad.yaml", {"program": "fail"})
    results = docker_ws.wait_results(3)
    assert results["moby"]["status"] == "succeeded"
    assert (docker_ws.outbox / "moby" / "stdout.txt").read_text().startswith("3 the\n")
    assert (docker_ws.outbox / "parts" / "output" / "summary" / "index.txt").exists()
    assert (results["bad"]["status"], results["bad"]["exit_code"]) == ("failed", 3)
    assert set(containers_of(docker_ws.state)) == {"w1", "w2"}


def test_docker_inspect_shows_the_hardening(docker_ws: Workspace, daemon: DaemonProcess) -> None:
    daemon.start()
    for container in containers_of(docker_ws.state).values():
        host: dict[str, Any] = container.attrs["HostConfig"]
        assert host["ReadonlyRootfs"] is True
        # the worker starts jobs under uids of their own: these few capabilities and no other (SECURITY.md);
        # the jobs themselves have none (tests/security/test_isolation.py)
        assert host["CapDrop"] == ["ALL"]
        assert sorted(c.removeprefix("CAP_") for c in host["CapAdd"]) == sorted(WORKER_CAPS)
        assert "no-new-privileges" in host["SecurityOpt"]
        assert host["NetworkMode"] == "none"
        assert host["PidsLimit"] == 64
        assert host["Memory"] == 128 * 1024 * 1024 and host["MemorySwap"] == host["Memory"]
        assert host["NanoCpus"] == 1_000_000_000
        assert host["Privileged"] is False
        assert "/tmp" in host["Tmpfs"]
        # root in the container (with the capabilities above only): jobs run under other uids
        assert container.attrs["Config"]["User"] == "0:0"
        mounts = {m["Destination"]: m for m in container.attrs["Mounts"]}
        assert set(mounts) == {"/dropq/programs", "/dropq/inputs", "/dropq/envs", "/dropq/work"}
        assert [mounts[f"/dropq/{m}"]["RW"] for m in ("programs", "inputs", "envs", "work")] == [
            False, False, False, True]
        assert mounts["/dropq/programs"]["Source"] == str(docker_ws.programs)
        assert mounts["/dropq/envs"]["Source"] == str(docker_ws.state / "envs")
        for m in mounts.values():
            assert m["Source"] not in ("/", str(docker_ws.root)), "never the host's / nor the whole workspace"


def test_inside_a_job_the_sandbox_holds(docker_ws: Workspace, daemon: DaemonProcess) -> None:
    daemon.start()
    docker_ws.drop("probe.yaml", {"program": "probe"})
    assert docker_ws.wait_results(1)["probe"]["status"] == "succeeded"
    facts = json.loads((docker_ws.outbox / "probe" / "stdout.txt").read_text())
    assert facts["uid"] != 0 and facts["gid"] != 0
    assert facts["root_writable"] is False
    assert facts["interfaces"] == ["lo"], "no network interface but loopback"
    binds = {m["point"]: m for m in facts["mounts"] if m["point"].startswith("/dropq")}
    assert set(binds) == {"/dropq/programs", "/dropq/inputs", "/dropq/envs", "/dropq/work"}
    assert binds["/dropq/programs"]["options"].startswith("ro")
    assert binds["/dropq/inputs"]["options"].startswith("ro")
    assert binds["/dropq/envs"]["options"].startswith("ro")
    assert binds["/dropq/work"]["options"].startswith("rw")
    # everything else is the container's own: its root, the kernel's pseudo-filesystems, its /tmp,
    # and the three files Docker writes for every container
    others = {m["point"] for m in facts["mounts"]} - set(binds)
    allowed = ("/", "/proc", "/dev", "/sys", "/tmp", "/etc/hosts", "/etc/hostname", "/etc/resolv.conf")
    assert all(p in allowed or p.startswith(("/proc/", "/dev/", "/sys/")) for p in others), others
    assert facts["cwd"].startswith("/dropq/work/jobs/")


def test_a_job_that_eats_all_memory_fails_saying_so(docker_ws: Workspace, daemon: DaemonProcess) -> None:
    daemon.start()
    docker_ws.drop("balloon.yaml", {"program": "balloon", "timeout": 60})
    docker_ws.drop("after.yaml", {"program": "echo", "args": ["still fine"]})
    results = docker_ws.wait_results(2, timeout=90)
    assert results["balloon"]["status"] == "failed"
    assert "ran out of memory" in results["balloon"]["error"]
    assert "128 MiB" in results["balloon"]["error"]
    assert results["after"]["status"] == "succeeded", "other jobs keep running"


def test_docker_kill_of_a_busy_worker_replaces_it_and_retries_the_job(docker_ws: Workspace,
                                                                      daemon: DaemonProcess) -> None:
    daemon.start()
    docker_ws.drop("victim.yaml", {"program": "sleep", "args": ["2"]})
    name = busy_worker(docker_ws, "victim")
    old = containers_of(docker_ws.state)[name]
    old.kill()
    result = docker_ws.wait_results(1, timeout=60)["victim"]
    assert result["status"] == "succeeded"
    assert result["attempts"] == 2
    assert "died" in daemon.log_text()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and containers_of(docker_ws.state).get(name, old).id == old.id:
        time.sleep(0.1)
    assert containers_of(docker_ws.state)[name].id != old.id, "the dead container was replaced"


def test_a_daemon_restart_adopts_running_containers_without_losing_or_repeating_a_job(
        docker_ws: Workspace, daemon: DaemonProcess) -> None:
    daemon.start()
    before = {n: c.id for n, c in containers_of(docker_ws.state).items()}
    docker_ws.drop("long.yaml", {"program": "sleep", "args": ["3"]})
    busy_worker(docker_ws, "long")
    assert daemon.stop() == 0
    assert not (docker_ws.outbox / "long").exists()
    assert {n: c.id for n, c in containers_of(docker_ws.state).items()} == before, "containers were left running"
    daemon.start()
    result = docker_ws.wait_results(1, timeout=60)["long"]
    assert result["status"] == "succeeded"
    assert result["attempts"] == 1, "collected, not re-run"
    assert (docker_ws.outbox / "long" / "stdout.txt").read_text() == "slept 3 seconds\n"
    assert daemon.log_text().count("adopted running container") == 2
    assert {n: c.id for n, c in containers_of(docker_ws.state).items()} == before


def test_a_rebuild_removes_the_image_it_replaced(docker_image: str) -> None:
    import io
    import tarfile

    import docker

    from dropq.pools.image import build

    client = engine()
    assert client is not None
    tag = "dropq-test-rebuild:latest"
    # an out-of-date image under the tag: any image without the current worker source's label
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w") as archive:
        archive.addfile(tarfile.TarInfo("stale.txt"), io.BytesIO(b""))
    client.api.import_image_from_data(tar.getvalue(), repository="dropq-test-rebuild", tag="latest")
    old = client.images.get(tag)
    try:
        said = build(tag, from_debian=True)
        assert "removed the image it replaced" in said, said
        with pytest.raises(docker.errors.ImageNotFound):
            client.images.get(old.id)
    finally:
        client.images.remove(tag)  # only the tag: the image is the worker image, tagged again
        client.close()
