"""Where `dropq` finds its configuration, through the real entry point: -c/--config after the command,
else before it, else $DROPQ_CONFIG, else ./config.yaml — for every command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dropq.cli import COMMANDS

#: one valid invocation per command (and per action of the commands that have actions)
INVOCATIONS: dict[str, list[str]] = {
    "run": ["run"],
    "submit": ["submit", "echo"],
    "status": ["status"],
    "workers": ["workers"],
    "show": ["show", "x"],
    "logs": ["logs", "x"],
    "cancel": ["cancel", "x"],
    "retry": ["retry", "x"],
    "service install": ["service", "install"],
    "service unit": ["service", "unit"],
    "image build": ["image", "build"],
    "jobs": ["jobs"],
    "env list": ["env", "list"],
    "env build": ["env", "build", "x"],
    "env prune": ["env", "prune"],
    "prune": ["prune", "--older-than", "1d"],
}

BROKEN = "workers: {count: many}\n"
BROKEN_MESSAGE = "config key workers.count must be a whole number, not a string ('many')\n"


def dropq_in(cwd: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The real entry point, run in `cwd` with $DROPQ_CONFIG only as `env` says."""
    environ = {k: v for k, v in os.environ.items() if k != "DROPQ_CONFIG"}
    return subprocess.run([sys.executable, "-m", "dropq", *args], cwd=cwd, env={**environ, **(env or {})},
                          capture_output=True, text=True, timeout=60)


def test_the_invocations_cover_every_command() -> None:
    assert {argv[0] for argv in INVOCATIONS.values()} == set(COMMANDS)


@pytest.mark.parametrize("command", sorted(INVOCATIONS))
@pytest.mark.parametrize("where", ["after", "before", "environment"])
def test_every_command_reads_the_config_named_after_before_or_in_the_environment(
        tmp_path: Path, command: str, where: str) -> None:
    # The named file is broken and ./config.yaml is missing: only reading the named file gives this
    # message (an ignored option would say "config file not found: config.yaml").
    named = tmp_path / "elsewhere" / "broken.yaml"
    named.parent.mkdir()
    named.write_text(BROKEN)
    argv = INVOCATIONS[command]
    if where == "after":
        done = dropq_in(tmp_path, *argv, "--config", str(named))
    elif where == "before":
        done = dropq_in(tmp_path, "--config", str(named), *argv)
    else:
        done = dropq_in(tmp_path, *argv, env={"DROPQ_CONFIG": str(named)})
    assert (done.returncode, done.stderr) == (3, f"dropq: {named}: {BROKEN_MESSAGE}")


def test_the_option_may_follow_a_command_before_its_action(tmp_path: Path) -> None:
    (tmp_path / "broken.yaml").write_text(BROKEN)
    done = dropq_in(tmp_path, "service", "-c", "broken.yaml", "unit")
    assert (done.returncode, done.stderr) == (3, f"dropq: broken.yaml: {BROKEN_MESSAGE}")


@pytest.mark.parametrize(("given", "used"), [
    ({"after", "before", "environment", "default"}, "after"),
    ({"before", "environment", "default"}, "before"),
    ({"environment", "default"}, "environment"),
    ({"default"}, "default"),
])
def test_after_beats_before_beats_the_environment_beats_the_default(
        tmp_path: Path, given: set[str], used: str) -> None:
    paths = {}
    for name in ("after", "before", "environment", "default"):
        folder = tmp_path if name == "default" else tmp_path / name
        folder.mkdir(exist_ok=True)
        paths[name] = folder / "config.yaml"
        paths[name].write_text("workers: {pool: local}\n")
    args = ["--config", str(paths["before"])] if "before" in given else []
    args += ["service", "unit"]
    args += ["--config", str(paths["after"])] if "after" in given else []
    env = {"DROPQ_CONFIG": str(paths["environment"])} if "environment" in given else {}
    done = dropq_in(tmp_path, *args, env=env)
    assert done.returncode == 0, done.stderr
    # the unit names the configuration it was made from
    assert f"Description=dropq drop-folder batch processor ({paths[used].resolve()})\n" in done.stdout


def test_an_empty_environment_variable_means_the_default(tmp_path: Path) -> None:
    done = dropq_in(tmp_path, "status", env={"DROPQ_CONFIG": ""})
    assert (done.returncode, done.stderr) == (3, "dropq: config file not found: config.yaml\n")


def test_help_says_where_the_config_comes_from(tmp_path: Path) -> None:
    top = dropq_in(tmp_path, "--help").stdout
    assert "$DROPQ_CONFIG" in top and "after the command" in top
    assert "-c CONFIG, --config CONFIG" in dropq_in(tmp_path, "submit", "--help").stdout


def test_a_config_option_after_the_double_dash_goes_to_the_program(tmp_path: Path) -> None:
    for folder in ("inbox", "outbox", "programs"):
        (tmp_path / folder).mkdir()
    (tmp_path / "programs" / "echo.py").write_text("print('hi')\n")
    (tmp_path / "mine.yaml").write_text("workers: {pool: local}\n")
    done = dropq_in(tmp_path, "submit", "echo", "--name", "e", "--config", "mine.yaml", "--", "--config", "x")
    assert done.returncode == 0, done.stderr
    assert yaml.safe_load((tmp_path / "inbox" / "e.yaml").read_text())["args"] == ["--config", "x"]
