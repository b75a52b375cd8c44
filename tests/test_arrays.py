"""Array jobs end to end: a real daemon process, real local workers, real files (issue 13, Arrays).

Every check goes through files and the CLI: manifests dropped into inbox/, results read from outbox/.
"""

from __future__ import annotations

import os
from typing import Any

import yaml

from conftest import DaemonProcess, Workspace
from helpers import dropq, dropq_json, wait_until


def _array_result(ws: Workspace, job_id: str, timeout: float = 60.0) -> dict[str, Any]:
    return ws.wait_results(1, timeout=timeout)[job_id]


def _task(ws: Workspace, job_id: str, index: int) -> dict[str, Any]:
    return yaml.safe_load((ws.outbox / job_id / "tasks" / str(index) / "result.yaml").read_text())


def test_a_3_by_2_matrix_fills_args_and_env_and_publishes_one_folder(workspace: Workspace,
                                                                     daemon: DaemonProcess) -> None:
    daemon.start()
    # written as text: the keys' order in the manifest is the tasks' order (safe_dump would sort them)
    workspace.drop("grid.yaml", yaml.safe_dump({
        "program": "echo", "args": ["size={size}", "mode={mode}", "{{literal}}"],
        "env": {"GREETING": "hi-{mode}-{size}"}, "matrix": {"size": [64, 128, 256], "mode": ["fast", "slow"]}},
        sort_keys=False))
    result = _array_result(workspace, "grid")
    assert result["status"] == "succeeded", result
    assert result["task_count"] == 6 and result["counts"] == {"succeeded": 6}
    expected = [(s, m) for s in ("64", "128", "256") for m in ("fast", "slow")]
    assert [(t["index"], t["parameters"]) for t in result["tasks"]] == [
        (i, {"size": s, "mode": m}) for i, (s, m) in enumerate(expected)]
    folder = workspace.outbox / "grid"
    assert sorted(os.listdir(folder)) == ["inputs", "manifest.yaml", "result.yaml", "tasks"]
    assert sorted(os.listdir(folder / "tasks"), key=int) == [str(i) for i in range(6)]
    for i, (size, mode) in enumerate(expected):
        task_folder = folder / "tasks" / str(i)
        assert sorted(os.listdir(task_folder)) == ["output", "result.yaml", "stderr.txt", "stdout.txt"]
        lines = (task_folder / "stdout.txt").read_text().splitlines()
        assert lines[0] == f"size={size} mode={mode} {{literal}}"
        assert f"GREETING=hi-{mode}-{size}" in lines
        assert f"DROPQ_TASK_INDEX={i}" in lines and "DROPQ_TASK_COUNT=6" in lines
        task = _task(workspace, "grid", i)
        assert task["status"] == "succeeded" and task["task"] == i and task["parameters"] == {"size": size,
                                                                                              "mode": mode}
    assert not any(n.startswith(".") for n in os.listdir(workspace.outbox))


def _progress(ws: Workspace, job_id: str) -> dict[str, Any]:
    shown = dropq_json(ws.config, "show", job_id)
    return dict(shown.get("tasks") or {})


def test_a_glob_matrix_over_50_dropped_files_claims_them_once_and_runs_one_task_each(
        workspace: Workspace, daemon: DaemonProcess) -> None:
    daemon.start()
    def word(i: int) -> str:  # wordcount counts letters only
        return f"w{chr(97 + i % 26)}{chr(97 + i // 26)}"

    for i in range(50):
        workspace.put(f"photos/p{i:02d}.txt", f"{word(i)} " * (i % 4 + 1) + "\n")
    workspace.put("photos/readme.md", "not a match\n")
    workspace.drop("album.yaml", {"program": "wordcount", "input": "{photo}",
                                  "matrix": {"photo": {"glob": "photos/*.txt"}}})
    result = _array_result(workspace, "album")
    assert result["status"] == "succeeded", result
    assert result["counts"] == {"succeeded": 50}
    names = [f"photos/p{i:02d}.txt" for i in range(50)]
    assert [t["parameters"]["photo"] for t in result["tasks"]] == names, "glob matches sorted"
    folder = workspace.outbox / "album"
    assert sorted(os.listdir(folder / "inputs" / "photos")) == sorted(os.path.basename(n) for n in names)
    for i in range(50):
        assert (folder / "tasks" / str(i) / "stdout.txt").read_text() == f"{i % 4 + 1} {word(i)}\n"
    assert os.listdir(workspace.inbox / "photos") == ["readme.md"], "only the matches were claimed"


def test_max_failures_cancels_the_tasks_not_yet_started(workspace: Workspace, daemon: DaemonProcess) -> None:
    workspace.configure(workers={"pool": "local", "count": 1})
    daemon.start()
    workspace.drop("flaky.yaml", {"program": "fail", "matrix": {"n": list(range(10))}, "max_failures": 2})
    result = _array_result(workspace, "flaky")
    assert result["status"] == "failed"
    failed, cancelled = result["counts"].get("failed", 0), result["counts"].get("cancelled", 0)
    # one worker: at most one more task may start between the second failure and the cancel
    assert 2 <= failed <= 3 and failed + cancelled == 10, result["counts"]
    assert "max_failures: 2" in result["error"]
    for task in result["tasks"]:
        if task["status"] == "failed":
            assert task["exit_code"] == 3 and "exited with code 3" in task["error"]
        else:
            assert task["status"] == "cancelled" and "max_failures: 2" in task["error"]
            assert _task(workspace, "flaky", task["index"])["status"] == "cancelled"


def test_cancelling_an_array_mid_way_cancels_its_running_and_queued_tasks(workspace: Workspace,
                                                                          daemon: DaemonProcess) -> None:
    daemon.start()
    workspace.drop("long.yaml", {"program": "sleep", "args": ["30"], "matrix": {"n": list(range(20))}})
    wait_until(lambda: _progress(workspace, "long").get("running") == 2, what="2 tasks running")
    # progress while it runs: dropq status, dropq show, and the API the dashboard reads
    assert "array    long: 0/20 tasks done" in dropq(workspace.config, "status").stdout
    assert "tasks: 0/20 tasks done" in dropq(workspace.config, "show", "long").stdout
    api = daemon.get("/api/jobs/long").json()
    assert (api["status"], api["tasks"]["text"], api["tasks"]["running"]) == ("running", "0/20 tasks done", 2)
    task = daemon.get("/api/jobs/long/1").json()
    assert (task["array"], task["task"], task["status"]) == ("long", 1, "running")
    assert dropq(workspace.config, "cancel", "long").returncode == 0
    result = _array_result(workspace, "long", timeout=30)
    assert result["status"] == "cancelled"
    assert result["counts"] == {"cancelled": 20}
    errors = [t["error"] for t in result["tasks"]]
    assert errors.count("the job was cancelled") == 2, errors
    assert errors.count("the job was cancelled before it ran") == 18
    assert daemon.get("/api/jobs/long").json()["tasks"]["text"] == "20/20 tasks done, 20 cancelled"


def test_kill_9_of_the_daemon_during_a_200_task_array_commits_every_task_exactly_once(
        workspace: Workspace, daemon: DaemonProcess) -> None:
    daemon.start()
    workspace.drop("big.yaml", {"program": "echo", "args": ["task {n}"], "matrix": {"n": list(range(200))}})
    wait_until(lambda: _progress(workspace, "big").get("done", 0) >= 40, timeout=60, what="40 tasks done")
    daemon.kill()
    # what was committed before the kill, as it lies in the array's folder being assembled
    assembling = workspace.state / "spool" / "big" / "tasks"
    before = {entry.name: (assembling / entry.name / "result.yaml").read_text()
              for entry in os.scandir(assembling) if not entry.name.startswith(".")}
    assert len(before) >= 40
    daemon.start()
    result = _array_result(workspace, "big", timeout=120)
    assert result["status"] == "succeeded", result["counts"]
    assert result["counts"] == {"succeeded": 200}
    assert [t["index"] for t in result["tasks"]] == list(range(200))
    folder = workspace.outbox / "big" / "tasks"
    assert sorted(os.listdir(folder), key=int) == [str(i) for i in range(200)], "one folder per task, no leftover"
    for i in range(200):
        assert (folder / str(i) / "stdout.txt").read_text().startswith(f"task {i}\n")
    for name, text in before.items():
        assert (folder / name / "result.yaml").read_text() == text, f"task {name} ran again after it committed"
    assert sorted(os.listdir(workspace.outbox)) == ["big"]


def test_a_glob_matching_nothing_and_too_many_tasks_are_rejected_with_the_reason(
        workspace: Workspace, daemon: DaemonProcess) -> None:
    workspace.configure(jobs={"max_tasks": 5})
    daemon.start()
    workspace.drop("empty.yaml", {"program": "echo", "matrix": {"f": {"glob": "none/*.csv"}}})
    workspace.drop("wide.yaml", {"program": "echo", "matrix": {"a": [1, 2, 3], "b": [1, 2]}})
    results = workspace.wait_results(2)
    assert results["empty"]["status"] == "rejected"
    assert "matches no file in inbox/" in results["empty"]["error"]
    assert results["wide"]["status"] == "rejected"
    assert "makes 6 tasks (3 × 2); the limit is 5 (jobs.max_tasks)" in results["wide"]["error"]


def test_submit_matrix_then_show_and_logs_of_one_task(workspace: Workspace, daemon: DaemonProcess) -> None:
    daemon.start()
    done = dropq(workspace.config, "submit", "echo", "--matrix", "x=a,b", "--matrix", "y=1,2,3", "--name", "cli",
                 "--wait", "--", "{x}-{y}")
    assert done.returncode == 0, done.stderr
    shown = dropq(workspace.config, "show", "cli")
    assert "# 6/6 tasks done" in shown.stdout
    logs = dropq(workspace.config, "logs", "cli", "--task", "4", "--stdout")
    assert logs.returncode == 0 and logs.stdout.splitlines()[0] == "b-2"
    missing = dropq(workspace.config, "logs", "cli", "--task", "6")
    assert missing.returncode == 2 and "tasks 0 to 5" in missing.stderr
    one = dropq(workspace.config, "cancel", "cli/2")
    assert one.returncode == 2 and "dropq cancel cli" in one.stderr


def test_a_glob_array_on_docker_workers_and_a_job_after_it_reading_one_task_s_output(
        workspace: Workspace, daemon: DaemonProcess, docker_image: str) -> None:
    workspace.configure(workers={"pool": "docker", "count": 2, "docker": {"image": docker_image}})
    daemon.start()
    assert "worker pool: docker" in daemon.log_text()
    for name in ("a", "b", "c"):
        workspace.put(f"texts/{name}.txt", f"{name}{name} {name}{name}\n")
    # the job after the array is dropped first: it waits for the array's one folder
    workspace.drop("after.yaml", {"program": "concat", "input": "outbox:texts/tasks/1/output/counts.txt"})
    workspace.drop("texts.yaml", {"program": "wordcount", "input": "{t}", "output": "counts.txt",
                                  "matrix": {"t": {"glob": "texts/*.txt"}}})
    results = workspace.wait_results(2, timeout=120)
    assert results["texts"]["status"] == "succeeded", results["texts"]
    for i, name in enumerate("abc"):
        assert (workspace.outbox / "texts" / "tasks" / str(i) / "output" / "counts.txt").read_text() == (
            f"2 {name}{name}\n")
    assert results["after"]["status"] == "succeeded", results["after"]
    assert (workspace.outbox / "after" / "stdout.txt").read_text() == "2 bb\n"
