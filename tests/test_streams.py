"""A failed program's last words: the last line of its stderr ends its error, safely, wherever the error goes."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from conftest import DaemonProcess, Workspace
from dropq.publish.streams import last_line
from dropq.queue.balancer import outcome_of
from dropq_worker.protocol import JobState, Outcome, Report
from helpers import dropq, dropq_json

MISSING = "ModuleNotFoundError: No module named 'dropq_no_such_module'"


def test_last_line_is_the_last_non_empty_one(tmp_path: Path) -> None:
    path = tmp_path / "stderr"
    path.write_bytes(b"Traceback (most recent call last):\n  File \"x.py\", line 1\nValueError: bad\n\n  \r\n")
    assert last_line(path) == "ValueError: bad"


def test_last_line_drops_escape_sequences_and_control_characters(tmp_path: Path) -> None:
    path = tmp_path / "stderr"
    # colours, a bell, a right-to-left override (which would reverse what a reader sees), a NUL
    path.write_bytes("\x1b[1;31merror:\x1b[0m the disk\x07 is \u202efull\x00\n".encode())
    assert last_line(path) == "error: the disk is full"


def test_last_line_is_cut_and_reads_only_the_end_of_a_huge_file(tmp_path: Path) -> None:
    path = tmp_path / "stderr"
    with open(path, "wb") as fh:
        fh.write(b"x" * (64 << 20))  # 64 MiB without a newline: reading it all would show in the time
        fh.write(b"\n" + b"y" * 500 + b"\n")
    started = time.monotonic()
    line = last_line(path)
    assert line == "y" * 197 + "..."
    assert time.monotonic() - started < 1.0


@pytest.mark.parametrize("data", [b"", b"\n\n  \n", b"\x1b[0m\n"])
def test_no_line_when_stderr_says_nothing(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "stderr"
    path.write_bytes(data)
    assert last_line(path) is None
    assert last_line(tmp_path / "missing") is None


def test_invalid_utf8_becomes_replacement_characters(tmp_path: Path) -> None:
    path = tmp_path / "stderr"
    path.write_bytes(b"caf\xe9 closed\n")
    assert last_line(path) == "caf\ufffd closed"


@pytest.mark.parametrize(("status", "error"), [
    ({"outcome": "exited", "exit_code": 1}, f"the program exited with code 1: {MISSING}"),
    ({"outcome": "exited", "exit_code": None, "signal": 6}, f"the program was killed by signal SIGABRT: {MISSING}"),
    # the worker's own reason wins: it knows more than the program's last line
    ({"outcome": "exited", "exit_code": 1, "error": "a file reached the limit"},
     "the program exited with code 1: a file reached the limit"),
    ({"outcome": "exited", "exit_code": 0}, None),
])
def test_outcome_ends_a_failure_with_the_last_words(status: dict[str, Any], error: str | None) -> None:
    assert outcome_of(_report(**status), None, last_words=MISSING)["error"] == error


def test_outcome_without_last_words_is_as_before() -> None:
    assert outcome_of(_report(outcome="exited", exit_code=1), None)["error"] == "the program exited with code 1"


def _report(*, outcome: str, **details: Any) -> Report:
    """A finished job's report, as the worker sends it."""
    return Report(key="k1-1", state=JobState.RUNNING, started_at=1.0).ended(Outcome(outcome), finished_at=2.0,
                                                                            **details)


@pytest.mark.parametrize("pool", ["local", pytest.param("docker", marks=pytest.mark.docker)])
def test_a_failed_programs_last_words_reach_result_status_and_the_api(
        workspace: Workspace, daemon: DaemonProcess, request: pytest.FixtureRequest, pool: str) -> None:
    if pool == "docker":  # stderr is then written by the container's user, on the shared mount
        workspace.configure(workers={"pool": "docker", "count": 1,
                                     "docker": {"image": request.getfixturevalue("docker_image")}})
    (workspace.programs / "needs_module.py").write_text(
        "import sys\nprint('starting', file=sys.stderr)\nimport dropq_no_such_module\n")
    daemon.start()
    assert f"worker pool: {pool}" in daemon.log_text()
    workspace.drop("needy.yaml", {"program": "needs_module"})
    result = workspace.wait_results(1)["needy"]
    expected = f"the program exited with code 1: {MISSING}"
    assert result["status"] == "failed" and result["error"] == expected
    assert "Traceback" in (workspace.outbox / "needy" / "stderr.txt").read_text(), "the log keeps it whole"
    assert dropq_json(workspace.config, "show", "needy")["error"] == expected
    assert [j["error"] for j in dropq_json(workspace.config, "status")["recent"]] == [expected]
    assert "ModuleNotFoundError" in dropq(workspace.config, "status").stdout
    assert daemon.get("/api/jobs/needy").json()["error"] == expected
