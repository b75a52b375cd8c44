"""`dropq image build`'s options, through the real entry point, without touching any engine's images."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def image_build(tmp_path: Path, *options: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "config.yaml").write_text("")
    # an engine that cannot answer: the options are parsed and acted on up to the first call to it
    env = {**os.environ, "DOCKER_HOST": f"unix://{tmp_path}/no-engine.sock"}
    return subprocess.run([sys.executable, "-m", "dropq", "--config", str(tmp_path / "config.yaml"), "image", "build",
                           "--tag", "dropq-test-never-built:latest", *options],
                          capture_output=True, text=True, env=env, timeout=60)


def test_from_debian_is_the_option_and_offline_a_deprecated_alias_that_says_so(tmp_path: Path) -> None:
    new = image_build(tmp_path, "--from-debian", "--mirror", "http://127.0.0.1:9/debian")
    assert "no Docker engine answers" in new.stderr and "deprecated" not in new.stderr
    old = image_build(tmp_path, "--offline")
    assert old.returncode == new.returncode != 0
    assert "--offline is deprecated" in old.stderr and "use --from-debian" in old.stderr
    assert "no Docker engine answers" in old.stderr


def test_help_says_what_from_debian_needs(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "dropq", "image", "build", "--help"], capture_output=True, text=True,
                          cwd=tmp_path, timeout=60)
    assert done.returncode == 0
    assert "--from-debian" in done.stdout and "Debian mirror" in done.stdout and "--offline" not in done.stdout


def test_agent_is_an_option_of_image_build_that_needs_an_engine(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "dropq", "image", "build", "--help"], capture_output=True, text=True,
                          cwd=tmp_path, timeout=60)
    assert "--agent" in done.stdout and "dropq-agent:latest" in done.stdout
    built = image_build(tmp_path, "--agent", "--from-debian")
    assert built.returncode != 0 and "no Docker engine answers" in built.stderr


def test_the_agent_images_dropq_wheel_is_the_installed_dropq_and_pip_installs_it(tmp_path: Path) -> None:
    """The wheel packed for the agent image holds every file of the installed packages, and pip takes it: the
    dropq it installs has the same files and the `dropq` command."""
    import importlib.metadata
    import zipfile

    from dropq.pools.agent_image import _package_files, pack_wheel

    wheel = pack_wheel(tmp_path)
    version = importlib.metadata.version("dropq")
    assert wheel.name == f"dropq-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as packed:
        names = set(packed.namelist())
        entry_points = packed.read(f"dropq-{version}.dist-info/entry_points.txt").decode()
    expected = {arc for arc, _ in _package_files()}
    assert {"dropq/agent.py", "dropq/pools/agent_image.py", "dropq_worker/Dockerfile",
            "dropq_worker/app.py"} <= expected
    assert any(n.startswith("dropq/ops/dashboard/") for n in expected), "the dashboard is package data"
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)
    assert expected <= names and "dropq = dropq.cli:main" in entry_points

    target = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--target",
                           str(target), str(wheel)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr  # pip checks every file against RECORD's hash and size
    for arc, source in _package_files():
        assert (target / arc).read_bytes() == source.read_bytes(), arc
    assert (target / "bin" / "dropq").exists()


def test_the_agent_image_pins_every_runtime_dependency_at_the_installed_version(tmp_path: Path) -> None:
    import importlib.metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    from dropq.pools.agent_image import agent_digest, pack_wheel, pinned_dependencies

    pins = dict(p.split("==") for p in pinned_dependencies())
    direct = [Requirement(r) for r in importlib.metadata.requires("dropq") or []]
    for req in direct:
        name = canonicalize_name(req.name)
        if req.marker is None:  # the test extra's (pytest, mypy, ...) all have an `extra ==` marker
            assert pins[name] == importlib.metadata.version(req.name)
        else:
            # requests is a test extra, and docker's own dependency too
            assert name not in pins or name == "requests", f"{name} is only for tests"
    # and what those need in turn: pydantic's compiled core, flask's templates, docker's HTTP client
    assert {"pydantic-core", "jinja2", "markupsafe", "urllib3", "certifi"} <= set(pins)
    # the digest that decides "current" is the same for the same installation (the wheel packs reproducibly)
    first, second = tmp_path / "1", tmp_path / "2"
    first.mkdir()
    second.mkdir()
    pinned = pinned_dependencies()
    assert agent_digest(pack_wheel(first), pinned) == agent_digest(pack_wheel(second), pinned)
