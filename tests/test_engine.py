"""Reaching the Docker engine: where none answers, one clear error and no leaked socket.

docker-py leaves its socket open when the engine does not answer (docker/docker-py#3356); collected
later, it is a ResourceWarning that pytest (filterwarnings=error) reports in whichever test runs then.
"""

from __future__ import annotations

import ast
import gc
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import ROOT
from dropq.config import Config
from dropq.errors import EngineUnavailable
from dropq.pools.docker import docker_available
from dropq.pools.engine import engine_client, engine_socket


@pytest.fixture(params=["missing", "refusing"])
def no_engine(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """DOCKER_HOST naming a socket path where nothing answers: no file at all, or a socket nobody accepts on."""
    path = tmp_path / "docker.sock"
    bound = None
    if request.param == "refusing":
        bound = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        bound.bind(str(path))  # bound but not listening: connect() is refused
    monkeypatch.setenv("DOCKER_HOST", f"unix://{path}")
    yield path
    if bound is not None:
        bound.close()


def test_no_engine_is_one_clear_error_and_leaks_no_socket(no_engine: Path, tmp_path: Path) -> None:
    with pytest.raises(EngineUnavailable, match=f"no Docker engine answers on {no_engine}"):
        engine_client(timeout=5)
    ok, why = docker_available(Config.from_mapping({}, base=tmp_path))
    assert not ok and why.startswith("no Docker engine answers"), why
    gc.collect()  # a leaked socket is reported here, in this test, not in a later one


@pytest.mark.parametrize(("host", "path"), [("", "/var/run/docker.sock"), ("unix:///x/d.sock", "/x/d.sock"),
                                            ("http+unix:///x/d.sock", "/x/d.sock"), ("tcp://127.0.0.1:2375", None)])
def test_the_socket_probed_is_the_one_docker_py_would_use(monkeypatch: pytest.MonkeyPatch, host: str,
                                                          path: str | None) -> None:
    monkeypatch.setenv("DOCKER_HOST", host)
    assert engine_socket() == path


def test_tests_reach_the_engine_only_through_the_probe() -> None:
    """`docker.from_env` in a test would bring the leak back on machines without an engine."""
    found = []
    for path in [*ROOT.glob("tests/**/*.py"), *ROOT.glob("bench/**/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("from_env", "DockerClient", "APIClient"):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert found == [], "use helpers.engine() instead"
