"""Unit tests of manifest validation: every rule, and the message a person reads."""

from __future__ import annotations

import pytest

from dropq.config import JobDefaults
from dropq.errors import ManifestError, UnsafePathError
from dropq.intake.manifest import Manifest, is_manifest_name

DEFAULTS = JobDefaults(timeout=30, retries=2)


def parse(text: str, max_bytes: int = 65536) -> Manifest:
    return Manifest.parse(text.encode(), defaults=DEFAULTS, max_bytes=max_bytes)


def test_a_full_manifest_parses_into_its_fields() -> None:
    m = parse("program: wordcount\ninput: moby.txt\ninputs: [a.csv, b/c.csv]\nargs: ['--top', 10]\n"
              "output: counts.txt\nenv: {LANG: C.UTF-8, N: 3}\ntimeout: 5\nretries: 0\npriority: 7\n")
    assert m.program == "wordcount.py"
    assert m.inputs == ("moby.txt", "a.csv", "b/c.csv")
    assert m.args == ("--top", "10")
    assert m.output == "counts.txt"
    assert dict(m.env) == {"LANG": "C.UTF-8", "N": "3"}
    assert (m.timeout, m.retries, m.priority) == (5.0, 0, 7)


def test_defaults_come_from_the_config() -> None:
    m = parse("program: echo\n")
    assert (m.timeout, m.retries, m.priority, m.inputs, m.args, m.output) == (30.0, 2, 0, (), (), None)


def test_a_program_with_a_suffix_keeps_it() -> None:
    assert parse("program: tools/run.sh\n").program == "tools/run.sh"


def test_json_round_trip_is_lossless() -> None:
    m = parse("program: echo\ninput: x\nenv: {A: b}\npriority: -3\n")
    assert Manifest.from_json(m.to_json()) == m


def test_fresh_interpreter_is_a_boolean_kept_through_the_queue() -> None:
    assert parse("program: echo\n").fresh_interpreter is False
    m = parse("program: echo\nfresh_interpreter: true\n")
    assert m.fresh_interpreter is True and Manifest.from_json(m.to_json()) == m
    with pytest.raises(ManifestError, match="`fresh_interpreter` must be true or false"):
        parse("program: echo\nfresh_interpreter: 'yes'\n")
    # a manifest queued before the key existed reads as false
    stored = m.to_json().replace(',"fresh_interpreter":true', "")
    assert Manifest.from_json(stored).fresh_interpreter is False


@pytest.mark.parametrize(("text", "message"), [
    ("program: [unclosed", "not valid YAML (line "),
    ("- a\n- b\n", "must be a YAML mapping"),
    ("", "must be a YAML mapping"),
    ("42", "must be a YAML mapping"),
    ("program: echo\nprogam: typo\n", "unknown key `progam`"),
    ("input: x\n", "no `program:` key"),
    ("program: 42\n", "`program` must be a program name"),
    ("program: /bin/sh\n", "absolute path"),
    ("program: ../../bin/sh\n", "contains '..'"),
    ("program: echo\ninput: a/../../x\n", "contains '..'"),
    ("program: echo\ninputs: [/etc/shadow]\n", "absolute path"),
    ("program: echo\ninputs: x.txt\n", "`inputs` must be a list"),
    ("program: echo\ninput: x\ninputs: [x]\n", "named twice"),
    ("program: echo\nargs: [[nested]]\n", "must be a string"),
    ("program: echo\noutput: sub/out.txt\n", "plain file name"),
    ("program: echo\nenv: [A]\n", "`env` must be a mapping"),
    ("program: echo\nenv: {1A: x}\n", "invalid variable name"),
    ("program: echo\nenv: {DROPQ_JOB_ID: x}\n", "may not set DROPQ_JOB_ID"),
    # names that pydantic also uses for a union's members are still the person's names
    ("program: echo\nenv: {str: [x]}\n", "`env.str` must be a string"),
    ("program: echo\nint: 3\n", "unknown key `int`"),
    ("program: echo\nretry_on_exit: [0]\n", "`retry_on_exit` must be an exit code from 1 to 255"),
    ("program: echo\ntimeout: 0\n", "`timeout` must be a positive number"),
    ("program: echo\ntimeout: .inf\n", "`timeout` must be a positive number"),
    ("program: echo\ntimeout: 99999999\n", "at most"),
    ("program: echo\nretries: -1\n", "`retries` must be between"),
    ("program: echo\nretries: true\n", "`retries` must be a whole number"),
    ("program: echo\npriority: high\n", "`priority` must be a whole number"),
    ("program: !!python/object/apply:os.system [id]\n", "not valid YAML"),
])
def test_bad_manifests_are_refused_with_a_clear_reason(text: str, message: str) -> None:
    with pytest.raises(ManifestError) as info:
        parse(text)
    assert message in str(info.value)


def test_path_errors_are_unsafe_path_errors() -> None:
    with pytest.raises(UnsafePathError):
        parse("program: echo\ninput: ../x\n")


def test_a_nul_byte_in_a_path_is_refused() -> None:
    with pytest.raises(UnsafePathError, match="NUL"):
        parse('program: echo\ninput: "a\\0b"\n')


def test_oversized_and_non_utf8_manifests_are_refused() -> None:
    with pytest.raises(ManifestError, match="the limit is 100"):
        parse("program: echo\n" + "#" * 200, max_bytes=100)
    with pytest.raises(ManifestError, match="not UTF-8"):
        Manifest.parse(b"program: \xff\xfe\n", defaults=DEFAULTS, max_bytes=1000)


@pytest.mark.parametrize(("name", "expected"), [
    ("job.yaml", True), ("job.yml", True), (".job.yaml", False), ("job.yaml~", False),
    ("job.yaml.tmp", False), ("job.txt", False), (".yaml", False),
])
def test_which_inbox_files_are_manifests(name: str, expected: bool) -> None:
    assert is_manifest_name(name) is expected
