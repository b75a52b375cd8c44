"""The worker protocol (dropq_worker.protocol): its messages, and a daemon and a worker of different
versions refusing each other with a message that says what to do, through real worker processes and a
real daemon.

A worker of another version is a real worker process whose PROTOCOL is set before its app is imported,
which is all that tells one version from another on the wire.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from conftest import DaemonProcess, Workspace
from dropq.errors import ProtocolMismatch
from dropq.pools.base import check_protocol
from dropq.pools.transport import Transport
from dropq_worker.protocol import (
    HEADER,
    MISMATCH_STATUS,
    PROTOCOL,
    Health,
    JobSpec,
    JobState,
    Outcome,
    ProtocolError,
    Report,
    Staging,
)
from helpers import engine

OLD = PROTOCOL - 1

#: runs the worker's real entry point after setting its protocol version (the first argument)
_AS_VERSION = ("import sys, dropq_worker.protocol as p; p.PROTOCOL = int(sys.argv.pop(1)); "
               "from dropq_worker.__main__ import main; sys.exit(main())")


# --- the messages ----------------------------------------------------------------------------------

def test_messages_survive_a_round_trip_through_json() -> None:
    spec = JobSpec(key="j3-2", job_id="report", program="wordcount.py", inputs=("j3-2/a.txt",), args=("-n",),
                   env={"A": "b"}, timeout=2.5, kill_grace=1.0, max_output_bytes=4096)
    report = Report(key="j3-2", state=JobState.RUNNING, started_at=1.5).ended(
        Outcome.EXITED, finished_at=2.0, exit_code=3, error="boom", stdout_bytes=7, stdout_truncated=True)
    health = Health(pid=42, protocol=PROTOCOL, name="w1", version="0.2.0", job="j3-2")
    for message in (spec, report, health):
        assert type(message).from_json(json.loads(json.dumps(message.to_json()))) == message
        assert set(message.to_json()) == {f.name for f in fields(message)}, "every field is on the wire"
    assert report.done and report.outcome is Outcome.EXITED


@pytest.mark.parametrize("data", [
    None, [], {"job_id": "a", "program": "p"}, {"key": "a", "program": "p"}, {"key": "a", "job_id": "a"},
    {"key": "a.b", "job_id": "a", "program": "p"}, {"key": "", "job_id": "a", "program": "p"},
    {"key": "a", "job_id": "", "program": "p"}, {"key": "a", "job_id": "a\x00", "program": "p"},
    {"key": "a", "job_id": "a", "program": 3}, {"key": "a", "job_id": "a", "program": "p", "args": "x"},
    {"key": "a", "job_id": "a", "program": "p", "env": {"A": 1}},
    {"key": "a", "job_id": "a", "program": "p", "timeout": "60"},
    {"key": "a", "job_id": "a", "program": "p", "timeout": 0},
    {"key": "a", "job_id": "a", "program": "p", "max_output_bytes": 10.5},
    {"key": "a", "job_id": "a", "program": "p", "max_output_bytes": True},
])
def test_a_malformed_spec_raises_protocol_error_only(data: Any) -> None:
    with pytest.raises(ProtocolError):
        JobSpec.from_json(data)


@pytest.mark.parametrize("data", [
    {"key": "a", "state": "sleeping", "started_at": 1},
    {"key": "a", "state": "done", "started_at": 1},
    {"key": "a", "state": "done", "outcome": "vanished", "started_at": 1},
    {"key": "a", "state": "done", "outcome": "exited", "exit_code": "0", "started_at": 1},
    {"key": "a", "state": "done", "outcome": "exited", "exit_code": True, "started_at": 1},
])
def test_a_malformed_report_raises_protocol_error_only(data: Any) -> None:
    with pytest.raises(ProtocolError):
        Report.from_json(data)


def test_the_health_of_older_workers_is_read_far_enough_to_tell_their_version() -> None:
    assert Health.from_json({"ok": True, "pid": 7, "job": None}).protocol == 1  # before versions were named
    assert Health.from_json({"ok": True, "pid": 7, "name": "w1", "protocol": 2, "job": "j1-1"}).protocol == 2
    with pytest.raises(ProtocolError):
        Health.from_json({"protocol": PROTOCOL})


def test_the_staging_layout_is_flat(tmp_path: Path) -> None:
    staging = Staging(tmp_path, "j1-1")
    assert (staging.output, staging.stdout, staging.stderr) == (
        tmp_path / "j1-1", tmp_path / "j1-1.stdout", tmp_path / "j1-1.stderr")
    assert not staging.exists()
    (staging.output / "sub").mkdir(parents=True)
    staging.stdout.write_text("out")
    assert staging.exists()
    staging.remove()
    assert not staging.exists() and os.listdir(tmp_path) == []


# --- versions refusing each other, through real worker processes -----------------------------------

class _UnixHTTP(http.client.HTTPConnection):
    """A plain HTTP connection to a worker's socket, for requests the daemon's transport would not send."""

    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=10)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(self._path)


def start_worker(root: Path, *, protocol: int, name: str = "w1", folder: Path | None = None,
                 token: str | None = None) -> subprocess.Popen[bytes]:
    """A real worker process speaking `protocol`; its files in `folder` (default root/name)."""
    folder = folder or root / name
    for sub in ("jobs", "inputs"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-c", _AS_VERSION, str(protocol), "--socket", str(folder / "worker.sock"),
            "--name", name, "--programs", str(root / "programs"), "--inputs", str(folder / "inputs"),
            "--jobs", str(folder / "jobs"), "--python", sys.executable]
    env = {**os.environ, **({"DROPQ_WORKER_TOKEN": token} if token else {})}
    proc = subprocess.Popen(argv, env=env, start_new_session=True)
    transport = Transport(socket_path=str(folder / "worker.sock"), token=token)
    deadline = time.monotonic() + 30
    try:
        while True:  # until it answers: a socket file may exist before the server listens on it
            try:
                transport.health(timeout=2)
                return proc
            except Exception:  # noqa: BLE001 - not up yet; the deadline decides
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"the worker did not start (exit code {proc.poll()})") from None
                time.sleep(0.05)
    finally:
        transport.close()


@pytest.fixture
def root() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="dqv-"))  # short: a socket path has at most 107 bytes
    (root / "programs").mkdir()
    (root / "programs" / "hello.py").write_text("print('hello')\n")
    yield root
    shutil.rmtree(root)


@pytest.fixture
def old_worker(root: Path) -> Iterator[Transport]:
    """A worker of the previous protocol version, and this daemon's transport to it."""
    proc = start_worker(root, protocol=OLD)
    transport = Transport(socket_path=str(root / "w1" / "worker.sock"))
    yield transport
    transport.close()
    proc.terminate()
    assert proc.wait(10) == 0


def test_the_daemon_refuses_a_worker_whose_health_names_another_version(old_worker: Transport) -> None:
    health = old_worker.health()
    assert health.protocol == OLD
    with pytest.raises(ProtocolMismatch) as refused:
        check_protocol("w1", health)
    assert str(refused.value) == (f"worker w1 speaks protocol {OLD}, this daemon speaks {PROTOCOL}: "
                                  "rebuild the worker image with `dropq image build`")


def test_an_older_worker_refuses_a_job_and_the_daemon_shows_its_reason(old_worker: Transport,
                                                                        root: Path) -> None:
    with pytest.raises(ProtocolMismatch) as refused:
        old_worker.start(JobSpec(key="j1-1", job_id="hello", program="hello.py"), wait=5)
    assert str(refused.value) == (f"worker w1 speaks protocol {OLD}, this daemon speaks {PROTOCOL}: "
                                  "rebuild the worker image with `dropq image build`")
    assert os.listdir(root / "w1" / "jobs") == [], "a refused request has no side effect"
    with pytest.raises(ProtocolMismatch):
        old_worker.status("j1-1")


@pytest.mark.parametrize("header", [{HEADER: str(OLD)}, {}], ids=["older", "unnamed"])
def test_a_worker_refuses_a_request_of_an_older_daemon_with_what_to_do(root: Path, header: dict[str, str]) -> None:
    proc = start_worker(root, protocol=PROTOCOL)
    conn = _UnixHTTP(str(root / "w1" / "worker.sock"))
    try:
        spec = JobSpec(key="j1-1", job_id="hello", program="hello.py").to_json()
        conn.request("POST", "/jobs?wait=5", body=json.dumps(spec), headers={"Content-Type": "application/json",
                                                                             **header})
        resp = conn.getresponse()
        body = json.loads(resp.read())
        assert resp.status == MISMATCH_STATUS and resp.getheader(HEADER) == str(PROTOCOL)
        # a daemon before protocol 3 sent no header: it counts as protocol 2
        theirs = OLD if header else 2
        assert body["error"] == (f"worker w1 speaks protocol {PROTOCOL}, this daemon speaks {theirs}: the worker is "
                                 "newer than the daemon: upgrade dropq on the daemon's host, or rebuild the "
                                 "worker image with this daemon's `dropq image build`")
        assert os.listdir(root / "w1" / "jobs") == [], "a refused request has no side effect"
        conn.request("GET", "/health")  # open to every version, so that a daemon can learn this one's
        resp = conn.getresponse()
        assert resp.status == 200 and json.loads(resp.read())["protocol"] == PROTOCOL
    finally:
        conn.close()
        proc.terminate()
        assert proc.wait(10) == 0


# --- through the real daemon -----------------------------------------------------------------------

def test_a_left_over_local_worker_of_another_version_is_replaced(workspace: Workspace,
                                                                 daemon: DaemonProcess) -> None:
    """What a daemon killed with SIGKILL and then upgraded finds: its old local worker still running."""
    workspace.configure(workers={"pool": "local", "count": 1})
    folder = workspace.state / "workers" / "w1"
    folder.mkdir(parents=True)
    fd = os.open(folder / "token", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, b"old-token")
    os.close(fd)
    old = start_worker(workspace.root, protocol=OLD, folder=folder, token="old-token")
    daemon.start()
    assert old.wait(30) == 0, "the daemon stopped the worker of the other version"
    workspace.drop("hello.yaml", {"program": "echo", "args": ["hi"]})
    assert workspace.wait_results(1)["hello"]["status"] == "succeeded"
    assert (f"worker w1 speaks protocol {OLD}, this daemon speaks {PROTOCOL}: rebuild the worker image with "
            f"`dropq image build`; replacing its process {old.pid}") in daemon.log_text()


def test_the_program_gets_the_jobs_id_as_dropq_job_id(workspace: Workspace, daemon: DaemonProcess) -> None:
    (workspace.programs / "whoami.py").write_text("import os\nprint(os.environ['DROPQ_JOB_ID'])\n")
    daemon.start()
    (workspace.outbox / "again").mkdir()  # someone's folder: the next job named "again" is again-2
    workspace.drop("report.yaml", {"program": "whoami.py"})
    workspace.drop("again.yaml", {"program": "whoami.py"})
    results = workspace.wait_results(2)
    assert sorted(results) == ["again-2", "report"]
    assert {r["status"] for r in results.values()} == {"succeeded"}
    # the outbox folder's name, not the internal key of the attempt (like j1-1)
    assert (workspace.outbox / "report" / "stdout.txt").read_text() == "report\n"
    assert (workspace.outbox / "again-2" / "stdout.txt").read_text() == "again-2\n"


@pytest.fixture
def image_tag(docker_image: str) -> Iterator[tuple[str, Callable[[bool], None]]]:
    """A tag of this test's own for the worker image, and a function that points it at the image under
    test, or (True) at the same image speaking the previous protocol."""
    client = engine(timeout=120)
    assert client is not None  # docker_image made sure an engine answers
    current, old = "dropq-test-protocol:worker", "dropq-test-protocol:old"
    dockerfile = (f"FROM {docker_image}\nUSER root\n"
                  f"RUN sed -i 's/^PROTOCOL = {PROTOCOL}$/PROTOCOL = {OLD}/' /opt/dropq/dropq_worker/protocol.py"
                  f" && grep -q '^PROTOCOL = {OLD}$' /opt/dropq/dropq_worker/protocol.py\n"
                  "USER 65534:65534\n")
    with tempfile.TemporaryDirectory() as context:
        Path(context, "Dockerfile").write_text(dockerfile)
        client.images.build(path=context, tag=old, rm=True, pull=False, network_mode="none")

    def point(to_old: bool) -> None:
        repository, _, version = current.partition(":")
        client.images.get(old if to_old else docker_image).tag(repository, version)

    point(False)
    try:
        yield current, point
    finally:
        for tag in (current, old):
            client.images.remove(tag)  # tags only: the image under test stays
        client.close()


@pytest.mark.docker
def test_a_container_of_another_version_is_reported_broken_with_what_to_do(
        workspace: Workspace, daemon: DaemonProcess, image_tag: tuple[str, Callable[[bool], None]]) -> None:
    """The image was rebuilt by an older dropq while the daemon ran: the worker it recreates from it
    refuses the daemon's job, and the daemon records the worker as broken, with the reason and the
    remedy; the job is not charged an attempt. After the rebuild and a restart, the job runs."""
    from helpers import containers_of, dropq_json

    current, point = image_tag
    workspace.configure(workers={"pool": "docker", "count": 1, "docker": {"image": current}})
    daemon.start()
    point(True)
    containers_of(workspace.state)["w1"].kill()
    expected = (f"worker w1 speaks protocol {OLD}, this daemon speaks {PROTOCOL}: the image {current} is out of "
                "date: rebuild it with `dropq image build`, then restart dropq")
    deadline = time.monotonic() + 60
    while expected not in daemon.log_text():  # the pool recreated w1 from the old image and met it
        assert time.monotonic() < deadline, "the pool never started the old worker"
        time.sleep(0.1)
    workspace.drop("hello.yaml", {"program": "echo", "args": ["hi"]})
    deadline = time.monotonic() + 60
    while (worker := dropq_json(workspace.config, "workers")[0])["state"] != "broken":
        assert time.monotonic() < deadline, f"the worker was never reported broken: {worker}"
        time.sleep(0.1)
    assert worker["name"] == "w1" and worker["detail"] == expected
    job = dropq_json(workspace.config, "show", "hello")
    assert (job["status"], job["attempts"]) == ("queued", 0), job
    # the remedy the message names: a current image, and a restart that replaces the old container
    daemon.stop()
    point(False)
    daemon.start()
    assert workspace.wait_results(1)["hello"]["status"] == "succeeded"
