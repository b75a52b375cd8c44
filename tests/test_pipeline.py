"""The core pipeline, end to end: a real daemon process, real local workers, real files.

Every check goes through files only: manifests dropped into inbox/, results read from outbox/.
"""

from __future__ import annotations

import collections
import os
import signal
import time

import pytest

from conftest import DaemonProcess, Workspace
from helpers import dropq, dropq_json, meta, wait_for_status, wait_until


def worker_pid_running(ws: Workspace, job_id: str, timeout: float = 10.0) -> int:
    """The pid of the worker process running `job_id`, as `dropq status --json` reports it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for w in dropq_json(ws.config, "status")["workers"]:
            if w["job"] == job_id and w["state"] == "busy":
                return int(w["detail"].split()[-1])
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never started")


def test_200_manifests_dropped_at_once_all_succeed_with_the_right_stdout(workspace: Workspace,
                                                                         daemon: DaemonProcess) -> None:
    daemon.start()
    texts = {}
    for i in range(200):
        words = " ".join(["alpha"] * (i % 7 + 1) + ["beta"] * (i % 3 + 1))
        workspace.put(f"text{i}.txt", words + "\n")
        texts[f"job{i}"] = words
    for i in range(200):
        workspace.drop(f"job{i}.yaml", {"program": "wordcount", "input": f"text{i}.txt"})
    results = workspace.wait_results(200, timeout=120)
    assert sorted(results) == sorted(texts)
    for job_id, words in texts.items():
        assert results[job_id]["status"] == "succeeded", results[job_id]
        counts = collections.Counter(words.split())
        stdout = (workspace.outbox / job_id / "stdout.txt").read_text()
        assert stdout == "".join(f"{n} {w}\n" for w, n in counts.most_common())
        assert (workspace.outbox / job_id / "inputs" / f"text{job_id[3:]}.txt").read_text() == words + "\n"
    assert sorted(os.listdir(workspace.inbox)) == []
    assert not any(n.startswith(".") for n in os.listdir(workspace.outbox)), "no temp folder is left"


def test_outbox_folder_holds_everything_the_contract_lists(workspace: Workspace, daemon: DaemonProcess) -> None:
    daemon.start()
    workspace.put("moby.txt", "call me ishmael call me\n")
    text = "program: wordcount\ninput: moby.txt\nargs: ['--top', '1']\noutput: counts.txt\n"
    workspace.drop("moby.yaml", text)
    result = workspace.wait_results(1)["moby"]
    folder = workspace.outbox / "moby"
    assert sorted(os.listdir(folder)) == ["inputs", "manifest.yaml", "output", "result.yaml", "stderr.txt",
                                          "stdout.txt"]
    assert (folder / "manifest.yaml").read_text() == text, "the manifest is kept as dropped"
    assert (folder / "output" / "counts.txt").read_text() == "2 call\n"
    assert (folder / "stderr.txt").read_text() == "5 words\n"
    for key in ("id", "status", "exit_code", "error", "attempts", "worker", "submitted_at", "started_at",
                "finished_at"):
        assert key in result
    assert result["id"] == "moby" and result["exit_code"] == 0 and result["error"] is None
    assert result["attempts"] == 1 and result["worker"] in ("w1", "w2")
    assert result["submitted_at"] <= result["started_at"] <= result["finished_at"]


def test_files_the_program_writes_are_published_under_output(workspace: Workspace, daemon: DaemonProcess) -> None:
    daemon.start()
    workspace.drop("parts.yaml", {"program": "makefiles", "args": ["2"], "env": {"GREETING": "hi"}})
    assert workspace.wait_results(1)["parts"]["status"] == "succeeded"
    out = workspace.outbox / "parts" / "output"
    assert (out / "part-2.txt").read_text() == "this is part 2 of 2\n"
    assert (out / "summary" / "index.txt").read_text() == "part-1.txt\npart-2.txt\n"


def test_a_failing_program_is_failed_with_its_exit_code_and_stderr(workspace: Workspace,
                                                                   daemon: DaemonProcess) -> None:
    daemon.start()
    workspace.drop("bad.yaml", {"program": "fail"})
    result = workspace.wait_results(1)["bad"]
    assert result["status"] == "failed"
    assert result["exit_code"] == 3
    assert "exited with code 3" in result["error"]
    assert "something went wrong" in (workspace.outbox / "bad" / "stderr.txt").read_text()
    assert result["attempts"] == 1, "a program's own failure is not retried"


def test_a_program_past_its_timeout_is_killed_and_timed_out(workspace: Workspace, daemon: DaemonProcess) -> None:
    daemon.start()
    workspace.drop("slow.yaml", {"program": "sleep", "args": ["30"], "timeout": 0.5})
    result = workspace.wait_results(1, timeout=20)["slow"]
    assert result["status"] == "timed_out"
    assert "timeout of 0.5 seconds" in result["error"]
    assert result["duration_seconds"] < 5


REJECTIONS = {
    "badyaml": ("program: [unclosed\n", "not valid YAML"),
    "notamap": ("- just\n- a list\n", "must be a YAML mapping"),
    "empty": ("", "must be a YAML mapping"),
    "unknown": ("program: echo\ncolour: blue\n", "unknown key `colour`"),
    "noprogram": ("input: x.txt\n", "no `program:` key"),
    "missingprog": ("program: no_such_program\n", "was not found in the programs folder"),
    "escapeprog": ("program: ../etc/passwd\n", "contains '..'"),
    "dotdot": ("program: echo\ninput: ../outside.txt\n", "contains '..'"),
    "absolute": ("program: echo\ninput: /etc/passwd\n", "absolute path"),
    "badtimeout": ("program: echo\ntimeout: -1\n", "`timeout` must be a positive number"),
    "badargs": ("program: echo\nargs: notalist\n", "`args` must be a list"),
    "badenv": ("program: echo\nenv: {DROPQ_OUTPUT: /etc}\n", "may not set DROPQ_OUTPUT"),
    "pyobject": ("program: !!python/object/apply:os.system ['true']\n", "not valid YAML"),
    "missinginput": ("program: echo\ninput: never-arrives.txt\n", "did not arrive in the inbox within 2"),
}


def test_every_rejection_yields_an_outbox_folder_with_the_reason(workspace: Workspace,
                                                                 daemon: DaemonProcess) -> None:
    outside = workspace.root / "secret.txt"
    outside.write_text("secret")
    os.symlink(outside, workspace.inbox / "link.txt")
    daemon.start()
    for name, (text, _) in REJECTIONS.items():
        workspace.drop(f"{name}.yaml", text)
    workspace.drop("symlinked.yaml", "program: echo\ninput: link.txt\n")
    results = workspace.wait_results(len(REJECTIONS) + 1, timeout=30)
    for name, (text, reason) in REJECTIONS.items():
        assert results[name]["status"] == "rejected", (name, results[name])
        assert reason in results[name]["error"], (name, results[name]["error"])
        assert (workspace.outbox / name / "manifest.yaml").read_text() == text
    assert results["symlinked"]["status"] == "rejected"
    assert "symlink" in results["symlinked"]["error"]
    assert (workspace.inbox / "link.txt").is_symlink(), "a refused input is left where it was"


def test_an_input_that_arrives_after_its_manifest_is_waited_for(workspace: Workspace,
                                                                daemon: DaemonProcess) -> None:
    daemon.start()
    workspace.drop("late.yaml", {"program": "wordcount", "input": "data/late.txt"})
    wait_for_status(workspace.config, "late", "waiting")  # claimed, and held for its input
    assert not (workspace.outbox / "late").exists()
    workspace.put("data/late.txt", "late words\n")
    result = workspace.wait_results(1)["late"]
    assert result["status"] == "succeeded"
    assert (workspace.outbox / "late" / "inputs" / "data" / "late.txt").exists()


def test_priority_order_with_one_worker(workspace: Workspace, daemon: DaemonProcess) -> None:
    workspace.configure(workers={"pool": "local", "count": 1})
    daemon.start()
    workspace.drop("blocker.yaml", {"program": "sleep", "args": ["5"]})
    # the blocker occupies the only worker while the rest queue up
    wait_for_status(workspace.config, "blocker", "running")
    order = [("low1", 0), ("high1", 9), ("low2", 0), ("mid", 5), ("high2", 9)]
    for name, priority in order:
        workspace.drop(f"{name}.yaml", {"program": "echo", "args": [name], "priority": priority})
    results = workspace.wait_results(6, timeout=30)
    started = sorted((r["started_at"], name) for name, r in results.items() if name != "blocker")
    assert [name for _, name in started] == ["high1", "high2", "mid", "low1", "low2"]


def test_a_manifest_written_slowly_in_place_is_not_read_early(workspace: Workspace, daemon: DaemonProcess) -> None:
    daemon.start()
    path = workspace.inbox / "typed.yaml"
    with open(path, "w") as fh:
        fh.write("program: echo\n")
        fh.flush()
        # two rescans later (a second apart, so past the 0.5 s settle time too) the writer still has it
        # open: only its close may release it
        rescans = int(meta(workspace.config, "watcher_rescans"))
        wait_until(lambda: int(meta(workspace.config, "watcher_rescans")) >= rescans + 2, what="two rescans")
        assert not (workspace.outbox / "typed").exists()
        assert path.exists(), "the manifest must not be claimed while its writer has it open"
        fh.write("args: [typed, slowly]\n")
    result = workspace.wait_results(1)["typed"]
    assert result["status"] == "succeeded"
    assert (workspace.outbox / "typed" / "stdout.txt").read_text().startswith("typed slowly\n")


@pytest.mark.skipif(os.geteuid() != 0, reason="only root sees every process's open files, as the systemd service does")
def test_manifests_present_at_start_are_taken_at_once_unless_a_writer_has_them_open(
        workspace: Workspace, daemon: DaemonProcess) -> None:
    workspace.configure(intake={"settle": 30, "rescan": 30})
    workspace.drop("ready.yaml", {"program": "echo", "args": ["ready"]})  # just now: not settled
    held = open(workspace.inbox / "held.yaml", "w")  # closed below, while the daemon runs
    try:
        held.write("program: echo\n")
        held.flush()
        daemon.start()
        # well within the 30 s settle time: nothing has it open, so it is complete
        assert workspace.wait_results(1, timeout=15)["ready"]["status"] == "succeeded"
        # the start-up rescan that claimed ready.yaml has decided about held.yaml too (it sorts first),
        # and the next rescan is 30 s away: its staying in the inbox now is the decision
        assert (workspace.inbox / "held.yaml").exists(), "claimed while a writer still had it open"
        held.write("args: [held, at, start]\n")
    finally:
        held.close()
    results = workspace.wait_results(2, timeout=15)  # its close event releases it
    assert results["held"]["status"] == "succeeded"
    assert (workspace.outbox / "held" / "stdout.txt").read_text().startswith("held at start\n")


def test_dotfiles_and_other_files_are_left_alone(workspace: Workspace, daemon: DaemonProcess) -> None:
    daemon.start()
    workspace.put("notes.txt", "data")
    (workspace.inbox / ".hidden.yaml").write_text("program: echo\n")
    (workspace.inbox / "draft.yaml~").write_text("program: echo\n")
    workspace.drop("real.yaml", {"program": "echo"})
    workspace.wait_results(1)
    # two more rescans: one that began after the files were there has finished
    rescans = int(meta(workspace.config, "watcher_rescans"))
    wait_until(lambda: int(meta(workspace.config, "watcher_rescans")) >= rescans + 2, what="two rescans")
    assert sorted(os.listdir(workspace.inbox)) == [".hidden.yaml", "draft.yaml~", "notes.txt"]
    assert list(workspace.results()) == ["real"]


def test_the_same_name_twice_gets_a_unique_outbox_folder(workspace: Workspace, daemon: DaemonProcess) -> None:
    daemon.start()
    workspace.drop("twice.yaml", {"program": "echo", "args": ["one"]})
    workspace.wait_results(1)
    workspace.drop("twice.yaml", {"program": "echo", "args": ["two"]})
    results = workspace.wait_results(2)
    assert sorted(results) == ["twice", "twice-2"]
    assert (workspace.outbox / "twice-2" / "stdout.txt").read_text().startswith("two\n")


def test_a_backlog_present_at_start_is_processed(workspace: Workspace, daemon: DaemonProcess) -> None:
    for i in range(30):
        workspace.drop(f"early{i}.yaml", {"program": "echo", "args": [str(i)]})
    (workspace.inbox / "inplace.yaml").write_text("program: echo\n")
    daemon.start()
    results = workspace.wait_results(31, timeout=60)
    assert all(r["status"] == "succeeded" for r in results.values())


def test_a_restart_with_queued_jobs_loses_none_and_runs_none_twice(workspace: Workspace,
                                                                   daemon: DaemonProcess) -> None:
    workspace.configure(workers={"pool": "local", "count": 1})
    daemon.start()
    for i in range(8):
        workspace.drop(f"q{i}.yaml", {"program": "sleep", "args": ["0.3"]})
    wait_until(lambda: dropq_json(workspace.config, "status")["jobs"].get("succeeded"), what="a first job done")
    assert daemon.stop() == 0, "SIGTERM is a clean exit"
    done_before = set(workspace.results())
    assert len(done_before) < 8, "the restart must happen while jobs are still queued"
    daemon.start()
    results = workspace.wait_results(8, timeout=60)
    assert sorted(results) == sorted(f"q{i}" for i in range(8))
    assert all(r["status"] == "succeeded" for r in results.values())
    # a job interrupted by the shutdown is run again without counting against its retries
    assert all(r["attempts"] == 1 for r in results.values())


def test_kill_9_of_the_daemon_mid_job_recovers_every_job_exactly_once(workspace: Workspace,
                                                                       daemon: DaemonProcess) -> None:
    workspace.configure(workers={"pool": "local", "count": 2})
    daemon.start()
    for i in range(6):
        workspace.drop(f"k{i}.yaml", {"program": "sleep", "args": ["3"]})
    # both workers mid-job, the rest still queued: the moment the kill is about
    wait_until(lambda: dropq_json(workspace.config, "status")["jobs"].get("running") == 2, what="2 jobs running")
    daemon.kill()
    daemon.start()
    results = workspace.wait_results(6, timeout=60)
    # no job is active any more, so no further folder can appear
    wait_until(lambda: not {"queued", "running", "committing"} & set(dropq_json(workspace.config, "status")["jobs"]),
               what="an idle store")
    assert sorted(os.listdir(workspace.outbox)) == sorted(f"k{i}" for i in range(6))
    assert all(r["status"] == "succeeded" for r in results.values()), results
    assert "adopted running worker" in daemon.log_text()


def test_a_worker_killed_mid_job_is_replaced_and_the_job_retried(workspace: Workspace,
                                                                 daemon: DaemonProcess) -> None:
    workspace.configure(workers={"pool": "local", "count": 1})
    daemon.start()
    workspace.drop("victim.yaml", {"program": "sleep", "args": ["1"]})
    pid = worker_pid_running(workspace, "victim")
    os.kill(pid, signal.SIGKILL)
    result = workspace.wait_results(1, timeout=30)["victim"]
    assert result["status"] == "succeeded"
    assert result["attempts"] == 2
    assert f"process {pid} exited" in daemon.log_text()


@pytest.mark.parametrize("retries", [0])
def test_a_job_whose_worker_is_lost_past_its_retries_fails_saying_so(workspace: Workspace, daemon: DaemonProcess,
                                                                      retries: int) -> None:
    workspace.configure(workers={"pool": "local", "count": 1})
    daemon.start()
    workspace.drop("doomed.yaml", {"program": "sleep", "args": ["5"], "retries": retries})
    os.kill(worker_pid_running(workspace, "doomed"), signal.SIGKILL)
    result = workspace.wait_results(1, timeout=30)["doomed"]
    assert result["status"] == "failed"
    assert "worker running this job was lost" in result["error"] and "1 attempt" in result["error"]


def test_cancel_a_queued_and_a_running_job(workspace: Workspace, daemon: DaemonProcess) -> None:
    workspace.configure(workers={"pool": "local", "count": 1})
    daemon.start()
    workspace.drop("running.yaml", {"program": "sleep", "args": ["30"]})
    worker_pid_running(workspace, "running")
    workspace.drop("queued.yaml", {"program": "echo"})
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and '"status": "queued"' not in dropq(workspace.config, "show", "queued",
                                                                           "--json").stdout:
        time.sleep(0.05)
    assert dropq(workspace.config, "cancel", "queued").returncode == 0
    workspace.put("running.cancel", "")  # the file-based way, without the CLI
    results = workspace.wait_results(2, timeout=30)
    assert results["queued"]["status"] == "cancelled" and results["queued"]["attempts"] == 0
    assert results["running"]["status"] == "cancelled" and results["running"]["duration_seconds"] < 10
    assert not (workspace.inbox / "running.cancel").exists()
    done = dropq(workspace.config, "cancel", "queued")
    assert done.returncode == 8 and done.stderr == "dropq: job queued already finished (cancelled); nothing to cancel\n"


def test_retry_on_exit_retries_the_listed_codes_only(workspace: Workspace, daemon: DaemonProcess) -> None:
    (workspace.programs / "flaky.py").write_text(
        "import os, sys\n"
        "n = int(sys.argv[1])\n"
        "count = len(os.listdir(sys.argv[2])) if os.path.isdir(sys.argv[2]) else 0\n"
        "os.makedirs(os.path.join(sys.argv[2], str(count)))\n"
        "sys.exit(75 if count < n else 0)\n")
    tally = workspace.root / "tally"
    daemon.start()
    workspace.drop("flaky.yaml", {"program": "flaky", "args": ["2", str(tally)], "retry_on_exit": [75],
                                  "retries": 3})
    workspace.drop("fails.yaml", {"program": "fail", "retry_on_exit": [75], "retries": 3})
    results = workspace.wait_results(2, timeout=30)
    assert results["flaky"]["status"] == "succeeded" and results["flaky"]["attempts"] == 3
    assert results["fails"]["status"] == "failed" and results["fails"]["attempts"] == 1, "3 is not listed"


def test_a_backlog_larger_than_max_queued_is_claimed_as_the_queue_drains(workspace: Workspace,
                                                                        daemon: DaemonProcess) -> None:
    workspace.configure(workers={"pool": "local", "count": 2}, intake={"max_queued": 5})
    for i in range(40):
        workspace.drop(f"bk{i}.yaml", {"program": "sleep", "args": ["0.1"]})
    daemon.start()
    # sampled while the backlog drains: never more than max_queued claimed and waiting for a worker
    queued = []
    while len(workspace.results()) < 40:
        queued.append(dropq_json(workspace.config, "status")["jobs"].get("queued", 0))
        assert len(queued) < 2000, "the backlog did not drain"
    assert max(queued) <= 5, queued
    results = workspace.wait_results(40, timeout=60)
    assert all(r["status"] == "succeeded" for r in results.values())
    assert "further manifests wait in the inbox until the queue drains" in daemon.log_text()
