"""Array jobs end to end: a real daemon process, real local workers, real files (issue 13, Arrays).

Every check goes through files and the CLI: manifests dropped into inbox/, results read from outbox/.
"""

from __future__ import annotations

import os
from typing import Any

import yaml

from conftest import DaemonProcess, Workspace


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
