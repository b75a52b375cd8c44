"""`dropq schema`: the JSON Schemas editors check files with agree with the daemon's validation.

The schemas are printed by the real entry point and checked with an independent validator
(`jsonschema`), against the files a user starts from: the bundled config.yaml and the README's
example manifest.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import ROOT
from dropq.config import Config, JobDefaults
from dropq.errors import ConfigError, ManifestError
from dropq.intake.manifest import KEYS, Manifest


def printed_schema(name: str, cwd: Path) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-m", "dropq", "schema", name], cwd=cwd, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    schema: dict[str, Any] = json.loads(done.stdout)
    jsonschema.Draft7Validator.check_schema(schema)
    return schema


@pytest.fixture(scope="module")
def manifest_schema(tmp_path_factory: pytest.TempPathFactory) -> jsonschema.Draft7Validator:
    # from an empty folder: describing the files needs no config.yaml
    return jsonschema.Draft7Validator(printed_schema("manifest", tmp_path_factory.mktemp("anywhere")))


@pytest.fixture(scope="module")
def config_schema(tmp_path_factory: pytest.TempPathFactory) -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(printed_schema("config", tmp_path_factory.mktemp("anywhere")))


def readme_manifest() -> str:
    """The example under the README's "Manifest reference" heading."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Manifest reference", 1)[1]
    found = re.search(r"```yaml\n(.*?)```", section, re.S)
    assert found, "the README's manifest reference has no yaml example"
    return found.group(1)


def parse(text: str) -> Manifest:
    return Manifest.parse(text.encode(), defaults=JobDefaults(), max_bytes=65536)


def test_the_bundled_config_is_valid_by_the_schema(config_schema: jsonschema.Draft7Validator) -> None:
    data = yaml.safe_load((ROOT / "config.yaml").read_text())
    assert sorted(config_schema.iter_errors(data), key=str) == []
    Config.load(ROOT / "config.yaml")


def test_the_readme_manifest_is_valid_by_the_schema_and_the_daemon(
        manifest_schema: jsonschema.Draft7Validator) -> None:
    text = readme_manifest()
    assert text.startswith("# yaml-language-server: $schema="), "the example shows the editor's header"
    assert list(manifest_schema.iter_errors(yaml.safe_load(text))) == []
    assert parse(text).program == "wordcount.py"


@pytest.mark.parametrize("text", [
    "program: echo\nprogam: typo\n",
    "input: x.txt\n",
    "program: 42\n",
    "program: echo\ninputs: x.txt\n",
    "program: echo\nargs: [[nested]]\n",
    "program: echo\nenv: {1A: x}\n",
    "program: echo\nenv: {DROPQ_JOB_ID: x}\n",
    "program: echo\nenv: {A: [x]}\n",
    "program: echo\ntimeout: 0\n",
    "program: echo\ntimeout: 99999999\n",
    "program: echo\nretries: -1\n",
    "program: echo\nretries: true\n",
    "program: echo\npriority: high\n",
    "program: echo\nretry_on_exit: [0]\n",
])
def test_a_bad_manifest_fails_both_the_schema_and_the_daemon(
        manifest_schema: jsonschema.Draft7Validator, text: str) -> None:
    assert list(manifest_schema.iter_errors(yaml.safe_load(text)))
    with pytest.raises(ManifestError):
        parse(text)


@pytest.mark.parametrize("text", [
    "inbx: x\n", "workers: {count: two}\n", "workers: {count: -1}\n", "workers: {pool: kubernetes}\n",
    "jobs: 3\n", "inbox: 5\n", "http: {port: 99999}\n", "workers: {docker: {on_shutdown: keep}}\n",
])
def test_a_bad_config_fails_both_the_schema_and_the_daemon(
        config_schema: jsonschema.Draft7Validator, text: str, tmp_path: Path) -> None:
    data = yaml.safe_load(text)
    assert list(config_schema.iter_errors(data))
    with pytest.raises(ConfigError):
        Config.from_mapping(data, base=tmp_path)


scalars = st.one_of(st.none(), st.booleans(), st.integers(-300, 300), st.floats(allow_nan=False), st.text(max_size=8),
                    st.sampled_from(["DROPQ_JOB_ID", "LANG", "1A", "x.txt"]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.sampled_from(["LANG", "A_1", "1A", "DROPQ_OUTPUT", ""]), inner, max_size=3), max_leaves=8)
documents = st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=6)), values, max_size=6)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=documents)
def test_what_the_schema_refuses_the_daemon_refuses(manifest_schema: jsonschema.Draft7Validator,
                                                    data: dict[str, Any]) -> None:
    """The schema may be looser than the daemon (it cannot see paths leave their folder), never stricter:
    an editor must not flag a manifest that would run."""
    if not manifest_schema.is_valid(data):
        with pytest.raises(ManifestError):
            Manifest.from_mapping(data, defaults=JobDefaults())
