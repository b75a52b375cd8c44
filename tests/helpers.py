"""Small helpers shared by tests."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def exclusive(name: str) -> Iterator[None]:
    """Hold a lock shared by every test process of this machine: the suite runs in two processes
    (pytest-xdist), and what it builds once and keeps (an image, a wheelhouse) must not be built by both at
    the same time. The second waits, then finds it made."""
    with open(Path(tempfile.gettempdir()) / f"dropq-tests-{name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def processes_in(root: Path) -> list[int]:
    """Pids of processes (other than this one) that mention `root` in their command line or work inside it: a
    job forked from a warm interpreter has its fork server's command line, but its cwd is its staging folder."""
    found = set(processes_mentioning(str(root)))
    me, prefix = os.getpid(), str(root.resolve()) + "/"
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            cwd = os.readlink(f"/proc/{entry.name}/cwd")
        except OSError:
            continue
        if (cwd + "/").startswith(prefix):
            found.add(int(entry.name))
    return sorted(found)


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


def wait_until(predicate: Callable[[], Any], *, timeout: float = 30.0, what: str = "the condition") -> Any:
    """Poll `predicate` until it returns something true (returned), or fail after `timeout` seconds.
    Tests wait for a state this way, never with a fixed sleep that hopes the state has come."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def job_status(config: Path, job_id: str) -> str | None:
    """The job's status in the store (through `dropq show`), or None while it has no record yet."""
    shown = dropq(config, "show", job_id, "--json")
    return str(json.loads(shown.stdout)["status"]) if shown.returncode == 0 else None


def wait_for_status(config: Path, job_id: str, *statuses: str, timeout: float = 30.0) -> str:
    """Wait until the job `job_id` is in one of `statuses`; the status it reached."""
    return str(wait_until(lambda: (s := job_status(config, job_id)) in statuses and s, timeout=timeout,
                          what=f"{job_id} to be {' or '.join(statuses)}"))


def meta(config: Path, key: str) -> str:
    """One of the daemon's published figures (`dropq status --json`'s daemon section)."""
    return str(dropq_json(config, "status")["daemon"].get(key, ""))


def engine(timeout: float = 10) -> Any | None:
    """A client of the Docker engine (the caller closes it), or None when no engine answers.

    Tests reach the engine only through here: docker-py itself leaks its socket when no engine answers
    (docker/docker-py#3356), which pytest's filterwarnings=error turns into an error in a later test."""
    from dropq.errors import EngineUnavailable
    from dropq.pools.engine import engine_client

    try:
        return engine_client(timeout=timeout)
    except EngineUnavailable:
        return None


class PipeLines:
    """The lines of a child's output pipe, read by a thread as they come.

    A test waits for one line with a timeout, then takes the rest. Never mix readline() on the pipe with
    communicate(): the text wrapper's buffer already holds lines that communicate() never sees."""

    def __init__(self, pipe: IO[bytes] | None) -> None:
        assert pipe is not None, "the child's stream must be subprocess.PIPE"
        self._lines: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._read, args=(pipe,), daemon=True)
        self._thread.start()

    def _read(self, pipe: IO[bytes]) -> None:
        with pipe:
            for line in pipe:
                self._lines.put(line.decode())
        self._lines.put(None)  # end of the stream

    def next(self, timeout: float) -> str:
        """The next line; AssertionError if none comes within `timeout` or the stream ends."""
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no line within {timeout}s") from None
        assert line is not None, "the stream ended"
        return line

    def rest(self, timeout: float) -> str:
        """Every further line, once the stream has ended (within `timeout`)."""
        deadline = time.monotonic() + timeout
        out: list[str] = []
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"the stream did not end within {timeout}s; so far {out}") from None
            if line is None:
                self._thread.join()
                return "".join(out)
            out.append(line)


def remove_containers(state: Path) -> int:
    """Remove the worker containers of the daemon whose state directory is `state` (by label)."""
    client = engine()
    if client is None:
        return 0  # no engine: nothing of ours can be running on it
    try:
        found = client.containers.list(all=True, filters={"label": f"io.dropq.state={state.resolve()}"})
        for container in found:
            container.remove(force=True)
    finally:
        client.close()
    return len(found)


def containers_of(state: Path) -> dict[str, Any]:
    """The running worker containers of the daemon on `state`, by worker name."""
    client = engine()
    assert client is not None, "no Docker engine answers"
    found = client.containers.list(filters={"label": f"io.dropq.state={state.resolve()}"})
    return {c.labels["io.dropq.worker"]: c for c in found}


#: rows of the fault-injection table, printed at the end of the run
FAULT_ROWS: list[tuple[str, int, int, int, int, int, int]] = []


def account(name: str, *, workspace: Any, expected: set[str], faults: int) -> dict[str, int]:
    """Count what became of the `expected` job ids: committed once, lost, duplicated, or stuck."""
    folders = {n for n in os.listdir(workspace.outbox) if not n.startswith(".")}
    committed = expected & folders
    duplicated = len(folders - expected)
    missing = expected - committed
    inbox = {n.rsplit(".", 1)[0] for n in os.listdir(workspace.inbox)}
    spool = set(os.listdir(workspace.state / "spool")) if (workspace.state / "spool").exists() else set()
    stuck = len(missing & (inbox | spool))
    lost = len(missing) - stuck
    FAULT_ROWS.append((name, len(expected), faults, len(committed), lost, duplicated, stuck))
    return {"committed": len(committed), "lost": lost, "duplicated": duplicated, "stuck": stuck}


#: rows of the security table: (attack, tried, contained, escaped)
SECURITY_ROWS: list[tuple[str, int, int, int]] = []


def record_attack(name: str, tried: int, contained: int) -> None:
    SECURITY_ROWS.append((name, tried, contained, tried - contained))
