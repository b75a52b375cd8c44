"""Per-job resources on a real daemon: a manifest's `memory:` and `cpus:`, the config's maxima, and the
balancer's workers.capacity; on the local pool, and on a real Docker engine (those skip without one, and fail
instead when DROPQ_REQUIRE_DOCKER=1)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import pytest
import yaml

from conftest import DaemonProcess, Workspace
from helpers import containers_of, dropq, wait_for_status, wait_until

#: allocates argv[1] MiB and writes every page of it (b"x" * n fills the memory; a zeroed buffer would not)
ALLOC = '''
import sys
data = b"x" * (int(sys.argv[1]) * 1024 * 1024)
print(len(data) // (1024 * 1024), "MiB")
'''

HOLD = '''
import sys, time
time.sleep(float(sys.argv[1]))
'''

MIB = 1024 * 1024


@pytest.fixture
def res_ws(workspace: Workspace) -> Workspace:
    (workspace.programs / "alloc.py").write_text(ALLOC)
    (workspace.programs / "hold.py").write_text(HOLD)
    return workspace


def _interval(result: dict[str, Any]) -> tuple[datetime, datetime]:
    return datetime.fromisoformat(result["started_at"]), datetime.fromisoformat(result["finished_at"])


def _never_overlap(ws: Workspace, daemon: DaemonProcess, request: dict[str, Any]) -> None:
    daemon.start()
    for name in ("first", "second"):
        ws.drop(f"{name}.yaml", {"program": "hold", "args": ["1.5"], **request})
    results = ws.wait_results(2, timeout=90)
    assert {r["status"] for r in results.values()} == {"succeeded"}, results
    (a_start, a_end), (b_start, b_end) = sorted(_interval(r) for r in results.values())
    assert a_end <= b_start, f"the jobs overlapped: {a_start}..{a_end} and {b_start}..{b_end}"


# --- the local pool ----------------------------------------------------------------------------------


def test_local_memory_limit_makes_an_allocation_fail(res_ws: Workspace, daemon: DaemonProcess) -> None:
    res_ws.configure(workers={"count": 1})
    daemon.start()
    res_ws.drop("tight.yaml", {"program": "alloc", "args": ["256"], "memory": "64m"})
    tight = res_ws.wait_results(1)["tight"]
    assert tight["status"] == "failed"
    assert "MemoryError" in (res_ws.outbox / "tight" / "stderr.txt").read_text()
    # the limit was the job's, not its worker's: the next job on the same worker has room
    res_ws.drop("roomy.yaml", {"program": "alloc", "args": ["256"], "memory": "1g"})
    res_ws.drop("plain.yaml", {"program": "alloc", "args": ["256"]})
    results = res_ws.wait_results(3)
    assert (results["roomy"]["status"], results["plain"]["status"]) == ("succeeded", "succeeded")
    assert (results["roomy"]["worker"], results["plain"]["worker"]) == (tight["worker"],) * 2


def test_a_request_above_the_configured_maximum_is_rejected_naming_the_key(
        res_ws: Workspace, daemon: DaemonProcess) -> None:
    res_ws.configure(jobs={"max_memory": "256m", "max_cpus": 1})
    daemon.start()
    res_ws.drop("greedy.yaml", {"program": "hold", "args": ["0"], "memory": "1g"})
    res_ws.drop("busy.yaml", {"program": "hold", "args": ["0"], "cpus": 1.5})
    res_ws.drop("modest.yaml", {"program": "hold", "args": ["0"], "memory": "256m", "cpus": 1})
    results = res_ws.wait_results(3)
    assert results["greedy"]["status"] == "rejected"
    assert "jobs.max_memory" in results["greedy"]["error"] and "1 GiB" in results["greedy"]["error"]
    assert results["busy"]["status"] == "rejected"
    assert "jobs.max_cpus" in results["busy"]["error"]
    assert results["modest"]["status"] == "succeeded"


def test_a_job_that_could_never_fit_is_rejected_at_claim(res_ws: Workspace, daemon: DaemonProcess) -> None:
    res_ws.configure(workers={"capacity": {"memory": "1g", "cpus": 2}})
    daemon.start()
    res_ws.drop("huge.yaml", {"program": "hold", "args": ["0"], "memory": "2g"})
    result = res_ws.wait_results(1)["huge"]
    assert result["status"] == "rejected"
    assert "workers.capacity.memory" in result["error"] and "never run" in result["error"]


def test_a_queued_job_that_no_longer_fits_after_a_restart_fails_saying_why(
        res_ws: Workspace, daemon: DaemonProcess) -> None:
    res_ws.configure(workers={"count": 1, "capacity": {"memory": "4g"}})
    daemon.start()
    res_ws.drop("long.yaml", {"program": "hold", "args": ["3"]})
    wait_for_status(res_ws.config, "long", "running")
    res_ws.drop("big.yaml", {"program": "hold", "args": ["0"], "memory": "3g"})
    wait_for_status(res_ws.config, "big", "queued")
    assert daemon.stop() == 0
    res_ws.configure(workers={"capacity": {"memory": "2g"}})
    daemon.start()
    wait_for_status(res_ws.config, "big", "failed")
    assert "workers.capacity.memory" in res_ws.wait_results(1)["big"]["error"]
    assert res_ws.wait_results(2)["long"]["status"] == "succeeded"  # the queue behind it was not stopped


def test_local_jobs_asking_three_quarters_of_the_capacity_never_overlap(
        res_ws: Workspace, daemon: DaemonProcess) -> None:
    res_ws.configure(workers={"count": 2, "capacity": {"memory": "4g", "cpus": 2}})
    _never_overlap(res_ws, daemon, {"cpus": 1.5})
    said = "the local pool does not enforce a job's `cpus:`; it only counts against workers.capacity"
    assert daemon.log_text().count(said) == 1, "said once, not per job"


def test_submit_takes_memory_and_cpus(res_ws: Workspace, daemon: DaemonProcess) -> None:
    res_ws.configure(workers={"count": 1})
    daemon.start()
    done = dropq(res_ws.config, "submit", "alloc", "--name", "sized", "--memory", "64m", "--cpus", "0.5",
                 "--wait", "--", "256")
    assert done.returncode == 1, done.stderr  # the job failed: its 64m did not hold 256 MiB
    manifest = yaml.safe_load((res_ws.outbox / "sized" / "manifest.yaml").read_text())
    assert (manifest["memory"], manifest["cpus"]) == ("64m", 0.5)
    assert "MemoryError" in (res_ws.outbox / "sized" / "stderr.txt").read_text()


def test_submit_refuses_a_size_it_cannot_read(res_ws: Workspace) -> None:
    done = dropq(res_ws.config, "submit", "alloc", "--memory", "lots")
    assert done.returncode == 2
    assert "--memory" in done.stderr and "512m" in done.stderr
    assert not [p for p in res_ws.inbox.iterdir() if not p.name.startswith(".")]


# --- the docker pool -----------------------------------------------------------------------------------


@pytest.fixture
def docker_res(res_ws: Workspace, docker_image: str) -> Workspace:
    res_ws.configure(workers={"pool": "docker", "count": 1,
                              "docker": {"image": docker_image, "memory": "128m", "pids_limit": 64}})
    return res_ws


@pytest.mark.docker
def test_docker_job_memory_is_applied_to_the_warm_worker_and_restored(
        docker_res: Workspace, daemon: DaemonProcess) -> None:
    daemon.start()
    before = containers_of(docker_res.state)["w1"]
    docker_res.drop("tight.yaml", {"program": "alloc", "args": ["128"], "memory": "64m", "timeout": 60})
    tight = docker_res.wait_results(1, timeout=90)["tight"]
    assert tight["status"] == "failed"
    assert "out of memory" in tight["error"] and "64 MiB" in tight["error"], tight["error"]
    # more than the container's standing 128m: only the job's own limit lets it through
    docker_res.drop("roomy.yaml", {"program": "alloc", "args": ["256"], "memory": "512m", "timeout": 60})
    roomy = docker_res.wait_results(2, timeout=90)["roomy"]
    assert roomy["status"] == "succeeded", roomy
    assert (docker_res.outbox / "roomy" / "stdout.txt").read_text().strip() == "256 MiB"
    after = containers_of(docker_res.state)["w1"]
    assert after.id == before.id, "the limits are changed in place: no container is started per job"

    def standing() -> bool:
        after.reload()
        return bool(after.attrs["HostConfig"]["Memory"] == 128 * MIB)

    wait_until(standing, timeout=10, what="the container's standing memory limit to be back")
    assert after.attrs["HostConfig"]["NanoCpus"] == 1_000_000_000


@pytest.mark.docker
def test_docker_jobs_asking_three_quarters_of_the_capacity_never_overlap(
        docker_res: Workspace, daemon: DaemonProcess) -> None:
    docker_res.configure(workers={"count": 2, "capacity": {"memory": "1g", "cpus": 2}})
    _never_overlap(docker_res, daemon, {"memory": "768m", "cpus": 1.5})


@pytest.mark.docker
def test_a_job_left_running_across_a_restart_still_holds_its_room(
        docker_res: Workspace, daemon: DaemonProcess) -> None:
    docker_res.configure(workers={"count": 2, "capacity": {"memory": "1g", "cpus": 2},
                                  "docker": {"on_shutdown": "leave"}})
    daemon.start()
    docker_res.drop("long.yaml", {"program": "hold", "args": ["6"], "memory": "768m"})
    wait_for_status(docker_res.config, "long", "running", timeout=60)
    assert daemon.stop() == 0  # its container, and the job in it, go on running
    daemon.start()  # re-attaches to it; its room is taken before any slot picks a job
    docker_res.drop("next.yaml", {"program": "hold", "args": ["0.5"], "memory": "768m"})
    results = docker_res.wait_results(2, timeout=90)
    assert {r["status"] for r in results.values()} == {"succeeded"}, results
    assert _interval(results["long"])[1] <= _interval(results["next"])[0], "the second job started beside the first"
