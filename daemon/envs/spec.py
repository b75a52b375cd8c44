"""What a program declares it needs, read from the programs folder, and the id of the environment it gets.

Two forms (README, "Programs and their dependencies"):

- a single file `programs/<name>.py` with a PEP 723 block (`# /// script` ... `# ///`) listing its
  `dependencies` and, optionally, `requires-python`;
- a folder `programs/<name>/` whose entry point is `main.py` (or an executable `main`, any language),
  with `requirements.txt` or a `pyproject.toml` whose `[project]` table lists `dependencies`.

Dependencies must be PEP 508 requirements naming a package. Options (`-e`, `-r`, `--index-url`), and
direct references (`name @ URL`), are refused: the index a build reaches is the operator's
(`environments.*` in config.yaml), never a program's, and a `file:` URL would read the host.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import tomllib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import InvalidSpecifier, SpecifierSet

from dropq.errors import EnvSpecError, ManifestError
from dropq.paths import resolve_inside

#: a program file is read for its PEP 723 block up to this many bytes (a script, not a data file)
MAX_SCRIPT_BYTES = 4 * 1024 * 1024
#: requirements.txt and pyproject.toml are read up to this many bytes
MAX_DECLARATION_BYTES = 256 * 1024
#: a program may declare at most this many dependencies
MAX_DEPENDENCIES = 500
#: hex digits of an environment id (64 bits: a collision among a host's environments is not a concern)
ID_LENGTH = 16

# The reference regular expression of PEP 723 (https://peps.python.org/pep-0723/#reference-implementation)
_BLOCK = re.compile(r"(?m)^# /// (?P<type>[a-zA-Z0-9-]+)$\s(?P<content>(^#(| .*)$\s)+)^# ///$")


@dataclass(frozen=True)
class EnvSpec:
    """The dependencies a program declares; what, with the pool's target, names its environment."""

    #: PEP 508 requirements, each in its normal form, sorted (the order they were listed in does not matter)
    dependencies: tuple[str, ...]
    #: the program's requires-python bound (PEP 440 specifiers), if it gave one
    requires_python: str | None
    #: where they were declared, for messages: "the PEP 723 block of hello.py", "report/requirements.txt"
    declared_in: str

    def summary(self, limit: int = 60) -> str:
        """The dependency list as a short line for status screens: "tabulate>=0.9, numpy"."""
        text = ", ".join(self.dependencies)
        return text if len(text) <= limit else text[: limit - 1] + "…"

    def to_json(self) -> dict[str, Any]:
        return {"dependencies": list(self.dependencies), "requires_python": self.requires_python,
                "declared_in": self.declared_in}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EnvSpec:
        return cls(tuple(data["dependencies"]), data.get("requires_python"), data.get("declared_in", ""))


@dataclass(frozen=True)
class Program:
    """A program as found in the programs folder."""

    #: the file to run, relative to the programs folder: "hello.py", "report/main.py", "tool/main"
    entry: str
    #: what it declares, or None: it runs on the pool's interpreter as it is
    spec: EnvSpec | None


def env_id(spec: EnvSpec, target: dict[str, str], index: dict[str, Any]) -> str:
    """The id of the environment `spec` gets on `target` (the interpreter and platform it is built for)
    with these index settings: equal for equal inputs, on any host, in any order of the dependencies."""
    key = {"dependencies": list(spec.dependencies), "requires_python": spec.requires_python,
           "target": target, "index": index}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, separators=(",", ":")).encode())
    return digest.hexdigest()[:ID_LENGTH]


def find_program(programs: Path, program: str) -> Program:
    """The program a manifest's `program:` names (already checked to be a safe relative path, with `.py`
    added to a bare name), and what it declares. ManifestError when there is none or it is malformed."""
    path = resolve_inside(programs, PurePosixPath(program), what="program")
    parts = PurePosixPath(program).parts
    if len(parts) == 2 and parts[1] in ("main.py", "main") and _is_file(path):
        # the entry point of a folder program, as find_program gave it before: the same program again
        return folder_program(path.parent, parts[0])
    if _is_file(path):
        spec = script_spec(path, program) if program.endswith(".py") else None
        return Program(program, spec)
    # `program: report` means report.py, or the folder report/ when there is no such file
    folder_name = program[:-3] if program.endswith(".py") else program
    folder = resolve_inside(programs, PurePosixPath(folder_name), what="program")
    if folder.is_dir() and not folder.is_symlink():
        return folder_program(folder, folder_name)
    raise ManifestError(f"program {folder_name!r} was not found in the programs folder ({programs}): "
                        f"neither {folder_name}.py nor a folder {folder_name}/ with a main.py")


def folder_program(folder: Path, name: str) -> Program:
    if _is_file(folder / "main.py"):
        entry = f"{name}/main.py"
    elif _is_file(folder / "main") and os.access(folder / "main", os.X_OK):
        entry = f"{name}/main"
    else:
        raise ManifestError(f"the program folder {name}/ has no main.py and no executable main: one of them is "
                            "its entry point")
    if _is_file(folder / "requirements.txt"):
        text = _read_text(folder / "requirements.txt", f"{name}/requirements.txt")
        return Program(entry, _spec(requirements_lines(text, f"{name}/requirements.txt"), None,
                                    f"{name}/requirements.txt"))
    if _is_file(folder / "pyproject.toml"):
        text = _read_text(folder / "pyproject.toml", f"{name}/pyproject.toml")
        return Program(entry, pyproject_spec(text, f"{name}/pyproject.toml"))
    return Program(entry, None)


def script_spec(path: Path, name: str) -> EnvSpec | None:
    """The PEP 723 `script` block of a .py program, or None when it has none."""
    with open(path, "rb") as fh:
        raw = fh.read(MAX_SCRIPT_BYTES)
    if b"# /// script" not in raw:
        return None
    text = raw.decode("utf-8", errors="replace")
    blocks = [m for m in _BLOCK.finditer(text) if m.group("type") == "script"]
    if not blocks:
        return None
    if len(blocks) > 1:
        raise EnvSpecError(f"{name} has {len(blocks)} `# /// script` blocks; PEP 723 allows one")
    content = "".join(line[2:] if line.startswith("# ") else line[1:]
                      for line in blocks[0].group("content").splitlines(keepends=True))
    where = f"the PEP 723 block of {name}"
    try:
        data = tomllib.loads(content)
    except tomllib.TOMLDecodeError as exc:
        raise EnvSpecError(f"{where} is not valid TOML: {exc}") from None
    dependencies = data.get("dependencies", [])
    if not isinstance(dependencies, list) or not all(isinstance(d, str) for d in dependencies):
        raise EnvSpecError(f"{where}: `dependencies` must be a list of strings")
    requires = data.get("requires-python")
    if requires is not None and not isinstance(requires, str):
        raise EnvSpecError(f"{where}: `requires-python` must be a string such as \">=3.11\"")
    if not dependencies and requires is None:
        return None
    return _spec([(n, d) for n, d in enumerate(dependencies, 1)], requires, where)


def requirements_lines(text: str, where: str) -> list[tuple[int, str]]:
    """The requirements of a requirements.txt, with their line numbers; options and references refused."""
    found: list[tuple[int, str]] = []
    pending, start = "", 0
    for number, line in enumerate(text.splitlines(), 1):
        if not pending:
            start = number
        line = re.sub(r"(^|\s)#.*$", "", line).rstrip()
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = (pending + line).strip(), ""
        if not line:
            continue
        if line.startswith("-"):
            raise EnvSpecError(f"{where} line {start}: options such as {line.split()[0]!r} are not supported; "
                               "list requirements only (the index is set by environments.* in the daemon's "
                               "config)")
        found.append((start, line))
    return found


def pyproject_spec(text: str, where: str) -> EnvSpec | None:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise EnvSpecError(f"{where} is not valid TOML: {exc}") from None
    project = data.get("project", {})
    if not isinstance(project, dict):
        raise EnvSpecError(f"{where}: [project] must be a table")
    dependencies = project.get("dependencies", [])
    if not isinstance(dependencies, list) or not all(isinstance(d, str) for d in dependencies):
        raise EnvSpecError(f"{where}: [project] dependencies must be a list of strings")
    requires = project.get("requires-python")
    if requires is not None and not isinstance(requires, str):
        raise EnvSpecError(f"{where}: [project] requires-python must be a string such as \">=3.11\"")
    if not dependencies and requires is None:
        return None
    return _spec(list(enumerate(dependencies, 1)), requires, where)


def _spec(lines: list[tuple[int, str]], requires_python: str | None, where: str) -> EnvSpec | None:
    if len(lines) > MAX_DEPENDENCIES:
        raise EnvSpecError(f"{where} lists {len(lines)} dependencies; the limit is {MAX_DEPENDENCIES}")
    normal = set()
    for number, text in lines:
        try:
            requirement = Requirement(text)
        except InvalidRequirement as exc:
            raise EnvSpecError(f"{where}, requirement {number} ({text!r}): not a valid requirement: {exc}") from None
        if requirement.url:
            raise EnvSpecError(f"{where}, requirement {number} ({text!r}): direct references (name @ URL) are not "
                               "supported; install from the index or a wheelhouse (environments.find_links)")
        normal.add(str(requirement))
    if requires_python is not None:
        try:
            requires_python = str(SpecifierSet(requires_python))
        except InvalidSpecifier:
            raise EnvSpecError(f"{where}: requires-python {requires_python!r} is not a version specifier such "
                               "as \">=3.11\"") from None
    if not normal and requires_python is None:
        return None
    return EnvSpec(tuple(sorted(normal)), requires_python, where)


def _is_file(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def _read_text(path: Path, where: str) -> str:
    with open(path, "rb") as fh:
        raw = fh.read(MAX_DECLARATION_BYTES + 1)
    if len(raw) > MAX_DECLARATION_BYTES:
        raise EnvSpecError(f"{where} is larger than {MAX_DECLARATION_BYTES} bytes")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise EnvSpecError(f"{where} is not UTF-8 text") from None
