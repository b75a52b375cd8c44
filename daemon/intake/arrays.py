"""Array jobs: a manifest's `matrix:` made into tasks, one per combination of its values.

The rules live here, apart from the daemon's threads, so that they are tested in milliseconds:
resolving `{glob: ...}` values against inbox/ (sorted), the cartesian product in a stable order (keys in
manifest order, values in list order), `{name}` placeholders (`{{` and `}}` are braces), and the refusals
(a glob matching nothing, more tasks than jobs.max_tasks, a placeholder the matrix does not name). A task
is a Manifest of its own, with its values filled in and $DROPQ_TASK_INDEX / $DROPQ_TASK_COUNT set; the
store keeps it as a child row of the array's job (migration 6).
"""

from __future__ import annotations

import dataclasses
import glob as globbing
import itertools
import os
import re
import stat
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePosixPath
from types import MappingProxyType

from dropq.errors import ManifestError
from dropq.intake.manifest import Manifest, is_manifest_name
from dropq.paths import check_relative

#: `{{`, `}}`, or `{name}`; any other `{` is an error (an unclosed or misspelt placeholder)
_TOKEN = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_]*)\}|\{")
#: the environment variables every task gets
TASK_INDEX, TASK_COUNT = "DROPQ_TASK_INDEX", "DROPQ_TASK_COUNT"


def fill(template: str, params: Mapping[str, str], *, where: str) -> str:
    """`template` with each `{name}` replaced by params[name]; `{{` is `{` and `}}` is `}`."""

    def one(match: re.Match[str]) -> str:
        token = match.group(0)
        if token == "{{":
            return "{"
        if token == "}}":
            return "}"
        name = match.group(1)
        if name is None:
            raise ManifestError(f"{where} has a `{{` that starts no placeholder: write {{{{ for a brace, or "
                                "{name} for a value of `matrix`")
        if name not in params:
            raise ManifestError(f"{where} uses {{{name}}}, which `matrix` does not name (it has: "
                                f"{', '.join(params) or 'nothing'})")
        return params[name]

    return _TOKEN.sub(one, template)


def glob_inbox(inbox: Path, pattern: str) -> list[str]:
    """The regular files in inbox/ that `pattern` matches, as paths relative to it, sorted. Dotfiles (files
    being written) and the manifests at the top level (jobs of their own) are never matched."""
    found = []
    for rel in globbing.glob(pattern, root_dir=inbox, recursive=True):
        path = PurePosixPath(rel)
        if any(part.startswith(".") for part in path.parts):
            continue
        if len(path.parts) == 1 and is_manifest_name(path.name):
            continue
        try:
            if stat.S_ISREG(os.lstat(inbox / rel).st_mode):
                found.append(str(path))
        except FileNotFoundError:
            continue
    return sorted(found)


def resolve(manifest: Manifest, *, inbox: Path, max_tasks: int) -> Manifest:
    """An array manifest with its globs matched and checked: its `matrix` holds every value, its `inputs`
    every file its tasks read (each once, the glob's matches among them), and its own input templates are
    kept in `task_inputs`. A manifest without `matrix` is returned as it is."""
    if not manifest.matrix:
        return manifest
    if any("{" in item for item in manifest.from_outbox):
        raise ManifestError("an `outbox:` input cannot hold a placeholder: the jobs an array runs after are known "
                            "when it is claimed (name them in full)")
    values: list[tuple[str, tuple[str, ...], str | None]] = []
    for name, listed, pattern in manifest.matrix:
        if pattern is not None:
            matched = glob_inbox(inbox, pattern)
            if not matched:
                raise ManifestError(f"`matrix.{name}` is the glob {pattern!r}, which matches no file in inbox/ "
                                    "(drop the files before the manifest)")
            listed = tuple(matched)
        values.append((name, tuple(listed), pattern))
    count = 1
    for _name, listed, _pattern in values:
        count *= len(listed)
    if count > max_tasks:
        sizes = " × ".join(str(len(listed)) for _n, listed, _p in values)
        raise ManifestError(f"`matrix` makes {count} tasks ({sizes}); the limit is {max_tasks} (jobs.max_tasks): "
                            "split the work over several manifests")
    resolved = dataclasses.replace(manifest, matrix=tuple(values), task_inputs=manifest.inputs)
    inputs: dict[str, None] = {}
    for index, params in enumerate(combinations(resolved)):
        task = task_manifest(resolved, index, params)
        inputs.update(dict.fromkeys(task.inputs))
    for _name, listed, pattern in values:
        if pattern is not None:
            inputs.update(dict.fromkeys(listed))
    return dataclasses.replace(resolved, inputs=tuple(inputs))


def combinations(manifest: Manifest) -> Iterator[dict[str, str]]:
    """Each task's parameters, in task order: the cartesian product, keys in manifest order, values in
    list order."""
    names = [name for name, _values, _glob in manifest.matrix]
    for combo in itertools.product(*(values for _name, values, _glob in manifest.matrix)):
        yield dict(zip(names, combo, strict=True))


def task_count(manifest: Manifest) -> int:
    count = 1
    for _name, values, _glob in manifest.matrix:
        count *= len(values)
    return count


def task_manifest(array: Manifest, index: int, params: Mapping[str, str]) -> Manifest:
    """Task `index` of a resolved array: its values filled in, its own inputs, the task variables set."""
    inputs = []
    for template in array.task_inputs:
        rel = fill(template, params, where=f"input {template!r}")
        try:
            inputs.append(str(check_relative(rel, what="input")))
        except ManifestError as exc:
            raise ManifestError(f"task {index} ({_said(params)}): {exc}") from None
    output = None
    if array.output is not None:
        output = fill(array.output, params, where="`output`")
        if len(PurePosixPath(output).parts) != 1 or output in (".", "..", ""):
            raise ManifestError(f"task {index} ({_said(params)}): `output` becomes {output!r}, which is not a "
                                "plain file name")
    env = {name: fill(value, params, where=f"`env.{name}`") for name, value in array.env.items()}
    env[TASK_INDEX] = str(index)
    env[TASK_COUNT] = str(task_count(array))
    return dataclasses.replace(
        array, inputs=tuple(inputs), args=tuple(fill(a, params, where="`args`") for a in array.args),
        output=output, env=MappingProxyType(env), matrix=(), task_inputs=(), max_failures=None, notify=None,
        after=(), parameters=tuple(params.items()))


def tasks(array: Manifest) -> list[Manifest]:
    """Every task of a resolved array, in order."""
    return [task_manifest(array, index, params) for index, params in enumerate(combinations(array))]


def _said(params: Mapping[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items())

