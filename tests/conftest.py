"""Fixtures: a temporary workspace, a real daemon subprocess on it, and guards against leaks.

Workspaces live in short folders under /tmp (a Unix socket path may not pass 107 bytes). Everything a
test starts is found again by its workspace path and killed by pid at teardown, so a failing test
never leaves a daemon or worker behind to disturb the next run.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import engine, exclusive, processes_in, remove_containers  # noqa: E402

#: the worker image docker tests use; another tag (DROPQ_TEST_IMAGE=dropq-worker:mybranch) lets a branch
#: that changes worker/ test its own image without rebuilding the shared latest one
WORKER_IMAGE = os.environ.get("DROPQ_TEST_IMAGE", "dropq-worker:latest")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--faults-heavy", action="store_true",
                     help="run the fault-injection suite at its heavier settings (more jobs, more faults)")


#: the tables' rows as this process's reports carried them in (with pytest-xdist, from every test process)
_TABLES: dict[str, list[tuple[Any, ...]]] = {"fault": [], "security": []}
#: how many of this process's rows have been sent along with a report
_SENT: dict[str, int] = {"fault": 0, "security": 0}


def _send_rows(report: pytest.TestReport) -> None:
    """Put the table rows this test recorded on its last report: the report, not the process, reaches the
    process that prints the summary when the suite runs in several (pytest-xdist)."""
    from helpers import FAULT_ROWS, SECURITY_ROWS

    for kind, rows in (("fault", FAULT_ROWS), ("security", SECURITY_ROWS)):
        new = rows[_SENT[kind]:]
        _SENT[kind] = len(rows)
        if new:
            report.user_properties.append((f"dropq-{kind}-rows", [list(row) for row in new]))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    for name, value in report.user_properties:
        kind = name.removeprefix("dropq-").removesuffix("-rows")
        if kind in _TABLES and name == f"dropq-{kind}-rows" and isinstance(value, list):
            _TABLES[kind].extend(tuple(row) for row in value)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    tables: list[tuple[str, Sequence[tuple[Any, ...]], tuple[str, ...]]] = [
        ("fault injection: every job must be committed exactly once", _TABLES["fault"],
         ("fault", "submitted", "faults", "committed", "lost", "duplicated", "stuck")),
        ("security: every attack must be contained", _TABLES["security"],
         ("attack", "tried", "contained", "escaped")),
    ]
    for title, rows, head in tables:
        if not rows:
            continue
        widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
        terminalreporter.section(title)
        for row in [head, *rows]:
            terminalreporter.write_line("  ".join(str(c).rjust(w) if i else str(c).ljust(w)
                                                  for i, (c, w) in enumerate(zip(row, widths, strict=True))))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """With DROPQ_REQUIRE_ALL=1 (CI sets it), a test that skips fails instead: CI installs every tool a
    test needs (Docker, debootstrap, GNU parallel, systemd-analyze, chromium), so a skip there means a
    test silently stopped testing anything."""
    outcome: Any = yield
    report = outcome.get_result()
    if report.when == "teardown":
        _send_rows(report)
    if report.skipped and not hasattr(report, "wasxfail") and os.environ.get("DROPQ_REQUIRE_ALL") == "1":
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"DROPQ_REQUIRE_ALL=1, but the test skipped: {reason}"


def _skip_or_fail(reason: str) -> NoReturn:
    # Docker tests may skip on a machine without an engine, but CI (DROPQ_REQUIRE_DOCKER=1) must see
    # them fail instead: a skipped sandbox test proves nothing.
    if os.environ.get("DROPQ_REQUIRE_DOCKER") == "1":
        pytest.fail(f"DROPQ_REQUIRE_DOCKER=1 but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def docker_image() -> str:
    """The worker image on a real engine, built (from Debian packages) when missing or out of date."""
    client = engine()
    if client is None:
        _skip_or_fail("no Docker engine answers")
    from dropq.errors import DropqError
    from dropq.pools.image import build, image_is_current

    try:
        with exclusive("worker-image"):
            if not image_is_current(client, WORKER_IMAGE):
                try:
                    build(WORKER_IMAGE, from_debian=True)
                except DropqError as exc:
                    _skip_or_fail(f"the worker image could not be built: {exc}")
    finally:
        client.close()
    return WORKER_IMAGE


def _merge(into: dict[str, Any], changes: dict[str, Any]) -> None:
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


class Workspace:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.inbox = root / "inbox"
        self.outbox = root / "outbox"
        self.programs = root / "programs"
        self.state = root / "state"
        self.config = root / "config.yaml"
        self.settings: dict[str, Any] = {
            "workers": {"pool": "local", "count": 2},
            "intake": {"rescan": 1, "settle": 0.5, "input_grace": 2},
            "jobs": {"kill_grace": 1},
            "retry": {"base": 0.1, "factor": 2, "cap": 1},
            "log_level": "debug",
            # a free port each: tests run daemons side by side, and never on the operator's 8787
            "http": {"port": 0},
            # the tests' jobs are small: a nearly full CI disk must not pause claiming (tests/test_disk.py
            # sets its own)
            "disk": {"min_free": "1m"},
        }

    def configure(self, **overrides: Any) -> None:
        """Merge `overrides` into the current settings (at any depth) and write config.yaml.

        Merged, never rebuilt from the defaults: a fixture's settings (the docker pool of a sandbox
        test) must survive a test's own `configure(jobs=...)`."""
        _merge(self.settings, overrides)
        self.config.write_text(yaml.safe_dump(self.settings))

    def drop(self, name: str, manifest: dict[str, Any] | str) -> Path:
        """Drop a manifest the way `dropq submit` does: write a dotfile, rename it in."""
        text = manifest if isinstance(manifest, str) else yaml.safe_dump(manifest)
        tmp = self.inbox / f".{name}.tmp"
        tmp.write_text(text)
        os.rename(tmp, self.inbox / name)
        return self.inbox / name

    def put(self, name: str, data: str) -> Path:
        path = self.inbox / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.part")
        tmp.write_text(data)
        os.rename(tmp, path)
        return path

    def result(self, job_id: str) -> dict[str, Any]:
        return yaml.safe_load((self.outbox / job_id / "result.yaml").read_text())

    def results(self) -> dict[str, dict[str, Any]]:
        out = {}
        for folder in self.outbox.iterdir():
            if not folder.name.startswith(".") and (folder / "result.yaml").exists():
                out[folder.name] = yaml.safe_load((folder / "result.yaml").read_text())
        return out

    def wait_results(self, count: int, timeout: float = 60.0) -> dict[str, dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.results()
            if len(found) >= count:
                return found
            time.sleep(0.05)
        found = self.results()
        raise AssertionError(f"only {len(found)} of {count} results after {timeout}s: {sorted(found)[:10]}")


@pytest.fixture
def workspace() -> Iterator[Workspace]:
    root = Path(tempfile.mkdtemp(prefix="dq-"))
    ws = Workspace(root)
    for folder in (ws.inbox, ws.outbox):
        folder.mkdir()
    shutil.copytree(ROOT / "programs", ws.programs)
    ws.configure()
    yield ws
    for pid in processes_in(root):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue  # it ended between the look and the kill
    remove_containers(ws.state)
    shutil.rmtree(root, ignore_errors=True)


class DaemonProcess:
    def __init__(self, ws: Workspace) -> None:
        self.ws = ws
        self.log = ws.root / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *, wait: bool = True, env: dict[str, str] | None = None,
              run_args: tuple[str, ...] = ()) -> DaemonProcess:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self._offset = self.log.stat().st_size if self.log.exists() else 0
        self._log_fh = open(self.log, "ab")  # closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dropq", "--config", str(self.ws.config), "run", *run_args],
            stdout=self._log_fh, stderr=subprocess.STDOUT, cwd=self.ws.root, env={**os.environ, **(env or {})},
        )
        if wait:
            self.wait_running()
        return self

    def wait_running(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.log_text()}")
            if b"dropq is running" in self.log.read_bytes()[self._offset:]:
                return
            time.sleep(0.05)
        raise AssertionError(f"daemon did not start:\n{self.log_text()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        self._log_fh.close()
        return code

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    @property
    def url(self) -> str:
        """The dashboard's address, as the daemon published it (http.port is 0 in tests)."""
        import sqlite3

        db = sqlite3.connect(f"file:{self.ws.state / 'dropq.sqlite3'}?mode=ro", uri=True)
        try:
            row = db.execute("SELECT value FROM meta WHERE key = 'http'").fetchone()
        finally:
            db.close()
        assert row and row[0], "the daemon published no dashboard address"
        return str(row[0])

    def get(self, path: str, **kwargs: Any) -> Any:
        """GET from the daemon's HTTP API (on loopback)."""
        import requests

        return requests.get(self.url.rstrip("/") + path, timeout=10, **kwargs)


@pytest.fixture
def daemon(workspace: Workspace) -> Iterator[DaemonProcess]:
    proc = DaemonProcess(workspace)
    yield proc
    if proc.proc is not None and proc.proc.poll() is None:
        proc.stop()
    if proc.log.exists():  # shown by pytest only when the test failed
        print(f"--- daemon log ---\n{proc.log_text()[-20000:]}")
