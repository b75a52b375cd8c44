"""A hostile drop folder: entries named *.yaml that are not plain files are rejected, each with an
outbox record, without reading their target and without blocking the daemon."""

from __future__ import annotations

import os

from conftest import DaemonProcess, Workspace


def test_links_fifos_folders_and_oversized_manifests_are_rejected_unread(workspace: Workspace,
                                                                        daemon: DaemonProcess) -> None:
    secret = workspace.root / "secret.yaml"
    secret.write_text("program: echo\n")
    daemon.start()
    os.symlink(secret, workspace.inbox / "symlink.yaml")
    os.link(secret, workspace.inbox / "hardlink.yaml")
    os.mkfifo(workspace.inbox / "fifo.yaml")  # reading it would block for ever
    (workspace.inbox / "folder.yaml").mkdir()
    (workspace.inbox / "folder.yaml" / "keep.txt").write_text("user data")
    workspace.drop("oversized.yaml", "program: echo\n" + "# padding\n" * 10_000)
    workspace.drop("fine.yaml", {"program": "echo", "args": ["still running"]})
    results = workspace.wait_results(6, timeout=30)
    reasons = {
        "symlink": "is a symlink", "hardlink": "has 2 hard links", "fifo": "is a FIFO",
        "folder": "is a directory", "oversized": "the limit is 65536",
    }
    for name, reason in reasons.items():
        assert results[name]["status"] == "rejected", (name, results[name])
        assert reason in results[name]["error"], (name, results[name]["error"])
    assert results["fine"]["status"] == "succeeded"
    assert secret.read_text() == "program: echo\n", "the symlink's target is untouched"
    assert not (workspace.outbox / "symlink" / "manifest.yaml").exists()
    assert (workspace.outbox / "folder" / "manifest-folder" / "keep.txt").read_text() == "user data"
    assert "manifest.yaml (not a regular file)" in results["fifo"]["dropped"]
    assert os.listdir(workspace.inbox) == []
