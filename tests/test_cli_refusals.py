"""Commands that cannot do what was asked say so at once, in one line, with a named exit code."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import DaemonProcess, Workspace
from dropq.cli.exits import Exit
from helpers import dropq, wait_for_status


def test_cancel_of_a_finished_job_says_so_and_exits_8(workspace: Workspace, daemon: DaemonProcess) -> None:
    daemon.start()
    assert dropq(workspace.config, "submit", "echo", "--name", "done", "--wait").returncode == 0
    cancel = dropq(workspace.config, "cancel", "done")
    assert cancel.returncode == Exit.ALREADY_FINISHED == 8
    assert cancel.stderr == "dropq: job done already finished (succeeded); nothing to cancel\n"
    assert cancel.stdout == ""
    assert not (workspace.inbox / "done.cancel").exists(), "no cancel request is left behind"
    assert workspace.result("done")["status"] == "succeeded"


@pytest.mark.parametrize("command", [["submit", "echo", "--wait"], ["submit", "echo", "--wait", "--wait-timeout",
                                                                      "600"]])
def test_submit_wait_without_a_daemon_says_so_at_once(workspace: Workspace, command: list[str]) -> None:
    # the generous timeout only bounds a regression (today's wait would run until it): the message
    # and the exit code decide
    done = dropq(workspace.config, *command, timeout=120)
    assert done.returncode == Exit.DAEMON == 6
    assert done.stderr.startswith("dropq: no dropq daemon is running on ") and done.stderr.count("\n") == 1
    assert list(workspace.inbox.iterdir()) == [], "nothing is dropped for a wait that cannot end"


def test_submit_wait_after_the_daemon_stopped_says_so_at_once(workspace: Workspace, daemon: DaemonProcess) -> None:
    daemon.start()
    assert dropq(workspace.config, "submit", "echo", "--wait").returncode == 0
    daemon.stop()
    done = dropq(workspace.config, "submit", "echo", "--name", "again", "--wait", timeout=120)
    assert done.returncode == 6 and "no dropq daemon is running" in done.stderr
    assert not (workspace.inbox / "again.yaml").exists()


def test_retry_wait_without_a_daemon_says_so_at_once(workspace: Workspace, daemon: DaemonProcess) -> None:
    daemon.start()
    assert dropq(workspace.config, "submit", "echo", "--name", "first", "--wait").returncode == 0
    daemon.stop()
    done = dropq(workspace.config, "retry", "first", "--wait", timeout=120)
    assert done.returncode == 6 and "no dropq daemon is running" in done.stderr


def test_submit_without_wait_needs_no_daemon(workspace: Workspace) -> None:
    done = dropq(workspace.config, "submit", "echo", "--name", "later")
    assert done.returncode == 0, done.stderr
    assert (workspace.inbox / "later.yaml").exists(), "queued in the inbox for when a daemon starts"


def test_submit_wait_gives_up_when_the_daemon_stops_mid_wait(workspace: Workspace, daemon: DaemonProcess) -> None:
    daemon.start()
    waiting = subprocess.Popen([sys.executable, "-m", "dropq", "--config", str(workspace.config), "submit", "sleep",
                                "--name", "nap", "--wait", "--", "60"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_status(workspace.config, "nap", "running")
        daemon.stop()
        out, err = waiting.communicate(timeout=120)
    finally:
        waiting.kill()
    assert waiting.returncode == 6 and out == ""
    assert err.splitlines()[-1].startswith("dropq: the dropq daemon on ") and "stopped while nap.yaml waited" in err
