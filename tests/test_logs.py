"""The daemon's log: JSON lines for shippers, priority-prefixed lines for journald."""

from __future__ import annotations

import json
import os
import re

from conftest import DaemonProcess, Workspace


def test_json_logs_are_one_object_per_line_with_the_job_id(workspace: Workspace, daemon: DaemonProcess) -> None:
    daemon.start(run_args=("--log-format", "json"))
    workspace.drop("hello.yaml", {"program": "echo", "args": ["hi"]})
    workspace.drop("bad.yaml", {"program": "no-such-program"})
    workspace.wait_results(2)
    daemon.stop()
    records = [json.loads(line) for line in daemon.log_text().splitlines()]  # every line is JSON
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records)
    hello = [re.sub(r"worker w\d", "worker W", r["message"]) for r in records
             if r.get("job") == "hello" and r["level"] != "debug"]
    # three lines for a job that went well: claimed, running on a worker, its outcome as published
    # ("queued" is a debug line: it follows the claim at once unless inputs are awaited)
    assert hello == ["job hello: claimed hello.yaml", "job hello: attempt 1 on worker W",
                     "job hello: succeeded, published as hello"]
    bad = [r for r in records if r.get("job") == "bad"]
    assert bad[-1]["message"] == "job bad: rejected, published as bad"
    assert any(r["level"] == "warning" and "rejected" in r["message"] for r in bad)


def test_under_journald_lines_carry_a_priority_and_no_time(workspace: Workspace, daemon: DaemonProcess) -> None:
    daemon.log.touch()
    st = os.stat(daemon.log)
    # systemd names the stream it connected to stderr by device and inode
    daemon.start(env={"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
    workspace.drop("bad.yaml", "program: [unclosed\n")
    workspace.wait_results(1)
    daemon.stop()
    lines = daemon.log_text().splitlines()
    assert "<6>dropq.daemon: dropq is running: inbox " + str(workspace.inbox) in "\n".join(lines)
    assert any(line.startswith("<4>dropq.intake: job bad: rejected: ") for line in lines), lines
    assert all(line.startswith("<") for line in lines)


def test_names_and_keys_from_a_manifest_cannot_forge_log_lines_or_reach_the_terminal(
        workspace: Workspace, daemon: DaemonProcess) -> None:
    daemon.start()
    # a file name with a newline that forges a line, and an OSC sequence that retitles a terminal; an
    # unknown key (echoed in the rejection) that clears the screen
    evil = "x\x1b]0;pwned\x07\n2026-01-01 00:00:00 INFO    dropq.intake: FORGED.yaml"
    workspace.drop(evil, {"program": "echo", "args": ["hi"]})
    workspace.drop("keys.yaml", {"program": "echo", "\x1b[2J\x1b[Hclear": 1})
    workspace.wait_results(2)
    daemon.stop()
    text = daemon.log_text()
    assert "\x1b" not in text and "\x07" not in text
    lines = text.splitlines()
    assert not any(line.startswith("2026-01-01 00:00:00") for line in lines)
    claimed = [line for line in lines if "FORGED" in line and "claimed" in line]
    assert len(claimed) == 1 and "x\\x1b]0;pwned\\x07\\n2026-01-01" in claimed[0], lines
    assert any("\\x1b[2J\\x1b[Hclear" in line for line in lines), lines
