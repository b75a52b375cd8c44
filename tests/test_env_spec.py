"""What a program declares (dropq.envs.spec): fast rule tests of the parser and of an environment's id.
The tests that claim the feature run real builds: tests/test_environments.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dropq.envs.install import reason_from_log
from dropq.envs.spec import EnvSpec, Program, env_id, find_program
from dropq.errors import EnvSpecError, ManifestError, UnsafePathError

TARGET = {"pool": "local", "python": "3.11.7", "platform": "linux-x86_64"}
INDEX = {"index_url": None, "find_links": None, "no_index": False, "sdists": False}


def script(folder: Path, name: str, block: str, body: str = "print('hi')\n") -> Path:
    path = folder / name
    path.write_text(block + body)
    return path


def test_a_pep_723_block_gives_the_dependencies_and_requires_python(tmp_path: Path) -> None:
    script(tmp_path, "tab.py", '#!/usr/bin/env python3\n"""doc"""\n# /// script\n# requires-python = ">=3.11"\n'
                               '# dependencies = [\n#   "tabulate>=0.9",\n#   "Numpy",\n# ]\n# ///\n')
    found = find_program(tmp_path, "tab.py")
    assert found == Program("tab.py", EnvSpec(("Numpy", "tabulate>=0.9"), ">=3.11", "the PEP 723 block of tab.py"))


def test_a_program_without_a_block_or_with_another_block_type_declares_nothing(tmp_path: Path) -> None:
    script(tmp_path, "plain.py", "# a comment\n")
    script(tmp_path, "other.py", "# /// pyproject\n# [tool.x]\n# y = 1\n# ///\n")
    assert find_program(tmp_path, "plain.py") == Program("plain.py", None)
    assert find_program(tmp_path, "other.py") == Program("other.py", None)


@pytest.mark.parametrize(("block", "says"), [
    ('# /// script\n# dependencies = "tabulate"\n# ///\n', "must be a list of strings"),
    ('# /// script\n# dependencies = [\n# ///\n', "not valid TOML"),
    ('# /// script\n# dependencies = ["not a requirement!"]\n# ///\n', "requirement 1 ('not a requirement!')"),
    ('# /// script\n# dependencies = ["x @ file:///etc/passwd"]\n# ///\n', "direct references"),
    ('# /// script\n# requires-python = "three"\n# ///\n', "is not a version specifier"),
    ('# /// script\n# dependencies = []\n# ///\nx = 1\n# /// script\n# dependencies = []\n# ///\n',
     "2 `# /// script` blocks"),
])
def test_a_malformed_block_is_refused_with_the_reason(tmp_path: Path, block: str, says: str) -> None:
    script(tmp_path, "bad.py", block)
    with pytest.raises(EnvSpecError, match="bad.py") as caught:
        find_program(tmp_path, "bad.py")
    assert says in str(caught.value)


def test_a_folder_program_reads_requirements_txt_and_keeps_its_entry_point(tmp_path: Path) -> None:
    folder = tmp_path / "report"
    folder.mkdir()
    (folder / "main.py").write_text("import helper\n")
    (folder / "requirements.txt").write_text("# what report needs\ntabulate>=0.9  # tables\n\nsix \\\n  >=1.16\n")
    found = find_program(tmp_path, "report.py")  # a manifest's `program: report`
    assert found == Program("report/main.py", EnvSpec(("six>=1.16", "tabulate>=0.9"), None, "report/requirements.txt"))
    # the entry point, given again (as the stored manifest has it), is the same program
    assert find_program(tmp_path, "report/main.py") == found


@pytest.mark.parametrize("line", ["-r other.txt", "--index-url https://evil.example/simple", "-e .",
                                  "--extra-index-url=https://x", "-c constraints.txt"])
def test_requirements_txt_options_are_refused_with_the_line(tmp_path: Path, line: str) -> None:
    folder = tmp_path / "p"
    folder.mkdir()
    (folder / "main.py").write_text("")
    (folder / "requirements.txt").write_text(f"tabulate\n{line}\n")
    with pytest.raises(EnvSpecError, match=r"p/requirements.txt line 2: options such as .* are not supported"):
        find_program(tmp_path, "p.py")


def test_a_folder_program_with_pyproject_or_an_executable_main(tmp_path: Path) -> None:
    (tmp_path / "proj").mkdir()
    (tmp_path / "proj" / "main.py").write_text("")
    (tmp_path / "proj" / "pyproject.toml").write_text('[project]\nname = "x"\nrequires-python = ">=3.10"\n'
                                                      'dependencies = ["tabulate"]\n')
    assert find_program(tmp_path, "proj.py").spec == EnvSpec(("tabulate",), ">=3.10", "proj/pyproject.toml")
    (tmp_path / "tool").mkdir()
    main = tmp_path / "tool" / "main"
    main.write_text("#!/bin/sh\necho hi\n")
    os.chmod(main, 0o755)
    assert find_program(tmp_path, "tool.py") == Program("tool/main", None)


def test_a_missing_program_or_a_folder_without_an_entry_point_is_named(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="program 'nothing' was not found"):
        find_program(tmp_path, "nothing.py")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "main").write_text("not executable")
    with pytest.raises(ManifestError, match="has no main.py and no executable main"):
        find_program(tmp_path, "empty.py")


def test_a_program_folder_through_a_symlink_is_refused(tmp_path: Path) -> None:
    (tmp_path / "programs").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "main.py").write_text("")
    (tmp_path / "programs" / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(UnsafePathError):
        find_program(tmp_path / "programs", "link.py")


def test_an_environment_id_depends_on_what_determines_it_and_nothing_else() -> None:
    spec = EnvSpec(("a", "b>=1"), None, "x")
    same = EnvSpec(("a", "b>=1"), None, "another place")  # where it was declared is not part of it
    assert env_id(spec, TARGET, INDEX) == env_id(same, TARGET, INDEX)
    assert len(env_id(spec, TARGET, INDEX)) == 16
    others = {env_id(EnvSpec(("a",), None, "x"), TARGET, INDEX),
              env_id(EnvSpec(("a", "b>=1"), ">=3.12", "x"), TARGET, INDEX),
              env_id(spec, {**TARGET, "python": "3.12.1"}, INDEX),
              env_id(spec, TARGET, {**INDEX, "no_index": True}),
              env_id(spec, TARGET, INDEX)}
    assert len(others) == 5


def test_the_installers_reason_is_one_sentence_naming_the_requirement() -> None:
    tail = ("Using Python 3.11.2\n  × No solution found when resolving dependencies:\n"
            "  ╰─▶ Because this-package-does-not-exist was not found in the package registry and you require\n"
            "      this-package-does-not-exist==1.0, we can conclude that your requirements are unsatisfiable.\n")
    reason = reason_from_log(tail)
    assert "this-package-does-not-exist" in reason and "\n" not in reason
    assert reason_from_log("") == "the installer failed without a message; see env-build.log"
