"""The `dropq` command line through its real entry point, against a real daemon."""

from __future__ import annotations

import subprocess
import sys

import yaml

from conftest import DaemonProcess, Workspace
from helpers import dropq, dropq_json


def test_help_lists_the_commands_with_examples() -> None:
    done = subprocess.run([sys.executable, "-m", "dropq", "--help"], capture_output=True, text=True)
    assert done.returncode == 0
    for word in ("run", "submit", "status", "show", "examples:", "exit codes:"):
        assert word in done.stdout


def test_a_bad_config_is_one_clear_line_and_exit_3(workspace: Workspace) -> None:
    workspace.config.write_text("workers: {count: many}\n")
    done = dropq(workspace.config, "status")
    assert done.returncode == 3
    assert done.stderr.strip() == "dropq: config key workers.count must be a whole number, not a string"


def test_submit_wait_runs_a_program_on_a_file_from_elsewhere(workspace: Workspace, daemon: DaemonProcess) -> None:
    daemon.start()
    data = workspace.root / "elsewhere.txt"
    data.write_text("to be or not to be\n")
    done = dropq(workspace.config, "submit", "wordcount", str(data), "--wait", "--", "--top", "2")
    assert done.returncode == 0, done.stderr
    result = yaml.safe_load(done.stdout)
    assert result["status"] == "succeeded" and result["id"] == "elsewhere"
    assert (workspace.outbox / "elsewhere" / "stdout.txt").read_text() == "2 to\n2 be\n"
    assert data.exists(), "the original file is copied, not moved"


def test_submit_wait_exits_1_when_the_job_fails(workspace: Workspace, daemon: DaemonProcess) -> None:
    daemon.start()
    done = dropq(workspace.config, "submit", "fail", "--wait")
    assert done.returncode == 1
    assert yaml.safe_load(done.stdout)["status"] == "failed"


def test_submit_a_manifest_file_then_show_and_status(workspace: Workspace, daemon: DaemonProcess) -> None:
    daemon.start()
    manifest = workspace.root / "greet.yaml"
    manifest.write_text("program: echo\nargs: [hello]\n")
    assert dropq(workspace.config, "submit", str(manifest), "--wait").returncode == 0
    shown = dropq(workspace.config, "show", "greet")
    assert shown.returncode == 0 and yaml.safe_load(shown.stdout)["status"] == "succeeded"
    status = dropq_json(workspace.config, "status")
    assert status["daemon"]["running"] is True
    assert status["jobs"] == {"succeeded": 1}
    assert [w["name"] for w in status["workers"]] == ["w1", "w2"]
    table = dropq(workspace.config, "status").stdout
    assert "running" in table and "greet" in table


def test_show_an_unknown_job_exits_4(workspace: Workspace, daemon: DaemonProcess) -> None:
    daemon.start()
    done = dropq(workspace.config, "show", "nope")
    assert done.returncode == 4 and done.stderr.strip() == "dropq: no job with id 'nope'"


def test_submit_wait_timeout_exits_5(workspace: Workspace) -> None:
    done = dropq(workspace.config, "submit", "echo", "--wait", "--wait-timeout", "0.5")
    assert done.returncode == 5 and "gave up waiting" in done.stderr


def test_a_second_daemon_on_the_same_state_refuses_to_start(workspace: Workspace, daemon: DaemonProcess) -> None:
    daemon.start()
    done = dropq(workspace.config, "run", timeout=30)
    assert done.returncode == 6
    assert "another dropq daemon is already running" in done.stderr
