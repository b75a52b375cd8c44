"""The HTTP API and /metrics of a real daemon, on loopback."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import DaemonProcess, Workspace

LOUD = """\
import sys
for n in range(20000):
    print(f"line {n}")
print("to stderr", file=sys.stderr)
"""


def wait_for(predicate: Any, timeout: float = 30.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def metrics(daemon: DaemonProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = daemon.get("/metrics")
    assert response.status_code == 200 and response.headers["Content-Type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


@pytest.fixture
def busy(workspace: Workspace, daemon: DaemonProcess) -> DaemonProcess:
    """A daemon that has run two jobs that succeeded, one that failed, and one with 20,000 lines of output."""
    (workspace.programs / "loud.py").write_text(LOUD)
    daemon.start()
    workspace.drop("ok1.yaml", {"program": "echo", "args": ["one"]})
    workspace.drop("ok2.yaml", {"program": "echo", "args": ["two"]})
    workspace.drop("bad.yaml", {"program": "fail"})
    workspace.drop("loud.yaml", {"program": "loud"})
    workspace.wait_results(4)
    return daemon


def test_summary_counts_and_workers(busy: DaemonProcess) -> None:
    summary = busy.get("/api/summary").json()
    assert summary["counts"]["succeeded"] == 3 and summary["counts"]["failed"] == 1
    assert summary["queue_depth"] == 0 and summary["running"] == []
    assert sorted(w["name"] for w in summary["workers"]) == ["w1", "w2"]
    assert summary["daemon"]["pid"] == str(busy.proc.pid if busy.proc else None)
    assert summary["watcher"]["kind"] == "inotify" and summary["watcher"]["rescans"] >= 1
    assert busy.get("/api/workers").json()["workers"] == summary["workers"]


def test_jobs_filter_by_status_and_page(busy: DaemonProcess) -> None:
    failed = busy.get("/api/jobs", params={"status": "failed"}).json()
    assert [j["id"] for j in failed["jobs"]] == ["bad"] and failed["total"] == 1
    assert failed["jobs"][0]["exit_code"] == 3 and "code 3" in failed["jobs"][0]["error"]
    every = busy.get("/api/jobs").json()
    assert every["total"] == 4
    assert [j["id"] for j in every["jobs"]] == ["loud", "bad", "ok2", "ok1"]  # newest first
    second = busy.get("/api/jobs", params={"limit": 2, "offset": 2}).json()
    assert [j["id"] for j in second["jobs"]] == ["ok2", "ok1"] and second["total"] == 4
    both = busy.get("/api/jobs", params={"status": "failed,succeeded", "limit": 500}).json()
    assert both["total"] == 4


def test_one_job_has_its_result_and_the_head_and_tail_of_its_output(busy: DaemonProcess) -> None:
    job = busy.get("/api/jobs/loud", params={"bytes": 100}).json()
    assert job["status"] == "succeeded" and job["result"]["exit_code"] == 0
    out = job["stdout"]
    expected = "".join(f"line {n}\n" for n in range(20000))
    assert out["size"] == len(expected)
    assert out["head"] == expected[:100] and out["tail"] == expected[-100:]
    assert out["omitted"] == len(expected) - 200
    assert job["stderr"]["head"] == "to stderr\n" and job["stderr"]["omitted"] == 0


def test_bad_requests_are_clear_json_errors(busy: DaemonProcess) -> None:
    missing = busy.get("/api/jobs/nope")
    assert missing.status_code == 404 and missing.json() == {"error": "no job with id 'nope'"}
    bogus = busy.get("/api/jobs", params={"status": "bogus"})
    assert bogus.status_code == 400 and "unknown status 'bogus'" in bogus.json()["error"]
    big = busy.get("/api/jobs", params={"limit": 10**6})
    assert big.status_code == 400 and "limit must be between" in big.json()["error"]


def test_a_foreign_host_name_is_refused(busy: DaemonProcess) -> None:
    # a page elsewhere reaching 127.0.0.1 through DNS rebinding sends its own name as Host
    refused = busy.get("/api/summary", headers={"Host": "attacker.example:8787"})
    assert refused.status_code == 403
    assert busy.get("/api/summary", headers={"Host": "localhost"}).status_code == 200


def test_a_running_job_shows_its_elapsed_time_and_output_so_far(workspace: Workspace, daemon: DaemonProcess) -> None:
    daemon.start()
    workspace.drop("tick.yaml", {"program": "ticker", "args": ["40", "0.1"]})
    def third_line() -> Any:
        job = daemon.get("/api/jobs/tick").json()  # a 404 until the manifest is claimed
        return job.get("status") == "running" and "tick 3 " in job["stdout"]["head"] and job

    job = wait_for(third_line, what="the ticker's third line")
    assert job["elapsed_seconds"] > 0.1 and job["result"] is None
    assert daemon.get("/api/summary").json()["running"][0]["id"] == "tick"
    workspace.wait_results(1)
    done = daemon.get("/api/jobs/tick").json()
    assert done["status"] == "succeeded" and "tick 40 of 40" in done["stdout"]["head"]


def test_metrics_count_jobs_time_them_and_show_the_queue(busy: DaemonProcess, workspace: Workspace) -> None:
    m = metrics(busy)
    assert m[("dropq_jobs_total", (("status", "succeeded"),))] == 3
    assert m[("dropq_jobs_total", (("status", "failed"),))] == 1
    assert m[("dropq_jobs_total", (("status", "rejected"),))] == 0
    assert m[("dropq_job_run_seconds_count", ())] == 4
    assert m[("dropq_job_wait_seconds_count", ())] == 4
    assert m[("dropq_queue_depth", ())] == 0
    assert m[("dropq_workers", (("state", "idle"),))] + m[("dropq_workers", (("state", "busy"),))] == 2
    assert m[("dropq_watcher_rescans_total", ())] >= 1
    assert ("dropq_watcher_missed_total", ()) in m

    # a queue: one worker kept busy, three jobs behind it
    workspace.drop("hold1.yaml", {"program": "sleep", "args": ["3"]})
    workspace.drop("hold2.yaml", {"program": "sleep", "args": ["3"]})
    for n in range(3):
        workspace.drop(f"later{n}.yaml", {"program": "echo", "priority": -1})
    m = wait_for(lambda: (x := metrics(busy))[("dropq_queue_depth", ())] == 3 and x, what="three queued")
    assert m[("dropq_workers", (("state", "busy"),))] == 2
    assert m[("dropq_jobs_active", (("status", "running"),))] == 2


def test_throughput_has_this_minutes_jobs(busy: DaemonProcess) -> None:
    minutes = busy.get("/api/throughput", params={"minutes": 5}).json()["minutes"]
    assert len(minutes) == 5
    assert sum(m.get("succeeded", 0) for m in minutes) == 3
    assert sum(m.get("failed", 0) for m in minutes) == 1


def test_the_dashboard_page_is_served(busy: DaemonProcess) -> None:
    page = busy.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["Content-Type"]
    assert 'id="queue-depth"' in page.text and "/api/summary" in page.text


def test_a_port_in_use_stops_the_daemon_with_a_clear_message(workspace: Workspace) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        workspace.configure(http={"port": port})
        done = subprocess.run([sys.executable, "-m", "dropq", "--config", str(workspace.config), "run"],
                              capture_output=True, text=True, timeout=60)
    assert done.returncode == 3
    assert done.stderr.strip().splitlines()[-1].startswith(
        f"dropq: cannot serve the dashboard on 127.0.0.1:{port}: Address already in use")


def test_http_can_be_turned_off(workspace: Workspace, daemon: DaemonProcess) -> None:
    workspace.configure(http={"enabled": False})
    daemon.start()
    with pytest.raises(AssertionError, match="no dashboard address"):
        _ = daemon.url


def test_stalled_clients_hold_up_neither_the_api_nor_the_daemon_s_stop(daemon: DaemonProcess) -> None:
    daemon.start()
    address = daemon.url.removeprefix("http://").rstrip("/")
    host, _, port = address.rpartition(":")
    stalled = [socket.create_connection((host, int(port)), timeout=10) for _ in range(8)]
    try:
        for conn in stalled:  # half a request each, never the blank line that ends it
            conn.sendall(b"GET /api/summary HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        assert daemon.get("/api/summary").status_code == 200
        assert daemon.stop() == 0
        for conn in stalled:
            assert conn.recv(1024) == b""  # cut by the daemon as it stopped, not left to time out
    finally:
        for conn in stalled:
            conn.close()
    assert "still running after" not in daemon.log_text()
