"""Programs with dependencies (issue 12), with real packages from the package index, real builds (uv on
the host for the local pool, a build container for the docker pool) and a real daemon.

What is shown: a PEP 723 program and a folder program run with their packages on both pools; a compiled
wheel (numpy) too; fifty jobs of one program make exactly one build; a requirement that does not exist
fails its job with its name and the build's log; an air-gapped build from a wheelhouse; a daemon killed
during a build builds again and loses no job; `dropq env build|list|prune`.
"""

from __future__ import annotations

import http.server
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import DaemonProcess, Workspace
from helpers import dropq, dropq_json, exclusive, processes_mentioning, wait_for_status, wait_until

TAB = '''# /// script
# requires-python = ">=3.11"
# dependencies = ["tabulate>=0.9"]
# ///
import sys
from tabulate import tabulate
print(tabulate([["a", 1], ["b", 2]], headers=["key", "value"]))
print("interpreter:", sys.executable)
'''

NUMPY = '''# /// script
# dependencies = ["numpy"]
# ///
import numpy
print("sum", int(numpy.arange(10).sum()), "numpy", numpy.__version__)
'''

MISSING = '''# /// script
# dependencies = ["this-package-does-not-exist==1.0"]
# ///
print("never")
'''

#: where a wheelhouse of tabulate is kept between runs (filled from the package index once)
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dropq-tests" / "wheelhouse"


@pytest.fixture(params=["local", "docker"])
def env_ws(request: pytest.FixtureRequest, workspace: Workspace) -> Workspace:
    """A workspace on the local or the docker pool, with the programs these tests run."""
    if request.param == "docker":
        image = request.getfixturevalue("docker_image")
        workspace.configure(workers={"pool": "docker", "count": 2, "docker": {"image": image}})
    (workspace.programs / "tab.py").write_text(TAB)
    return workspace


def envs_of(ws: Workspace) -> list[dict[str, Any]]:
    return list(dropq_json(ws.config, "env", "list", "--json"))


def pool_of(ws: Workspace) -> str:
    return str(dropq_json(ws.config, "status")["daemon"]["pool"])


def folder_program(ws: Workspace) -> None:
    folder = ws.programs / "report"
    folder.mkdir()
    (folder / "requirements.txt").write_text("tabulate>=0.9\n")
    (folder / "helper.py").write_text("def title():\n    return 'from helper'\n")
    (folder / "data.csv").write_text("x,1\ny,2\n")
    (folder / "main.py").write_text(
        "import csv, pathlib, helper\nfrom tabulate import tabulate\n"
        "rows = list(csv.reader(open(pathlib.Path(__file__).parent / 'data.csv')))\n"
        "print(helper.title())\nprint(tabulate(rows))\n")


def test_a_pep_723_program_runs_with_its_dependency(env_ws: Workspace, daemon: DaemonProcess) -> None:
    daemon.start()
    env_ws.drop("t1.yaml", {"program": "tab"})
    assert wait_for_status(env_ws.config, "t1", "succeeded", "failed", timeout=180) == "succeeded", \
        env_ws.result("t1")
    result = env_ws.result("t1")
    stdout = (env_ws.outbox / "t1" / "stdout.txt").read_text()
    assert "key      value" in stdout
    env = result["environment"]
    assert [p for p in env["packages"] if p.startswith("tabulate==")], env
    # it ran on the pool the test asked for, with the interpreter of its environment
    kind = pool_of(env_ws)
    where = f"/dropq/envs/{env['id']}/bin/python" if kind.startswith("docker") else \
        f"{env_ws.state / 'envs' / env['id']}/bin/python"
    assert f"interpreter: {where}" in stdout, (kind, stdout)
    assert [e["id"] for e in envs_of(env_ws)] == [env["id"]]


def test_a_folder_program_with_requirements_its_own_module_and_a_data_file(env_ws: Workspace,
                                                                           daemon: DaemonProcess) -> None:
    folder_program(env_ws)
    daemon.start()
    env_ws.drop("r1.yaml", {"program": "report"})
    assert wait_for_status(env_ws.config, "r1", "succeeded", "failed", timeout=180) == "succeeded", \
        env_ws.result("r1")
    stdout = (env_ws.outbox / "r1" / "stdout.txt").read_text()
    assert stdout.startswith("from helper\n") and "x  1" in stdout
    assert envs_of(env_ws)[0]["declared_in"] == "report/requirements.txt"


def test_a_program_using_a_compiled_wheel(env_ws: Workspace, daemon: DaemonProcess) -> None:
    (env_ws.programs / "np.py").write_text(NUMPY)
    daemon.start()
    env_ws.drop("n1.yaml", {"program": "np"})
    assert wait_for_status(env_ws.config, "n1", "succeeded", "failed", timeout=300) == "succeeded", \
        env_ws.result("n1")
    assert "sum 45 numpy" in (env_ws.outbox / "n1" / "stdout.txt").read_text()


def test_fifty_jobs_of_one_program_make_exactly_one_build(env_ws: Workspace, daemon: DaemonProcess) -> None:
    daemon.start()
    for n in range(50):
        env_ws.drop(f"many-{n:02}.yaml", {"program": "tab"})
    results = env_ws.wait_results(50, timeout=240)
    assert {r["status"] for r in results.values()} == {"succeeded"}
    envs = envs_of(env_ws)
    assert len(envs) == 1 and envs[0]["builds"] == 1, envs
    assert daemon.log_text().count(f"environment {envs[0]['id'][:8]}: building (") == 1


def test_a_requirement_that_does_not_exist_fails_its_jobs_with_its_name(env_ws: Workspace,
                                                                       daemon: DaemonProcess) -> None:
    (env_ws.programs / "missing.py").write_text(MISSING)
    daemon.start()
    env_ws.drop("m1.yaml", {"program": "missing"})
    assert wait_for_status(env_ws.config, "m1", "succeeded", "failed", timeout=180) == "failed"
    result = env_ws.result("m1")
    assert "this-package-does-not-exist" in result["error"] and "\n" not in result["error"], result["error"]
    build_log = (env_ws.outbox / "m1" / "env-build.log").read_text()
    assert "this-package-does-not-exist" in build_log
    # within environments.retry_failed_after, the next job fails at once: no second build
    env_ws.drop("m2.yaml", {"program": "missing"})
    assert wait_for_status(env_ws.config, "m2", "succeeded", "failed", timeout=60) == "failed"
    assert "this-package-does-not-exist" in env_ws.result("m2")["error"]
    assert (env_ws.outbox / "m2" / "env-build.log").is_file()
    assert [e["builds"] for e in envs_of(env_ws)] == [1]


def wheelhouse() -> Path:
    """A folder holding tabulate's wheel, downloaded from the package index once and kept."""
    with exclusive("env-wheelhouse"):
        if not list(CACHE.glob("tabulate-*.whl")):
            CACHE.mkdir(parents=True, exist_ok=True)
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--only-binary", ":all:", "--no-deps",
                            "-d", str(CACHE), "tabulate==0.9.0"], check=True, timeout=300)
    return CACHE


def test_an_air_gapped_build_from_a_wheelhouse(env_ws: Workspace, daemon: DaemonProcess, tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    shutil.copytree(wheelhouse(), wheels)
    # no index at all: on the docker pool the build container then has no network either
    env_ws.configure(environments={"no_index": True, "find_links": str(wheels)})
    daemon.start()
    env_ws.drop("a1.yaml", {"program": "tab"})
    assert wait_for_status(env_ws.config, "a1", "succeeded", "failed", timeout=180) == "succeeded", \
        env_ws.result("a1")
    assert env_ws.result("a1")["environment"]["packages"] == ["tabulate==0.9.0"]


class GatedIndex:
    """A package index on loopback (PEP 503 simple pages and the wheel) that answers only once opened."""

    def __init__(self, wheels: Path) -> None:
        self.opened = threading.Event()
        self.asked = threading.Event()
        wheel = next(wheels.glob("tabulate-*.whl"))
        index = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_HEAD(self) -> None:
                self.answer(body_too=False)

            def do_GET(self) -> None:
                self.answer(body_too=True)

            def answer(self, *, body_too: bool) -> None:
                index.asked.set()
                index.opened.wait(120)
                if self.path.rstrip("/") == "/simple/tabulate":
                    body = f'<a href="/files/{wheel.name}">{wheel.name}</a>'.encode()
                    kind = "text/html"
                elif self.path == f"/files/{wheel.name}":
                    body, kind = wheel.read_bytes(), "application/octet-stream"
                else:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                try:
                    self.end_headers()
                    if body_too:
                        self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    return  # the client was a build the test killed with its daemon: nobody to answer

            def log_message(self, *args: Any) -> None:
                return

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/simple"

    def close(self) -> None:
        self.opened.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def gated_index() -> Iterator[GatedIndex]:
    index = GatedIndex(wheelhouse())
    yield index
    index.close()


def test_a_daemon_killed_during_a_build_builds_again_and_loses_no_job(
        workspace: Workspace, daemon: DaemonProcess, gated_index: GatedIndex) -> None:
    (workspace.programs / "tab.py").write_text(TAB)
    workspace.configure(environments={"index_url": gated_index.url})
    daemon.start()
    workspace.drop("k1.yaml", {"program": "tab"})
    # the job waits, queued, and says why, while the build waits for the index
    waiting = wait_until(lambda: dropq_json(workspace.config, "status")["waiting_for_environments"],
                         timeout=60, what="a job waiting for its environment")
    assert waiting[0]["jobs"] == 1 and "building environment" in waiting[0]["reason"], waiting
    assert "(tabulate>=0.9)" in waiting[0]["reason"]
    shown = dropq_json(workspace.config, "show", "k1")
    assert shown["status"] == "queued" and "building environment" in shown["waiting"], shown
    # the dashboard shows what the API says
    summary = daemon.get("/api/summary").json()
    assert "building environment" in summary["waiting_for_environments"][0]["reason"], summary
    assert "building environment" in daemon.get("/api/jobs/k1").json()["waiting"]
    assert gated_index.asked.wait(60)
    # the build's processes name the environment's folder (workers name only the envs folder itself)
    building = f"{workspace.state / 'envs'}/"
    builders = processes_mentioning(building)
    assert builders, "no build process found"
    daemon.kill()
    daemon.start()
    # what the killed daemon left building is stopped before the build starts again
    wait_until(lambda: not set(builders) & set(processes_mentioning(building)),
               timeout=30, what="the orphaned build to be stopped")
    gated_index.opened.set()
    assert wait_for_status(workspace.config, "k1", "succeeded", "failed", timeout=120) == "succeeded", \
        workspace.result("k1")
    assert [e["builds"] for e in envs_of(workspace)] == [2]
    assert len(workspace.results()) == 1


def test_env_build_ahead_list_and_prune(workspace: Workspace, daemon: DaemonProcess) -> None:
    (workspace.programs / "tab.py").write_text(TAB)
    built = dropq(workspace.config, "env", "build", "tab", timeout=180)
    assert built.returncode == 0, built.stderr
    assert "is ready" in built.stdout and "tabulate==" in built.stdout
    listed = dropq(workspace.config, "env", "list")
    assert "ready" in listed.stdout and "the PEP 723 block of tab.py" in listed.stdout
    # a job of it runs without another build
    daemon.start()
    workspace.drop("b1.yaml", {"program": "tab"})
    assert wait_for_status(workspace.config, "b1", "succeeded", "failed", timeout=60) == "succeeded"
    assert "building (" not in daemon.log_text()
    env = envs_of(workspace)[0]
    assert env["builds"] == 1 and env["last_used"] is not None
    # prune: kept while unused for less than keep_days, removed with --older-than 0
    kept = dropq(workspace.config, "env", "prune")
    assert kept.returncode == 0 and "0 environment(s) removed" in kept.stdout
    assert (workspace.state / "envs" / env["id"]).is_dir()
    pruned = dropq(workspace.config, "env", "prune", "--older-than", "0")
    assert f"removed environment {env['id'][:8]}" in pruned.stdout, pruned.stdout
    assert envs_of(workspace) == [] and not (workspace.state / "envs" / env["id"]).exists()


def test_a_folder_program_with_an_executable_main_in_any_language(workspace: Workspace,
                                                                  daemon: DaemonProcess) -> None:
    folder = workspace.programs / "shell"
    folder.mkdir()
    (folder / "words.txt").write_text("alpha beta\n")
    main = folder / "main"
    main.write_text('#!/bin/sh\necho "args: $*"\nwc -w < "$(dirname "$0")/words.txt"\n')
    main.chmod(0o755)
    daemon.start()
    workspace.drop("s1.yaml", {"program": "shell", "args": ["x", "y"]})
    assert wait_for_status(workspace.config, "s1", "succeeded", "failed", "rejected") == "succeeded", \
        workspace.result("s1")
    assert (workspace.outbox / "s1" / "stdout.txt").read_text().split("\n")[:2] == ["args: x y", "2"]
    assert envs_of(workspace) == []


def test_a_program_declaring_nothing_builds_nothing(workspace: Workspace, daemon: DaemonProcess) -> None:
    said = dropq(workspace.config, "env", "build", "echo")
    assert said.returncode == 0 and "declares no dependencies" in said.stdout
    daemon.start()
    workspace.drop("e1.yaml", {"program": "echo", "args": ["hi"]})
    assert wait_for_status(workspace.config, "e1", "succeeded", "failed") == "succeeded"
    assert "environment" not in workspace.result("e1")
    assert envs_of(workspace) == []


def test_bad_declarations_reject_the_job_and_an_unmet_requires_python_fails_it(
        workspace: Workspace, daemon: DaemonProcess) -> None:
    folder = workspace.programs / "opts"
    folder.mkdir()
    (folder / "main.py").write_text("print('never')\n")
    (folder / "requirements.txt").write_text("--index-url https://evil.example/simple\ntabulate\n")
    (workspace.programs / "future.py").write_text('# /// script\n# requires-python = ">=4"\n'
                                                   '# dependencies = ["tabulate"]\n# ///\nprint("never")\n')
    daemon.start()
    workspace.drop("o1.yaml", {"program": "opts"})
    workspace.drop("f1.yaml", {"program": "future"})
    assert wait_for_status(workspace.config, "o1", "rejected", "failed", "succeeded") == "rejected"
    assert "opts/requirements.txt line 1: options such as '--index-url'" in workspace.result("o1")["error"]
    assert wait_for_status(workspace.config, "f1", "rejected", "failed", "succeeded") == "failed"
    assert "requires Python >=4" in workspace.result("f1")["error"]
