"""A full disk (issue 17): below disk.min_free the daemon stops claiming and says so, and claims again
by itself once space returns; a job that fills the disk fails with the reason and leaves nothing corrupt.
On a real, small tmpfs filesystem mounted for the test (root needed: CI runs as root)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import ROOT, DaemonProcess, Workspace
from helpers import dropq, dropq_json, wait_for_status, wait_until

FILL = '''import os
with open(os.path.join(os.environ["DROPQ_OUTPUT"], "fill.bin"), "wb") as fh:
    while True:
        fh.write(b"x" * 1048576)
        fh.flush()
'''


@pytest.fixture
def small_ws() -> Iterator[Workspace]:
    """A workspace on a 48 MiB tmpfs of its own."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small filesystem needs root")
    point = Path(tempfile.mkdtemp(prefix="dq-disk-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(point)], check=True)
    try:
        ws = Workspace(point / "ws")
        for folder in (ws.root, ws.inbox, ws.outbox):
            folder.mkdir()
        shutil.copytree(ROOT / "programs", ws.programs)
        (ws.programs / "fill.py").write_text(FILL)
        ws.configure()
        yield ws
    finally:
        subprocess.run(["pkill", "-9", "-f", str(point)], check=False)
        subprocess.run(["umount", "-l", str(point)], check=True)
        point.rmdir()


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def test_claiming_pauses_below_min_free_and_resumes_by_itself(small_ws: Workspace) -> None:
    small_ws.configure(disk={"min_free": "16m"})
    daemon = DaemonProcess(small_ws).start()
    try:
        # leave 8 MiB free: below disk.min_free
        ballast = small_ws.root / "ballast"
        with open(ballast, "wb") as fh:
            fh.write(b"\0" * (free_bytes(small_ws.root) - 8 * 1048576))
        wait_until(lambda: "claiming paused" in dropq(small_ws.config, "status").stdout, timeout=30,
                   what="dropq status to say claiming is paused")
        small_ws.drop("p1.yaml", {"program": "echo", "args": ["back"]})
        # the intake saw it, and left it waiting in the inbox, unclaimed
        wait_until(lambda: "p1.yaml waits in the inbox: free space is below disk.min_free" in daemon.log_text(),
                   timeout=30, what="the manifest to be held back")
        assert (small_ws.inbox / "p1.yaml").exists()
        assert dropq_json(small_ws.config, "jobs", "--json") == []
        assert "dropq_claiming_paused_disk 1.0" in daemon.get("/metrics").text
        assert "disk.min_free" in daemon.get("/api/summary").json()["disk_low"]
        ballast.unlink()
        assert wait_for_status(small_ws.config, "p1", "succeeded", "failed", timeout=30) == "succeeded"
        wait_until(lambda: "claiming paused" not in dropq(small_ws.config, "status").stdout, timeout=30,
                   what="the pause to end")
        assert "dropq_claiming_paused_disk 0.0" in daemon.get("/metrics").text
        log = daemon.log_text()
        assert "claiming paused:" in log and "claiming resumed" in log
    finally:
        daemon.stop()


def test_a_job_that_fills_the_disk_fails_with_the_reason_and_harms_nothing(small_ws: Workspace) -> None:
    small_ws.configure(disk={"min_free": "1m"})
    daemon = DaemonProcess(small_ws).start()
    try:
        small_ws.drop("before.yaml", {"program": "echo", "args": ["kept"]})
        assert wait_for_status(small_ws.config, "before", "succeeded", "failed") == "succeeded"
        small_ws.drop("filler.yaml", {"program": "fill"})
        assert wait_for_status(small_ws.config, "filler", "succeeded", "failed", timeout=60) == "failed"
        result = small_ws.result("filler")
        assert "No space left on device" in result["error"] or "filled the disk" in result["error"], result
        assert result["attempts"] == 1, "a job that fills the disk is not run again"
        # what was committed before is intact, and the daemon goes on taking jobs
        assert (small_ws.outbox / "before" / "stdout.txt").read_text().startswith("kept\n")
        small_ws.drop("after.yaml", {"program": "echo", "args": ["still"]})
        assert wait_for_status(small_ws.config, "after", "succeeded", "failed", timeout=60) == "succeeded"
    finally:
        daemon.stop()
