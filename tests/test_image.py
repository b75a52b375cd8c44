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
