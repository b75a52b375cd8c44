"""Webhooks and the notify command (issue 17): a real receiver on 127.0.0.1 checks each delivery's
signature and is down at first; a delivery pending across a daemon restart goes out after it; a
manifest cannot name an address the operator did not allow."""

from __future__ import annotations

import hashlib
import hmac
import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import DaemonProcess, Workspace
from helpers import dropq, dropq_json, wait_for_status, wait_until

SECRET = b"s3cret-for-the-test"


class Receiver:
    """An HTTP endpoint on loopback that records every POST, answering 503 while `down` is set."""

    def __init__(self) -> None:
        self.down = threading.Event()
        self.deliveries: list[dict[str, Any]] = []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                expected = "sha256=" + hmac.new(SECRET, body, hashlib.sha256).hexdigest()
                receiver.deliveries.append({
                    "path": self.path, "body": json.loads(body), "signed": hmac.compare_digest(
                        expected, self.headers.get("X-Dropq-Signature-256", "")),
                    "answered": 503 if receiver.down.is_set() else 200})
                self.send_response(receiver.deliveries[-1]["answered"])
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                return

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def hooked(ws: Workspace, receiver: Receiver, tmp_path: Path) -> None:
    secret = tmp_path / "notify.secret"
    secret.write_bytes(SECRET + b"\n")
    ws.configure(notify={"allowed": [f"{receiver.base}/hooks/"], "secret_file": str(secret)})


def test_a_signed_webhook_is_retried_and_survives_a_restart(workspace: Workspace, daemon: DaemonProcess,
                                                            receiver: Receiver, tmp_path: Path) -> None:
    hooked(workspace, receiver, tmp_path)
    receiver.down.set()
    daemon.start()
    workspace.drop("w1.yaml", {"program": "echo", "args": ["hi"], "notify": f"{receiver.base}/hooks/w1"})
    assert wait_for_status(workspace.config, "w1", "succeeded", "failed") == "succeeded"
    wait_until(lambda: receiver.deliveries, timeout=30, what="the first delivery")
    shown = wait_until(lambda: (d := dropq_json(workspace.config, "show", "w1").get("notify")) and
                       d["attempts"] == 1 and d, timeout=30, what="the failed attempt to be recorded")
    assert shown["state"] == "pending" and shown["last_error"].startswith("HTTP 503"), shown
    assert "# notify: failing: HTTP 503" in dropq(workspace.config, "show", "w1").stdout
    # the daemon stops with the delivery pending; the next start sends it
    daemon.stop()
    receiver.down.clear()
    daemon.start()
    wait_until(lambda: len(receiver.deliveries) >= 2, timeout=30, what="the delivery after the restart")
    assert [d["answered"] for d in receiver.deliveries] == [503, 200]
    assert all(d["signed"] for d in receiver.deliveries), "every delivery carries a valid signature"
    body = receiver.deliveries[-1]["body"]
    assert (body["job"], body["status"], body["folder"], receiver.deliveries[-1]["path"]) == (
        "w1", "succeeded", "w1", "/hooks/w1")
    wait_until(lambda: dropq_json(workspace.config, "show", "w1")["notify"]["state"] == "delivered", timeout=10,
               what="the delivery to be recorded")
    assert "# notify: delivered to" in dropq(workspace.config, "show", "w1").stdout


def test_a_webhook_the_operator_did_not_allow_is_refused(workspace: Workspace, daemon: DaemonProcess,
                                                          receiver: Receiver, tmp_path: Path) -> None:
    daemon.start()
    workspace.drop("off.yaml", {"program": "echo", "notify": f"{receiver.base}/hooks/x"})
    assert wait_for_status(workspace.config, "off", "rejected", "succeeded") == "rejected"
    assert "notify.allowed is empty" in workspace.result("off")["error"]
    daemon.stop()
    hooked(workspace, receiver, tmp_path)
    daemon.start()
    workspace.drop("elsewhere.yaml", {"program": "echo", "notify": "http://169.254.169.254/latest/meta-data"})
    assert wait_for_status(workspace.config, "elsewhere", "rejected", "succeeded") == "rejected"
    assert "does not start with one this daemon allows" in workspace.result("elsewhere")["error"]
    assert receiver.deliveries == []


def test_the_notify_command_runs_with_the_job_folder(workspace: Workspace, daemon: DaemonProcess,
                                                     tmp_path: Path) -> None:
    record = tmp_path / "seen.txt"
    hook = tmp_path / "hook.sh"
    hook.write_text(f'#!/bin/sh\necho "$1" >> {record}\nexit 3\n')
    hook.chmod(0o755)
    workspace.configure(notify={"command": [str(hook)]})
    daemon.start()
    workspace.drop("c1.yaml", {"program": "echo"})
    assert wait_for_status(workspace.config, "c1", "succeeded", "failed") == "succeeded"
    wait_until(lambda: record.exists() and record.read_text(), timeout=20, what="the command to run")
    assert record.read_text() == f"{workspace.outbox / 'c1'}\n"
    wait_until(lambda: "notify.command exited with code 3" in daemon.log_text(), timeout=20,
               what="its failure to be logged")
