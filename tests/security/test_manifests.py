"""Manifests are untrusted bytes: fuzzing, alias bombs, object tags, and every path-traversal form."""

from __future__ import annotations

import ast
import os
import time
import tracemalloc
from pathlib import Path, PurePosixPath
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import ROOT, DaemonProcess, Workspace
from dropq.config import JobDefaults
from dropq.errors import ManifestError
from dropq.intake.manifest import KEYS, Manifest
from helpers import record_attack

DEFAULTS = JobDefaults()

scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=40),
                    st.sampled_from(["..", "../x", "/etc/passwd", "a/../../b", "x\x00y", "~", "", ".", "a//b"]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(
    st.text(max_size=10), inner, max_size=5), max_leaves=20)
manifests = st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=12)), values, max_size=8)


def safe(manifest: Manifest) -> bool:
    paths = [manifest.program, *manifest.inputs, *([manifest.output] if manifest.output else [])]
    return all(not PurePosixPath(p).is_absolute() and ".." not in PurePosixPath(p).parts and "\x00" not in p
               for p in paths)


def escape_of(data: dict[Any, Any]) -> str | None:
    """How parsing `data` escaped (an unsafe manifest, an unclear refusal, another exception), or None."""
    raw = yaml.safe_dump(data, allow_unicode=True).encode()
    try:
        manifest = Manifest.parse(raw, defaults=DEFAULTS, max_bytes=65536)
    except ManifestError as exc:
        return None if str(exc) and len(str(exc)) < 400 else f"an unclear refusal: {str(exc)[:80]!r}"
    except Exception as exc:  # noqa: BLE001 - any other exception is exactly what is counted as an escape
        return f"{type(exc).__name__}: {exc}"
    return None if safe(manifest) else f"an unsafe manifest: {manifest}"


def test_fuzzed_manifests_parse_to_a_safe_manifest_or_a_clear_refusal() -> None:
    """The table's row is counted here, in this test alone: every example tried, every escape counted
    (not only those after which an assertion passed), then none may have escaped."""
    tried = 0
    escapes: list[tuple[dict[Any, Any], str]] = []

    @settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
    @given(data=manifests)
    def attempt(data: dict[Any, Any]) -> None:
        nonlocal tried
        tried += 1
        how = escape_of(data)
        if how is not None:
            escapes.append((data, how))

    attempt()
    record_attack("fuzzed manifests (hypothesis)", tried, tried - len(escapes))
    assert tried >= 1000
    assert escapes == [], escapes[:5]


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=400))
def test_random_bytes_never_raise_anything_but_a_manifest_error(raw: bytes) -> None:
    try:
        Manifest.parse(raw, defaults=DEFAULTS, max_bytes=65536)
    except ManifestError:
        pass  # the refusal is the expected outcome for most random bytes


def test_an_alias_bomb_is_refused_in_bounded_time_and_memory() -> None:
    levels = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i, name in enumerate("bcdefghi"):
        prev = "abcdefghi"[i]
        levels.append(f"{name}: &{name} [{','.join(['*' + prev] * 9)}]")
    bomb = "\n".join(levels) + "\nprogram: echo\nargs: *i\n"
    tracemalloc.start()
    start = time.perf_counter()
    try:
        Manifest.parse(bomb.encode(), defaults=DEFAULTS, max_bytes=65536)
        contained = False
    except ManifestError as exc:
        contained = "aliases" in str(exc)
    elapsed, peak = time.perf_counter() - start, tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert contained and peak < 10 * 1024 * 1024, (elapsed, peak)
    record_attack("alias bomb (billion laughs)", 1, int(contained))


def test_python_object_tags_are_refused() -> None:
    tags = ["!!python/object/apply:os.system ['id']", "!!python/name:os.system", "!!python/module:os",
            "!!python/object/new:subprocess.Popen [['id']]", "!!binary aWQ="]
    refused = 0
    for tag in tags:
        try:
            Manifest.parse(f"program: echo\nargs: [{tag}]\n".encode(), defaults=DEFAULTS, max_bytes=65536)
        except ManifestError:
            refused += 1
    record_attack("python object tags", len(tags), refused)
    assert refused == len(tags)


def test_no_unsafe_yaml_loading_anywhere_in_the_code() -> None:
    """yaml.load (without the safe loader), full_load and unsafe_load are banned (this is the CI check)."""
    banned = []
    for path in [*ROOT.glob("daemon/**/*.py"), *ROOT.glob("worker/**/*.py"), *ROOT.glob("bench/**/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                name = node.func.attr
                loader = next((k.value for k in node.keywords if k.arg == "Loader"), None)
                loader_name = getattr(loader, "id", getattr(loader, "attr", ""))
                if name in ("full_load", "unsafe_load", "full_load_all", "unsafe_load_all") or (
                        name in ("load", "load_all") and getattr(node.func.value, "id", "") == "yaml"
                        and "Safe" not in str(loader_name)):
                    banned.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert banned == []


TRAVERSALS = [
    "../secret.txt", "../../etc/passwd", "/etc/passwd", "a/../../secret.txt", "./../secret.txt", "..",
    "a/..", "sub/../../secret.txt", "//etc/passwd", "/../secret.txt", "../inbox-evil/secret.txt",
    "x\x00y", "link/secret.txt", "linkdir/passwd", "chain/secret.txt", "abs/passwd", "sub/link2",
    "../../../../../../../../etc/shadow", "..\\\\..\\\\secret.txt", "%2e%2e/secret.txt", "~/secret.txt",
]


def test_path_traversal_forms_through_the_daemon(workspace: Workspace, daemon: DaemonProcess) -> None:
    secret = workspace.root / "secret.txt"
    secret.write_text("secret")
    evil = workspace.root / "inbox-evil"
    evil.mkdir()
    (evil / "secret.txt").write_text("secret")
    os.symlink(workspace.root, workspace.inbox / "link")
    os.symlink("/etc", workspace.inbox / "linkdir")
    os.symlink("link", workspace.inbox / "chain")
    os.symlink("/etc/passwd", workspace.inbox / "abs")
    (workspace.inbox / "sub").mkdir()
    os.symlink("../../secret.txt", workspace.inbox / "sub" / "link2")
    workspace.configure(intake={"input_grace": 0.5})
    daemon.start()
    for i, path in enumerate(TRAVERSALS):
        workspace.drop(f"t{i}.yaml", yaml.safe_dump({"program": "wordcount", "input": path}))
        workspace.drop(f"p{i}.yaml", yaml.safe_dump({"program": path}))
    results = workspace.wait_results(2 * len(TRAVERSALS), timeout=60)
    contained = sum(r["status"] == "rejected" for r in results.values())
    assert secret.read_text() == "secret" and (evil / "secret.txt").exists()
    assert Path("/etc/passwd").exists()
    assert not [p for name in results for p in (workspace.outbox / name / "inputs").rglob("*secret*")]
    record_attack("path traversal forms (input and program)", len(results), contained)
    assert contained == len(results), {k: v["error"] for k, v in results.items() if v["status"] != "rejected"}
