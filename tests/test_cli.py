"""The `dropq` command line through its real entry point, against a real daemon."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from conftest import DaemonProcess, Workspace
from helpers import PipeLines, dropq, dropq_json, wait_for_status, wait_until


def test_help_lists_the_commands_with_examples() -> None:
    done = subprocess.run([sys.executable, "-m", "dropq", "--help"], capture_output=True, text=True)
    assert done.returncode == 0
    for word in ("run", "submit", "status", "show", "examples:", "exit codes:"):
        assert word in done.stdout


def test_a_bad_config_is_one_clear_line_and_exit_3(workspace: Workspace) -> None:
    workspace.config.write_text("workers: {count: many}\n")
    done = dropq(workspace.config, "status")
    assert done.returncode == 3
    assert done.stderr.strip() == (f"dropq: {workspace.config}: config key workers.count must be a whole number, "
                                   "not a string ('many')")


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


def test_submit_wait_timeout_exits_5(workspace: Workspace, daemon: DaemonProcess) -> None:
    daemon.start()
    done = dropq(workspace.config, "submit", "sleep", "--wait", "--wait-timeout", "0.5", "--", "30")
    assert done.returncode == 5 and "gave up waiting" in done.stderr


def test_a_second_daemon_on_the_same_state_refuses_to_start(workspace: Workspace, daemon: DaemonProcess) -> None:
    daemon.start()
    done = dropq(workspace.config, "run", timeout=30)
    assert done.returncode == 6
    assert "another dropq daemon is already running" in done.stderr


def test_logs_follow_prints_output_while_the_job_runs(workspace: Workspace, daemon: DaemonProcess) -> None:
    daemon.start()
    workspace.drop("tick.yaml", {"program": "ticker", "args": ["15", "0.2"]})
    # follow from the middle: the lines already written arrive as one burst, then the live ones
    # (a burst is what a reader that drops buffered lines loses)
    wait_until(lambda: dropq(workspace.config, "logs", "tick").stdout.count("\n") >= 3, what="3 lines written")
    follow = subprocess.Popen([sys.executable, "-m", "dropq", "--config", str(workspace.config), "logs", "tick",
                               "--follow"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = PipeLines(follow.stdout), PipeLines(follow.stderr)
        assert out.next(timeout=30) == "tick 1 of 15\n"
        # the first line arrived while the program still had 14 to print
        assert dropq_json(workspace.config, "show", "tick")["status"] == "running"
        rest, errors = out.rest(timeout=60), err.rest(timeout=60)
        assert follow.wait(timeout=30) == 0
    finally:
        follow.kill()
        follow.wait()
    assert rest == "".join(f"tick {n} of 15\n" for n in range(2, 16))
    assert errors == "ticker: done\n"
    assert dropq(workspace.config, "logs", "tick", "--stderr").stdout == ""


def test_logs_of_a_failed_job_and_of_an_unknown_one(workspace: Workspace, daemon: DaemonProcess) -> None:
    daemon.start()
    assert dropq(workspace.config, "submit", "fail", "--wait").returncode == 1
    shown = dropq(workspace.config, "logs", "fail")
    assert shown.returncode == 0 and "something went wrong" in shown.stderr
    assert dropq(workspace.config, "logs", "fail", "--follow").returncode == 1  # ended, and not well
    missing = dropq(workspace.config, "logs", "nope")
    assert missing.returncode == 4 and missing.stderr == "dropq: no job with id 'nope'\n"


def test_retry_runs_a_finished_job_again_on_copies_of_its_inputs(workspace: Workspace, daemon: DaemonProcess) -> None:
    daemon.start()
    workspace.put("words.txt", "b a b\n")
    workspace.drop("count.yaml", {"program": "wordcount", "input": "words.txt"})
    first = workspace.wait_results(1)["count"]
    done = dropq(workspace.config, "retry", "count", "--wait")
    assert done.returncode == 0, done.stderr
    again = yaml.safe_load(done.stdout)
    assert again["id"] == "count-retry" and again["status"] == "succeeded"
    assert (workspace.outbox / "count-retry" / "stdout.txt").read_text() == \
        (workspace.outbox / "count" / "stdout.txt").read_text()
    assert (workspace.outbox / "count-retry" / "inputs" / "words.txt").read_text() == "b a b\n"
    assert (workspace.outbox / "count" / "inputs" / "words.txt").exists(), "the first result is left as it was"
    assert workspace.result("count") == first
    assert dropq(workspace.config, "retry", "count").returncode == 0
    assert "count-retry-2" in workspace.wait_results(3)


def test_retry_refuses_a_job_that_has_not_finished(workspace: Workspace, daemon: DaemonProcess) -> None:
    daemon.start()
    workspace.drop("nap.yaml", {"program": "sleep", "args": ["20"]})
    wait_for_status(workspace.config, "nap", "running")
    done = dropq(workspace.config, "retry", "nap")
    assert done.returncode == 2
    assert done.stderr == "dropq: nap has not finished (running); only a finished job can be retried\n"


def test_workers_lists_each_worker_and_its_job(workspace: Workspace, daemon: DaemonProcess) -> None:
    daemon.start()
    workspace.drop("nap.yaml", {"program": "sleep", "args": ["20"]})
    wait_for_status(workspace.config, "nap", "running")
    assert [w["job"] for w in dropq_json(workspace.config, "workers") if w["state"] == "busy"] == ["nap"]
    table = dropq(workspace.config, "workers").stdout.splitlines()
    assert table[0].split() == ["WORKER", "STATE", "JOB", "ELAPSED", "DETAIL"]
    busy = [line.split() for line in table[1:] if " nap " in line]
    assert len(busy) == 1 and busy[0][1] == "busy" and busy[0][3].endswith(("ms", "s"))


def test_status_watch_shows_the_backlog_draining_until_idle(workspace: Workspace, daemon: DaemonProcess) -> None:
    daemon.start()
    for n in range(8):
        workspace.drop(f"nap{n}.yaml", {"program": "sleep", "args": ["0.3"]})
    done = dropq(workspace.config, "status", "--watch", "--interval", "0.2", "--until-idle", timeout=60)
    assert done.returncode == 0, done.stderr
    frames = [f for f in done.stdout.split("\n\n") if "backlog" in f]
    assert len(frames) >= 3, "one frame per interval while 8 jobs of 0.3 s run on 2 workers"
    assert "[" in frames[0] and "to go" in frames[0]
    assert "8 to go" not in frames[-1] and ", 0 to go" in frames[-1] and "100.0%" in frames[-1]


def test_submit_wait_shows_where_the_job_is(workspace: Workspace, daemon: DaemonProcess) -> None:
    daemon.start()
    workspace.drop("hold1.yaml", {"program": "sleep", "args": ["1"]})
    workspace.drop("hold2.yaml", {"program": "sleep", "args": ["1"]})
    workspace.drop("hold3.yaml", {"program": "sleep", "args": ["1"]})
    done = dropq(workspace.config, "submit", "sleep", "--name", "last", "--wait", "--", "0.6")
    assert done.returncode == 0
    lines = done.stderr.splitlines()
    assert any(line.startswith("last: queued, ") and line.endswith(" ahead") for line in lines), lines
    assert any(line.startswith("last: running on w") for line in lines), lines
    assert lines[-1] == "last: succeeded"


def test_one_clear_line_for_a_command_on_a_workspace_that_never_ran(workspace: Workspace) -> None:
    for command in (["status"], ["workers"], ["logs", "x"], ["retry", "x"]):
        done = dropq(workspace.config, *command)
        assert done.returncode == 4, command
        assert done.stderr.startswith("dropq: no job database at ") and done.stderr.count("\n") == 1


def test_a_refusal_by_the_system_is_one_line_and_exit_7(workspace: Workspace, tmp_path: Path) -> None:
    unit_dir = tmp_path / "units"
    unit_dir.mkdir()
    (unit_dir / "dropq.service").mkdir()  # where the unit file should go: the rename onto it fails
    done = dropq(workspace.config, "service", "install", "--unit-dir", str(unit_dir))
    assert done.returncode == 7
    assert done.stderr.startswith("dropq: Is a directory: ") and done.stderr.count("\n") == 1
