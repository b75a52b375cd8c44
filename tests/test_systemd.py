"""systemd: the unit file passes systemd-analyze, and the daemon speaks sd_notify to a real socket."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import DaemonProcess, Workspace
from dropq.config import Config
from dropq.errors import LayoutError
from dropq.ops.systemd import Notifier, unit_text
from helpers import dropq, dropq_json, job_status


class NotifySocket:
    """What systemd listens on: a datagram socket; every message is a newline-separated list of fields."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[dict[str, str]] = []

    def receive(self, timeout: float) -> dict[str, str] | None:
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(4096)
        except TimeoutError:
            return None
        message = dict(line.split("=", 1) for line in data.decode().splitlines())
        self.messages.append(message)
        return message

    def wait_for(self, key: str, timeout: float = 30.0) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = self.receive(max(0.01, deadline - time.monotonic()))
            if message is not None and key in message:
                return message
        raise AssertionError(f"no {key} within {timeout}s; got {self.messages}")

    def count(self, key: str, seconds: float) -> int:
        deadline, n = time.monotonic() + seconds, 0
        while (left := deadline - time.monotonic()) > 0:
            message = self.receive(left)
            n += message is not None and key in message
        return n

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_socket(workspace: Workspace) -> Iterator[NotifySocket]:
    sock = NotifySocket(workspace.root / "notify.sock")
    yield sock
    sock.close()


def test_the_installed_unit_passes_systemd_analyze_verify(workspace: Workspace, tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # the dashboard on a socket in a RuntimeDirectory: its keys, too, must be ones systemd knows
    workspace.configure(http={"socket": "/run/dropq-test/http.sock"})
    done = dropq(workspace.config, "service", "install", "--unit-dir", str(tmp_path), "--name", "dropq-test")
    assert done.returncode == 0, done.stderr
    unit = tmp_path / "dropq-test.service"
    text = unit.read_text()
    home = "ProtectHome=tmpfs" if _runtime_under_home() else "ProtectHome=yes"
    for line in ("Type=notify", "WatchdogSec=30", "Restart=on-failure", "KillMode=mixed", "NoNewPrivileges=yes",
                 "ProtectSystem=strict", home, "RestartPreventExitStatus=3",
                 # one writable path: a bind mount each would make every rename between them fail (EXDEV)
                 f"ReadWritePaths={workspace.root}\n",
                 f"ReadOnlyPaths=-{workspace.programs} -{workspace.config}\n",
                 "RuntimeDirectory=dropq-test\nRuntimeDirectoryMode=0755\n",
                 f"--config {workspace.config} run"):
        assert line in text, line
    # the workspace is under /tmp here: a private /tmp would hide it
    assert "PrivateTmp=yes" not in text
    verified = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    # verify exits 0 even for unknown keys and bad values; what it says about them goes to stderr
    assert verified.returncode == 0 and verified.stderr == "", verified.stderr
    printed = dropq(workspace.config, "service", "unit")
    assert printed.returncode == 0 and printed.stdout == text


def _runtime_roots() -> set[Path]:
    """Where the code that runs lives: the interpreter (pyenv keeps it under a home) and the source folders
    of this editable install (a checkout anywhere: a home, /tmp for a CI clone, /work...)."""
    import dropq
    import dropq_worker

    sources = (Path(m.__file__).resolve().parent.parent for m in (dropq, dropq_worker))
    return {Path(sys.base_prefix).resolve(), *sources}


def _runtime_under_home() -> set[str]:
    """What a unit must bind back read-only under ProtectHome=tmpfs."""
    return {str(p) for p in _runtime_roots() if any(p.is_relative_to(h) for h in ("/home", "/root", "/run/user"))}


def _runtime_under_tmp() -> bool:
    """Whether the code runs from under /tmp (a CI clone): a private /tmp would hide it, so the unit has none."""
    return any(p.is_relative_to(t) for p in _runtime_roots() for t in ("/tmp", "/var/tmp"))


def test_a_workspace_under_home_is_bound_into_an_empty_home(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("")
    config = Config.from_mapping({"inbox": "/home/ann/dq/inbox", "outbox": "/home/ann/dq/outbox",
                                  "state": "/home/ann/dq/state", "programs": "/home/ann/dq/programs"},
                                 base=tmp_path, source=Path("/home/ann/dq/config.yaml"))
    text = unit_text(config, exe=Path("/home/ann/dq/.venv/bin/dropq"))
    assert "ProtectHome=tmpfs" in text and "ProtectHome=yes" not in text
    assert "ReadWritePaths=/home/ann/dq\n" in text and "BindPaths=/home/ann/dq\n" in text
    assert "ReadOnlyPaths=-/home/ann/dq/programs -/home/ann/dq/config.yaml\n" in text
    assert ("PrivateTmp=yes" in text) is not _runtime_under_tmp()
    # the virtualenv is inside the bound workspace; an interpreter under a home (pyenv) and a checkout under
    # a home (this editable install's source) are bound read-only
    expected = _runtime_under_home()
    bound: list[str] = next((line.split("=", 1)[1].split() for line in text.splitlines()
                  if line.startswith("BindReadOnlyPaths=")), [])
    assert set(bound) == expected


@pytest.mark.parametrize(("socket", "expected"), [
    ("/run/dropq/http.sock", ["RuntimeDirectory=dropq", "RuntimeDirectoryMode=0755"]),
    ("/srv/sockets/dq/http.sock", ["ReadWritePaths=-/srv/sockets/dq"]),
    ("/srv/dq/state/http.sock", []),  # inside the workspace: writable already
])
def test_the_unit_lets_the_daemon_make_its_dashboard_socket(tmp_path: Path, socket: str, expected: list[str]) -> None:
    config = Config.from_mapping({"inbox": "/srv/dq/inbox", "outbox": "/srv/dq/outbox", "state": "/srv/dq/state",
                                  "programs": "/srv/dq/programs", "http": {"socket": socket}},
                                 base=tmp_path, source=Path("/srv/dq/config.yaml"))
    lines = unit_text(config, exe=Path("/srv/dq/.venv/bin/dropq")).splitlines()
    assert [line for line in lines if line.startswith(("RuntimeDirectory", "ReadWritePaths"))] == [
        "ReadWritePaths=/srv/dq", *expected]


def test_inbox_outbox_and_state_with_no_folder_in_common_are_refused(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("")
    config = Config.from_mapping({"inbox": "/srv/in", "outbox": "/var/lib/out", "state": "/srv/state"},
                                 base=tmp_path, source=tmp_path / "config.yaml")
    with pytest.raises(LayoutError, match="have no folder in common but /"):
        unit_text(config, exe=Path("/opt/dq/.venv/bin/dropq"))


def test_the_daemon_refuses_a_workspace_split_over_mounts(workspace: Workspace) -> None:
    """What the 0.1.0 unit did (a bind mount per folder), made with a bind mount in a private namespace."""
    unshare = shutil.which("unshare")
    if unshare is None or os.geteuid() != 0:
        pytest.skip("needs root and unshare to make a bind mount")
    workspace.state.mkdir()
    script = (f"mount --bind {workspace.state} {workspace.state} && "
              f"exec {sys.executable} -m dropq --config {workspace.config} run")
    done = subprocess.run([unshare, "--mount", "--propagation", "private", "sh", "-c", script],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 3, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith(f"dropq: inbox ({workspace.inbox}) and spool ({workspace.state}/spool) are on "
                                "different mounts"), done.stderr
    assert not [p for p in os.listdir(workspace.inbox) if p.startswith(".dropq-probe-")]


def test_the_daemon_notifies_ready_status_watchdog_and_stopping(
        workspace: Workspace, daemon: DaemonProcess, notify_socket: NotifySocket) -> None:
    daemon.start(wait=False, env={"NOTIFY_SOCKET": str(notify_socket.path), "WATCHDOG_USEC": "1000000"})
    ready = notify_socket.wait_for("READY")
    # READY only once the pool is up and the inbox watched: the log says so before it is sent
    assert "dropq is running" in daemon.log_text()
    assert ready["READY"] == "1" and ready["MAINPID"] == str(daemon.proc.pid if daemon.proc else 0)
    assert ready["STATUS"] == "0 queued, 0 running; 2 local worker(s)"
    # WATCHDOG_USEC of 1 s: a ping every half second
    assert notify_socket.count("WATCHDOG", 3.0) >= 4
    for n in range(4):
        workspace.drop(f"nap{n}.yaml", {"program": "sleep", "args": ["3"]})
    busy = notify_socket.wait_for("STATUS")
    while busy["STATUS"] != "2 queued, 2 running; 2 local worker(s)":
        busy = notify_socket.wait_for("STATUS", timeout=10)
    daemon.stop(signal.SIGTERM)
    assert notify_socket.wait_for("STOPPING")["STOPPING"] == "1"


def test_an_abstract_notify_socket_is_reached(workspace: Workspace) -> None:
    name = f"dropq-test-{workspace.root.name}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name})
        notifier.ready("starting")
        assert sock.recv(4096).decode().startswith("READY=1\nSTATUS=starting\n")
        notifier.close()


def test_without_notify_socket_nothing_is_sent() -> None:
    notifier = Notifier({})
    assert not notifier.enabled and notifier.watchdog_interval is None
    notifier.ready("x")  # must not raise
    notifier.watchdog()


def test_a_watchdog_meant_for_another_process_is_ignored(tmp_path: Path) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "n.sock"), "WATCHDOG_USEC": "1000000",
                         "WATCHDOG_PID": "1"})
    assert notifier.watchdog_interval is None
    notifier.close()


def test_a_daemon_whose_slot_cannot_be_repaired_stops_feeding_the_watchdog(
        workspace: Workspace, daemon: DaemonProcess, notify_socket: NotifySocket) -> None:
    """A balancer slot that fails is repaired in the daemon (see test_slot_repair.py); one whose repairs keep
    failing (workers.repair_max_failures in a row, 2 here) is reported broken: no more WATCHDOG=1 (systemd then
    restarts the service), and STATUS says why. The crash is real: the worker's inputs folder is replaced by a
    file, so staging the next job's input raises in the slot's thread, as a broken disk or a stray hand in the
    state folder would, and the repair cannot make the folder again while the file stands there."""
    workspace.configure(workers={"count": 1, "repair_max_failures": 2})
    daemon.start(wait=False, env={"NOTIFY_SOCKET": str(notify_socket.path), "WATCHDOG_USEC": "400000"})
    notify_socket.wait_for("READY")
    assert notify_socket.count("WATCHDOG", 1.5) >= 3
    inputs = workspace.state / "workers" / "w1" / "inputs"
    shutil.rmtree(inputs)
    inputs.write_text("not a folder\n")
    workspace.put("words.txt", "one two\n")
    workspace.drop("crash.yaml", {"program": "wordcount", "input": "words.txt"})
    said = notify_socket.wait_for("STATUS", timeout=30)
    while not said["STATUS"].startswith("unhealthy"):
        said = notify_socket.wait_for("STATUS", timeout=30)
    assert said["STATUS"] == "unhealthy: the slot of worker(s) w1 failed and could not be repaired"
    log = daemon.log_text()
    assert "slot w1 failed (1 in a row): NotADirectoryError" in log
    assert "slot w1 failed (2 in a row): PoolError: worker w1: its folder" in log
    assert "slot w1: giving up after 2 failures in a row" in log
    [worker] = dropq_json(workspace.config, "workers")
    assert worker["state"] == "broken" and "something that is not a folder stands there" in worker["detail"]
    # the job the slot held was given back, not lost: queued again for the restarted daemon
    assert job_status(workspace.config, "crash") == "queued"
    notify_socket.messages.clear()
    assert notify_socket.count("WATCHDOG", 2.0) == 0


@pytest.mark.parametrize("manifest", [{"program": "echo", "args": ["x"]}, {"program": "no-such-program"}],
                         ids=["a result", "a rejection"])
def test_a_daemon_that_cannot_publish_is_unhealthy_and_stops_feeding_the_watchdog(
        workspace: Workspace, daemon: DaemonProcess, notify_socket: NotifySocket, manifest: dict[str, Any]) -> None:
    """The outbox turned read-only under a running daemon (in its own mount namespace): the job stays
    committing, STATUS says why, and the watchdog is no longer fed, so systemd restarts the daemon, whose
    start-up retries the commit. The same for a job the intake rejects as for a worker's result: every
    finished job goes through the one committer (a failed rejection once left a healthy-looking daemon)."""
    unshare, nsenter = shutil.which("unshare"), shutil.which("nsenter")
    if unshare is None or nsenter is None or os.geteuid() != 0:
        pytest.skip("needs root, unshare and nsenter to remount the outbox read-only")
    workspace.state.mkdir()
    # the whole workspace is one bind mount (as under the unit), so the start-up probe passes
    script = (f"mount --bind {workspace.root} {workspace.root} && "
              f"exec {sys.executable} -m dropq --config {workspace.config} run")
    env = {"NOTIFY_SOCKET": str(notify_socket.path), "WATCHDOG_USEC": "1000000"}
    proc = subprocess.Popen([unshare, "--mount", "--propagation", "private", "sh", "-c", script],
                            env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        notify_socket.wait_for("READY")
        assert notify_socket.count("WATCHDOG", 1.5) >= 2
        # in the daemon's namespace only: this test's view of the outbox stays writable
        remount = f"mount --bind {workspace.outbox} {workspace.outbox} && mount -o remount,bind,ro {workspace.outbox}"
        subprocess.run([nsenter, "-t", str(proc.pid), "-m", "sh", "-c", remount], check=True)
        workspace.drop("blocked.yaml", manifest)
        said = notify_socket.wait_for("STATUS")
        while not said["STATUS"].startswith("unhealthy"):
            said = notify_socket.wait_for("STATUS")
        assert said["STATUS"].startswith("unhealthy: publishing job blocked failed (")
        assert "Read-only file system" in said["STATUS"]
        notify_socket.messages.clear()
        assert notify_socket.count("WATCHDOG", 2.0) == 0
    finally:
        proc.terminate()
        proc.wait(30)
        assert proc.stderr is not None
        proc.stderr.close()
