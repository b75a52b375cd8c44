"""The worker app through Flask's test client, with the real runner running real subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from dropq_worker import __version__, procs
from dropq_worker.app import create_app
from dropq_worker.capture import CappedFile
from dropq_worker.job import Settings
from dropq_worker.protocol import PROTOCOL, JobSpec
from dropq_worker.runner import Runner
from dropq_worker.supervise import reap_abandoned
from helpers import wait_until

PROGRAMS = {
    "hello.py": "print('hello', flush=True)\n",
    "env.py": "import os\nprint(os.environ['DROPQ_JOB_ID'], os.environ.get('GREETING'), os.getcwd())\n",
    "cat.py": "import sys\nprint(open(sys.argv[1]).read(), end='')\n",
    "sleep.py": "import sys, time\ntime.sleep(float(sys.argv[1]))\n",
    "flood.py": "import sys\nsys.stdout.write('A' * 50000 + 'THE END')\n",
    "orphan.py": ("import os, subprocess, sys\n"
                  "p = subprocess.Popen([sys.executable, '-c', 'import os,time; os.setsid(); time.sleep(60)'])\n"
                  "print(p.pid, flush=True)\n"),
}


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    programs = tmp_path / "programs"
    programs.mkdir()
    for name, text in PROGRAMS.items():
        (programs / name).write_text(text)
    (tmp_path / "inputs" / "j9").mkdir(parents=True)
    (tmp_path / "inputs" / "j9" / "data.txt").write_text("input data\n")
    (tmp_path / "secret.txt").write_text("secret\n")
    import sys

    return Settings(programs=programs, inputs=tmp_path / "inputs", jobs=tmp_path / "jobs", python=sys.executable)


@pytest.fixture
def client(settings: Settings) -> Iterator[FlaskClient]:
    runner = Runner(settings)
    app = create_app(runner=runner, name="test")
    client = app.test_client()
    client.environ_base["HTTP_DROPQ_PROTOCOL"] = str(PROTOCOL)  # as the daemon's transport sends it
    yield client
    runner.shutdown()


def run(client: FlaskClient, spec: dict[str, Any], wait: float = 20) -> dict[str, Any]:
    resp = client.post("/jobs", json=spec)
    assert resp.status_code == 202, resp.get_json()
    resp = client.get(f"/jobs/{spec['key']}?wait={wait}")
    assert resp.status_code == 200
    body = resp.get_json()
    assert body["state"] == "done", body
    return body


def test_health(client: FlaskClient) -> None:
    body = client.get("/health").get_json()
    assert body == {"pid": os.getpid(), "protocol": PROTOCOL, "name": "test", "version": __version__, "job": None}


def test_a_job_runs_and_its_stdout_is_captured(client: FlaskClient, settings: Settings) -> None:
    body = run(client, {"key": "j1", "job_id": "j1", "program": "hello.py"})
    assert (body["outcome"], body["exit_code"]) == ("exited", 0)
    assert (settings.jobs / "j1.stdout").read_text() == "hello\n"


def test_the_job_gets_its_env_and_cwd(client: FlaskClient, settings: Settings) -> None:
    # $DROPQ_JOB_ID is the job's id (its outbox folder), not the attempt's key that names its files
    run(client, {"key": "j2-1", "job_id": "report-7", "program": "env.py", "env": {"GREETING": "hi"}})
    job_id, greeting, cwd = (settings.jobs / "j2-1.stdout").read_text().split()
    assert (job_id, greeting, cwd) == ("report-7", "hi", str(settings.jobs / "j2-1"))


def test_inputs_are_resolved_under_the_inputs_folder(client: FlaskClient, settings: Settings) -> None:
    run(client, {"key": "j9", "job_id": "j9", "program": "cat.py", "inputs": ["j9/data.txt"]})
    assert (settings.jobs / "j9.stdout").read_text() == "input data\n"


@pytest.mark.parametrize("spec", [
    {"key": "x1", "job_id": "x1", "program": "../secret.txt"},
    {"key": "x2", "job_id": "x2", "program": "/etc/passwd"},
    {"key": "x3", "job_id": "x3", "program": "cat.py", "inputs": ["../secret.txt"]},
    {"key": "x4", "job_id": "x4", "program": "cat.py", "inputs": ["/etc/passwd"]},
    {"key": "../x5", "job_id": "../x5", "program": "hello.py"},
    {"key": "x6", "job_id": "x6", "program": "missing.py"},
    {"program": "hello.py"},
])
def test_paths_are_rechecked_and_bad_specs_refused(client: FlaskClient, spec: dict[str, Any]) -> None:
    resp = client.post("/jobs", json=spec)
    assert resp.status_code == 400
    assert resp.get_json()["error"]


def test_a_symlinked_input_leading_outside_is_refused(client: FlaskClient, settings: Settings) -> None:
    os.symlink(settings.inputs.parent / "secret.txt", settings.inputs / "j9" / "link.txt")
    resp = client.post("/jobs", json={"key": "j10", "job_id": "j10", "program": "cat.py", "inputs": ["j9/link.txt"]})
    assert resp.status_code == 400
    assert "outside" in resp.get_json()["error"]


def test_one_job_at_a_time_and_posting_the_same_job_again_is_idempotent(client: FlaskClient) -> None:
    long = {"key": "long", "job_id": "long", "program": "sleep.py", "args": ["5"]}
    assert client.post("/jobs", json=long).status_code == 202
    assert client.post("/jobs", json=long).status_code == 202
    assert client.post("/jobs", json={"key": "other", "job_id": "other", "program": "hello.py"}).status_code == 409
    assert client.get("/health").get_json()["job"] == "long"
    assert client.delete("/jobs/long").status_code == 202
    body = client.get("/jobs/long?wait=10").get_json()
    assert (body["state"], body["outcome"]) == ("done", "cancelled")


def test_a_timeout_kills_the_group(client: FlaskClient) -> None:
    start = time.monotonic()
    body = run(client, {"key": "t", "job_id": "t", "program": "sleep.py", "args": ["30"], "timeout": 0.3,
                        "kill_grace": 0.5})
    assert body["outcome"] == "timed_out"
    assert time.monotonic() - start < 5


def test_flooding_output_keeps_head_and_tail(client: FlaskClient, settings: Settings) -> None:
    body = run(client, {"key": "f", "job_id": "f", "program": "flood.py", "max_output_bytes": 4096})
    text = (settings.jobs / "f.stdout").read_text()
    assert body["stdout_truncated"] is True and body["stdout_bytes"] == 50007
    assert text.startswith("A" * 2048) and text.endswith("THE END") and "dropq cut" in text


def test_an_escaped_setsid_grandchild_does_not_outlive_its_job(settings: Settings) -> None:
    """Through a real worker process: only the worker may become a subreaper, never the test runner."""
    import subprocess
    import sys
    import tempfile

    from dropq.errors import TransportError
    from dropq.pools.transport import Transport

    def answers(transport: Transport) -> bool:
        try:
            transport.health(timeout=1)
        except TransportError:
            return False
        return True
    from dropq_worker import procs

    sock = Path(tempfile.mkdtemp(prefix="dqw-")) / "w.sock"
    proc = subprocess.Popen([sys.executable, "-m", "dropq_worker", "--socket", str(sock), "--programs",
                             str(settings.programs), "--inputs", str(settings.inputs), "--jobs", str(settings.jobs),
                             "--python", settings.python])
    try:
        transport = Transport(socket_path=str(sock))
        # answering, not merely bound: the socket file exists a moment before the server listens
        wait_until(lambda: sock.exists() and answers(transport), timeout=20, what="the worker to answer")
        transport.start(JobSpec(key="o", job_id="o", program="orphan.py"))
        assert transport.status("o", wait=20).done
        pid = int((settings.jobs / "o.stdout").read_text())
        assert procs.start_time(pid) is None, "the grandchild that called setsid was killed and reaped"
        transport.close()
    finally:
        proc.terminate()
        proc.wait(10)
        sock.unlink(missing_ok=True)
        sock.parent.rmdir()


def test_a_start_may_wait_for_the_end_in_the_same_request(client: FlaskClient, settings: Settings) -> None:
    resp = client.post("/jobs?wait=20", json={"key": "one", "job_id": "one", "program": "hello.py"})
    body = resp.get_json()
    assert resp.status_code == 200 and body["state"] == "done" and body["exit_code"] == 0, body
    assert (settings.jobs / "one.stdout").read_text() == "hello\n"
    resp = client.post("/jobs?wait=0.2", json={"key": "slow", "job_id": "slow", "program": "sleep.py", "args": ["5"]})
    assert resp.status_code == 202 and resp.get_json()["state"] == "running"
    client.delete("/jobs/slow")


def test_a_cancel_that_overtakes_the_start_is_kept_and_the_job_never_runs(client: FlaskClient,
                                                                          settings: Settings) -> None:
    assert client.delete("/jobs/early").status_code == 404  # not here yet
    resp = client.post("/jobs?wait=5", json={"key": "early", "job_id": "early", "program": "hello.py"})
    body = resp.get_json()
    assert resp.status_code == 200 and body["outcome"] == "cancelled", body
    assert not (settings.jobs / "early.stdout").exists() and not (settings.jobs / "early").exists()
    run(client, {"key": "later", "job_id": "later", "program": "hello.py"})  # the worker is free for the next job


def test_the_abandoned_job_of_a_dead_worker_is_killed_by_its_pid_file(settings: Settings) -> None:
    settings.jobs.mkdir(parents=True)
    running = settings.jobs / "running.pid"
    orphan = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        running.write_text("")  # a worker killed between open and write
        assert reap_abandoned(settings.jobs) == []
        running.write_text(json.dumps({"id": "gone", "pgid": orphan.pid, "start": 1}))  # a reused pid
        assert reap_abandoned(settings.jobs) == [] and orphan.poll() is None
        running.write_text(json.dumps({"id": "gone", "pgid": orphan.pid, "start": procs.start_time(orphan.pid)}))
        assert reap_abandoned(settings.jobs) == ["gone"]
        assert orphan.wait(10) == -9
    finally:
        if orphan.poll() is None:
            orphan.kill()
            orphan.wait()


def test_unknown_jobs_are_404(client: FlaskClient) -> None:
    assert client.get("/jobs/nope").status_code == 404
    assert client.delete("/jobs/nope").status_code == 404


def test_a_token_is_required_when_configured(settings: Settings) -> None:
    app = create_app(settings, token="s3cret")
    c = app.test_client()
    assert c.get("/health").status_code == 401
    assert c.get("/health", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert c.post("/jobs", json={"key": "z", "job_id": "z", "program": "hello.py"}).status_code == 401
    assert not (settings.jobs / "z").exists(), "a refused request has no side effect"
    assert c.get("/health", headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_capped_file_keeps_everything_under_the_cap(tmp_path: Path) -> None:
    f = CappedFile(tmp_path / "out", cap=1024)
    for _ in range(10):
        f.write(b"x" * 100)
    f.close()
    assert not f.truncated and (tmp_path / "out").read_bytes() == b"x" * 1000


def test_a_forgotten_job_id_may_be_posted_again_and_runs_again(client: FlaskClient, settings: Settings) -> None:
    run(client, {"key": "again", "job_id": "again", "program": "hello.py"})
    assert client.delete("/jobs/again").status_code == 200
    assert client.get("/jobs/again").status_code == 404
    (settings.jobs / "again.stdout").unlink()
    run(client, {"key": "again", "job_id": "again", "program": "hello.py"})
    assert (settings.jobs / "again.stdout").read_text() == "hello\n", "it ran a second time"
