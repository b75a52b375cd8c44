"""Small helpers shared by tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any


def processes_mentioning(text: str) -> list[int]:
    """Pids of processes (other than this one) whose command line contains `text`."""
    me = os.getpid()
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as fh:
                cmdline = fh.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(int(entry.name))
    return found


def dropq(config: Path, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run the real `dropq` entry point."""
    return subprocess.run([sys.executable, "-m", "dropq", "--config", str(config), *args],
                          capture_output=True, text=True, timeout=timeout)


def dropq_json(config: Path, *args: str) -> Any:
    done = dropq(config, *args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def remove_containers(state: Path) -> int:
    """Remove the worker containers of the daemon whose state directory is `state` (by label)."""
    try:
        import docker

        client = docker.from_env(timeout=10)
        found = client.containers.list(all=True, filters={"label": f"io.dropq.state={state.resolve()}"})
    except Exception:  # noqa: BLE001 - no engine: nothing of ours can be running on it
        return 0
    for container in found:
        container.remove(force=True)
    client.close()
    return len(found)


def containers_of(state: Path) -> dict[str, Any]:
    """The running worker containers of the daemon on `state`, by worker name."""
    import docker

    client = docker.from_env(timeout=10)
    found = client.containers.list(filters={"label": f"io.dropq.state={state.resolve()}"})
    return {c.labels["io.dropq.worker"]: c for c in found}
