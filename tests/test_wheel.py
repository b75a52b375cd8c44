"""The built wheel works far from the checkout: `dropq run` with a job, the dashboard, `service unit`,
`schema`, `image build` with the same worker source as the checkout, and where the Debian base image
exists a real build from the wheel under a temporary tag (.ci/wheel-smoke does the work;
CI also runs it on its own, before the test suite)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from dropq.ops.systemd import checkout_readme
from dropq.pools.image import ImageError, source_digest, worker_dir


def test_the_wheel_installed_elsewhere_runs_a_job_and_ships_its_package_data() -> None:
    # about 30 s: a wheel build, a virtualenv with its dependencies, a daemon with one job
    done = subprocess.run([str(ROOT / ".ci" / "wheel-smoke"), sys.executable], capture_output=True, text=True,
                          timeout=280)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "wheel-smoke: ok" in done.stdout


def test_an_install_without_the_workers_dockerfile_fails_loudly(tmp_path: Path) -> None:
    # what a wheel without its package data looked like: modules only
    (tmp_path / "__init__.py").write_text("")
    (tmp_path / "app.py").write_text("")
    with pytest.raises(ImageError, match="no Dockerfile, .dockerignore"):
        source_digest(tmp_path)


def test_the_digest_covers_exactly_what_the_image_is_built_from(tmp_path: Path) -> None:
    shutil.copytree(worker_dir(), tmp_path / "w", ignore=shutil.ignore_patterns("__pycache__"))
    before = source_digest(tmp_path / "w")
    (tmp_path / "w" / "__pycache__").mkdir(exist_ok=True)
    (tmp_path / "w" / "__pycache__" / "app.cpython-311.pyc").write_bytes(b"bytecode")
    assert source_digest(tmp_path / "w") == before, "bytecode is not source"
    (tmp_path / "w" / "app.py").write_text((tmp_path / "w" / "app.py").read_text() + "\n# edited\n")
    assert source_digest(tmp_path / "w") != before


def test_the_unit_names_a_readme_only_from_a_checkout(tmp_path: Path) -> None:
    assert checkout_readme() == ROOT / "README.md"
    # a wheel: site-packages/dropq/, where a README.md beside it belongs to another project
    site = tmp_path / "site-packages"
    (site / "dropq").mkdir(parents=True)
    (site / "README.md").write_text("another project")
    (site / "pyproject.toml").write_text("")
    assert checkout_readme(site / "dropq") is None
