"""Retention (issue 17): published job folders removed by age and by total size, by the daemon and by
`dropq prune`, with the jobs still counted; a real daemon, real jobs, real folders."""

from __future__ import annotations

import os
from pathlib import Path

from conftest import DaemonProcess, Workspace
from helpers import dropq, dropq_json, wait_for_status, wait_until

WRITE = '''import os, sys
with open(os.path.join(os.environ["DROPQ_OUTPUT"], "data.bin"), "wb") as fh:
    fh.write(b"x" * int(sys.argv[1]))
'''


def folders(ws: Workspace) -> set[str]:
    return {n for n in os.listdir(ws.outbox) if not n.startswith(".")}


def run_all(ws: Workspace, names: list[str], program: str = "echo", args: list[str] | None = None) -> None:
    for name in names:  # one after the other, so that their finish times are in this order
        ws.drop(f"{name}.yaml", {"program": program, "args": args or ["hi"]})
        wait_for_status(ws.config, name, "succeeded", "failed")


def test_the_daemon_removes_folders_past_max_age_and_keeps_the_jobs(workspace: Workspace,
                                                                     daemon: DaemonProcess) -> None:
    workspace.configure(retention={"max_age": "2s", "check_every": 0.5})
    daemon.start()
    run_all(workspace, ["old1", "old2"])
    wait_until(lambda: not folders(workspace), timeout=30, what="the folders past max_age to be removed")
    # the jobs are still there, counted and listed, and say what became of their folders
    assert dropq_json(workspace.config, "status")["jobs"]["succeeded"] == 2
    assert {j["id"] for j in dropq_json(workspace.config, "jobs", "--json")} == {"old1", "old2"}
    shown = dropq(workspace.config, "show", "old1")
    assert "removed by retention" in shown.stdout, shown.stdout
    assert "retention: removed" in daemon.log_text() or "removed (retention)" in daemon.log_text()


def test_the_daemon_keeps_the_outbox_under_max_bytes_removing_the_oldest(workspace: Workspace,
                                                                         daemon: DaemonProcess) -> None:
    (workspace.programs / "write.py").write_text(WRITE)
    workspace.configure(retention={"max_bytes": "35k", "check_every": 0.5})
    daemon.start()
    run_all(workspace, ["s1", "s2", "s3", "s4", "s5"], program="write", args=["10240"])
    # each folder holds 10 KiB and a few hundred bytes of result.yaml: three fit in 35 KiB, five do not
    wait_until(lambda: folders(workspace) == {"s3", "s4", "s5"}, timeout=30,
               what=f"the two oldest folders to be removed (have {sorted(folders(workspace))})")
    assert dropq_json(workspace.config, "status")["jobs"]["succeeded"] == 5


def test_prune_by_hand_by_age_and_status_with_a_dry_run_first(workspace: Workspace, daemon: DaemonProcess,
                                                              tmp_path: Path) -> None:
    daemon.start()
    run_all(workspace, ["ok1", "ok2"])
    run_all(workspace, ["bad"], program="fail")
    refused = dropq(workspace.config, "prune")
    assert refused.returncode == 2 and "--older-than" in refused.stderr
    dry = dropq(workspace.config, "prune", "--older-than", "0s", "--status", "failed", "--dry-run")
    assert dry.returncode == 0 and "would remove 1 job folder(s)" in dry.stdout and "bad" in dry.stdout
    assert folders(workspace) == {"ok1", "ok2", "bad"}
    done = dropq_json(workspace.config, "prune", "--older-than", "0s", "--status", "failed", "--json")
    assert [j["id"] for j in done["jobs"]] == ["bad"] and done["freed_bytes"] > 0
    assert folders(workspace) == {"ok1", "ok2"}
    # a link someone put where a folder was is removed, never followed
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "keep.txt").write_text("mine")
    os.rename(workspace.outbox / "ok1", tmp_path / "moved-away")
    (workspace.outbox / "ok1").symlink_to(outside)
    everything = dropq(workspace.config, "prune", "--older-than", "0s")
    assert "removed 2 job folder(s)" in everything.stdout, everything.stdout
    assert not folders(workspace) and (outside / "keep.txt").read_text() == "mine"
    # pruned jobs are not pruned twice
    again = dropq(workspace.config, "prune", "--older-than", "0s")
    assert "removed 0 job folder(s)" in again.stdout
    counts = dropq_json(workspace.config, "status")["jobs"]
    assert (counts["succeeded"], counts["failed"]) == (2, 1)
