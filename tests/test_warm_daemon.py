"""Warm interpreters through a real daemon, on the local pool and on the docker pool (a real engine, the
worker image): a subset of the equivalence programs runs twice, once with `fresh_interpreter: true` in its
manifest and once forked, and the outbox holds the same status, exit code, stdout and stderr for both.
`which.py` tells from inside which way each arm ran (its parent is the fork server, or the worker)."""

from __future__ import annotations

from typing import Any

import pytest
from test_warm_equivalence import FOLDER, PROGRAMS

from conftest import DaemonProcess, Workspace

SUBSET = ["hello.py", "no_newline.py", "exit_string.py", "exit_code.py", "raise.py", "atexit.py", "threads.py",
          "signal_handlers.py", "fds.py", "process_group.py", "stdio_objects.py", "keyboard_interrupt.py",
          "finalizer.py", "subprocess_child.py", "large_output.py", "pkg/main.py"]

WHICH = ("import os\nparent = open(f'/proc/{os.getppid()}/cmdline', 'rb').read()\n"
         "print('forked' if b'forkserver.py' in parent else 'fresh')\n"
         "print('uid', 'root' if os.getuid() == 0 else 'own' if os.getuid() >= 1_600_000_000 else 'daemon')\n")


def _outcome(ws: Workspace, job_id: str) -> tuple[Any, ...]:
    result = ws.result(job_id)
    folder = ws.outbox / job_id
    return (result["status"], result["exit_code"], result.get("error"),
            (folder / "stdout.txt").read_text(errors="replace"), (folder / "stderr.txt").read_text(errors="replace"))


@pytest.mark.parametrize("pool", ["local", pytest.param("docker", marks=pytest.mark.docker),
                                  pytest.param("docker-job-uids", marks=pytest.mark.docker)])
def test_fresh_and_forked_jobs_through_the_daemon_look_the_same(
        pool: str, workspace: Workspace, daemon: DaemonProcess, request: pytest.FixtureRequest) -> None:
    # the worker's own uid for jobs, or (docker-job-uids) the hardened default: a uid per job, and the fork
    # server forks them all the same (README: The warm interpreter)
    workers: dict[str, Any] = {"pool": pool, "count": 1, "job_uids": None}
    if pool == "docker-job-uids":
        workers = {"pool": "docker", "count": 1}
        assert "job_uids" not in workspace.config.read_text()  # the default, per-job uids, holds
    if pool.startswith("docker"):
        workers["docker"] = {"image": request.getfixturevalue("docker_image")}
    workspace.configure(workers=workers)
    sources = {**PROGRAMS, **FOLDER}
    for name in [*SUBSET, *FOLDER]:
        path = workspace.programs / "warm" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(sources[name])
    (workspace.programs / "warm" / "which.py").write_text(WHICH)
    daemon.start()
    jobs = []
    for i, name in enumerate([*SUBSET, "which.py"]):
        for arm in ("fresh", "warm"):
            job_id = f"{arm}-{i}"
            manifest: dict[str, Any] = {"program": f"warm/{name}"}
            if arm == "fresh":
                manifest["fresh_interpreter"] = True
            workspace.drop(f"{job_id}.yaml", manifest)
            jobs.append(job_id)
    workspace.wait_results(len(jobs), timeout=240)
    for i, name in enumerate(SUBSET):
        assert _outcome(workspace, f"fresh-{i}") == _outcome(workspace, f"warm-{i}"), name
        # result.yaml says which way it ran
        assert "interpreter" not in workspace.result(f"fresh-{i}")
        assert workspace.result(f"warm-{i}")["interpreter"] == "forked"
    last = len(SUBSET)
    uid = "uid own" if pool == "docker-job-uids" else "uid daemon" if pool == "docker" else "uid"
    assert (workspace.outbox / f"fresh-{last}" / "stdout.txt").read_text().startswith(f"fresh\n{uid}")
    assert (workspace.outbox / f"warm-{last}" / "stdout.txt").read_text().startswith(f"forked\n{uid}")
