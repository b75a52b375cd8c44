"""Unit tests of config loading: defaults, relative paths, and refusals that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from dropq.config import Config
from dropq.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def load(tmp_path: Path, text: str) -> Config:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return Config.load(path)


def test_the_bundled_config_loads_and_matches_the_defaults(tmp_path: Path) -> None:
    bundled = Config.load(ROOT / "config.yaml")
    defaults = load(tmp_path, "")
    assert bundled.workers == defaults.workers
    assert bundled.jobs == defaults.jobs
    assert bundled.intake == defaults.intake
    assert bundled.retry == defaults.retry
    assert bundled.inbox == ROOT / "inbox"


def test_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    config = load(tmp_path, "inbox: drop/in\nstate: /var/tmp/dq\n")
    assert config.inbox == tmp_path / "drop" / "in"
    assert config.state == Path("/var/tmp/dq")
    assert config.database == Path("/var/tmp/dq/dropq.sqlite3")


@pytest.mark.parametrize(("text", "message"), [
    ("inbx: x\n", "unknown config key inbx"),
    ("workers: {cont: 2}\n", "unknown config key workers.cont"),
    ("workers: {count: two}\n", "workers.count must be a whole number"),
    ("workers: {count: -1}\n", "workers.count must be at least 0"),
    # 0 means agents only (README: More than one host): without agents nothing would run a job
    ("workers: {count: 0}\n", "workers.count is 0 and no agents are configured"),
    ("workers: {count: 0}\nagents: {token_file: t, listen: '0.0.0.0:8788'}\n", "not a loopback address"),
    ("agents: {token_file: t, listen: 'nowhere'}\n", "agents.listen must be host:port"),
    ("workers: {pool: kubernetes}\n", "workers.pool must be one of auto, local, docker"),
    ("jobs: {timeout: fast}\n", "jobs.timeout must be a number"),
    ("jobs: {retries: 1.5}\n", "jobs.retries must be a whole number"),
    ("jobs: 3\n", "jobs must be a mapping"),
    ("inbox: 5\n", "inbox must be a path"),
    ("[1, 2]\n", "must be a mapping of keys"),
    ("a: [\n", "is not valid YAML"),
    ("workers: {docker: {on_shutdown: keep}}\n", "workers.docker.on_shutdown must be one of leave, remove"),
    ("workers: {docker: {user: 1000}}\n", "config key workers.docker.user must be a string, not a whole number"),
    ("workers: {str: 1}\n", "unknown config key workers.str"),
    ("jobs: {max_output_bytes: 4096, max_file_bytes: 2048}\n", "jobs.max_file_bytes must be at least jobs.max_output"),
])
def test_bad_config_is_refused_naming_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    assert message in str(info.value)


def test_a_refusal_names_the_file_and_the_value_found(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, "workers: {count: two}\n")
    assert str(info.value) == f"{tmp_path / 'config.yaml'}: config key workers.count must be a whole number, not a " \
                              "string ('two')"


def test_a_missing_config_file_says_so(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        Config.load(tmp_path / "nope.yaml")


def test_retry_backoff_grows_to_its_cap(tmp_path: Path) -> None:
    retry = load(tmp_path, "retry: {base: 1, factor: 3, cap: 10}\n").retry
    assert [retry.delay(n) for n in (1, 2, 3, 4)] == [1.0, 3.0, 9.0, 10.0]
