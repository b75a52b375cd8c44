"""`dropq jobs` through the real entry point, against a real daemon running a mix of jobs."""

from __future__ import annotations

import time
from typing import Any

import pytest

from conftest import DaemonProcess, Workspace
from dropq.config import Config
from dropq.queue.jobs import JobStatus
from dropq.queue.store import Store
from helpers import dropq, dropq_json

DAY = 86400.0


def seed_a_job_from_yesterday(workspace: Workspace) -> None:
    """A state directory whose history holds a job claimed (and rejected) a day ago."""
    yesterday = time.time() - DAY
    store = Store(Config.load(workspace.config).database, now=lambda: yesterday)
    try:
        store.add("yesterday", source="yesterday.yaml")
        store.transition("yesterday", JobStatus.COMMITTING, outcome={"status": "rejected"})
        store.transition("yesterday", JobStatus.REJECTED, error="the manifest is not valid YAML",
                         finished_at=yesterday)
    finally:
        store.close()


def listed(workspace: Workspace, *args: str) -> list[dict[str, Any]]:
    jobs: list[dict[str, Any]] = dropq_json(workspace.config, "jobs", *args)
    return jobs


def wait_for(workspace: Workspace, wanted: dict[str, str], timeout: float = 60.0) -> list[dict[str, Any]]:
    """`dropq jobs --json` once every job in `wanted` is in the state it names."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = listed(workspace)
        states = {j["id"]: j["status"] for j in jobs}
        if all(states.get(job_id) == status for job_id, status in wanted.items()):
            return jobs
        time.sleep(0.1)
    raise AssertionError(f"never reached {wanted}: {states}")


def test_jobs_lists_a_mix_newest_first_and_filters_it(workspace: Workspace, daemon: DaemonProcess) -> None:
    seed_a_job_from_yesterday(workspace)
    daemon.start()
    workspace.drop("ok.yaml", {"program": "echo", "args": ["hi"]})
    workspace.drop("broken.yaml", {"program": "fail"})
    workspace.drop("nope.yaml", {"program": "no_such_program"})
    wait_for(workspace, {"ok": "succeeded", "broken": "failed", "nope": "rejected"})
    # two naps hold both workers, the third waits in the queue
    for name in ("nap1", "nap2", "nap3"):
        workspace.drop(f"{name}.yaml", {"program": "sleep", "args": ["60"]})
        wait_for(workspace, {name: "queued"} if name == "nap3" else {name: "running"})

    jobs = listed(workspace)
    assert {j["id"]: j["status"] for j in jobs} == {
        "ok": "succeeded", "broken": "failed", "nope": "rejected", "nap1": "running", "nap2": "running",
        "nap3": "queued", "yesterday": "rejected"}
    submitted = [j["submitted_at"] for j in jobs]
    assert submitted == sorted(submitted, reverse=True), "newest first"
    assert [j["id"] for j in jobs][0] == "nap3" and jobs[-1]["id"] == "yesterday"
    by_id = {j["id"]: j for j in jobs}
    assert by_id["broken"]["program"] == "fail.py" and by_id["yesterday"]["program"] is None
    assert by_id["broken"]["error"].startswith("the program exited with code 3")
    assert by_id["nap1"]["seconds"] > 0 and by_id["nap3"]["seconds"] is None

    assert {j["id"] for j in listed(workspace, "--status", "failed,rejected")} == {"broken", "nope", "yesterday"}
    assert {j["id"] for j in listed(workspace, "--status", "running", "--status", "queued")} == {
        "nap1", "nap2", "nap3"}
    assert "yesterday" not in {j["id"] for j in listed(workspace, "--since", "1h")}
    assert "yesterday" in {j["id"] for j in listed(workspace, "--since", "2d")}
    assert [j["id"] for j in listed(workspace, "--status", "rejected", "--since", "15m")] == ["nope"]
    assert [j["id"] for j in listed(workspace, "--limit", "2")] == [j["id"] for j in jobs[:2]]


def test_jobs_as_a_table(workspace: Workspace, daemon: DaemonProcess) -> None:
    seed_a_job_from_yesterday(workspace)
    daemon.start()
    workspace.drop("broken.yaml", {"program": "fail"})
    wait_for(workspace, {"broken": "failed"})
    workspace.drop("ok.yaml", {"program": "echo", "args": ["hi"]})
    wait_for(workspace, {"ok": "succeeded"})

    done = dropq(workspace.config, "jobs")
    assert done.returncode == 0, done.stderr
    head, *rows = done.stdout.splitlines()
    assert head.split() == ["ID", "STATUS", "PROGRAM", "SUBMITTED", "DURATION", "ERROR"]
    assert [row.split()[:3] for row in rows] == [
        ["ok", "succeeded", "echo.py"], ["broken", "failed", "fail.py"], ["yesterday", "rejected", "-"]]
    assert "the program exited with code 3" in rows[1]
    assert time.strftime("%Y-%m-%d", time.localtime(time.time() - DAY)) in rows[2]

    limited = dropq(workspace.config, "jobs", "--limit", "1")
    assert [row.split()[0] for row in limited.stdout.splitlines()] == ["ID", "ok"]
    assert limited.stderr == "(the newest 1 of 3; --limit shows more)\n"
    none = dropq(workspace.config, "jobs", "--status", "cancelled")
    assert (none.returncode, none.stdout) == (0, "no jobs match\n")


@pytest.mark.parametrize(("args", "start"), [
    (["--since", "yesterday"], "dropq: --since takes a number and a unit"),
    (["--since", "2w"], "dropq: --since takes a number and a unit"),
    (["--since=-1h"], "dropq: --since takes a number and a unit"),
    (["--limit", "0"], "dropq: --limit takes a whole number"),
    (["--limit", "many"], "dropq: --limit takes a whole number"),
    (["--status", "done"], "dropq: --status takes job states separated by commas"),
    (["--status", ","], "dropq: --status takes job states separated by commas"),
])
def test_a_bad_filter_is_one_line_and_exit_2(workspace: Workspace, args: list[str], start: str) -> None:
    done = dropq(workspace.config, "jobs", *args)
    assert done.returncode == 2
    assert done.stderr.startswith(start) and done.stderr.count("\n") == 1, done.stderr
