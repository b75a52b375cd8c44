"""Untrusted trees: a job's folders may be nested far deeper than Python's recursion limit or PATH_MAX.

Every walk, copy and removal of such a tree (collection, lost-worker clean-up, the outbox) must finish
without recursion and without a path the kernel refuses."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from dropq.paths import MAX_DEPTH, collect_tree, move, remove_tree, walk


def _deep(root: Path, levels: int, name: str = "d") -> Path:
    """A chain of `levels` nested folders made with relative mkdir/chdir (as a job can), which no
    absolute path can reach once it passes PATH_MAX."""
    fd = os.open(root, os.O_RDONLY)
    try:
        for _ in range(levels):
            os.mkdir(name, dir_fd=fd)
            child = os.open(name, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = child
        with open(os.open("leaf.txt", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "w") as fh:
            fh.write("deep")
        os.symlink("/etc/passwd", "passwd", dir_fd=fd)
    finally:
        os.close(fd)
    return root


@pytest.mark.parametrize("levels, name", [(sys.getrecursionlimit() + 500, "d"), (40, "n" * 250)])
def test_removing_a_tree_deeper_than_the_recursion_limit_and_path_max(tmp_path: Path, levels: int,
                                                                         name: str) -> None:
    root = tmp_path / "staging"
    root.mkdir()
    _deep(root, levels, name)
    remove_tree(root)
    assert os.listdir(tmp_path) == []


def test_collecting_a_deep_tree_keeps_it_up_to_the_limit_and_drops_the_rest_and_every_link(tmp_path: Path) -> None:
    src, dst = tmp_path / "out", tmp_path / "collected"
    src.mkdir()
    _deep(src, 1500)
    (src / "kept.txt").write_text("top")
    os.symlink("/etc/passwd", src / "passwd")
    dropped = collect_tree(src, dst)
    assert (dst / "kept.txt").read_text() == "top"
    assert "passwd" in dropped
    assert len(dropped) == 2
    deep = next(d for d in dropped if d != "passwd")
    assert "nested too deep" in deep
    depth = max(d for _, _, d in walk(dst, max_depth=10**6))
    assert depth == MAX_DEPTH - 1
    assert not any(os.path.islink(p) for p, _, _ in walk(dst, max_depth=10**6))


def test_moving_a_deep_tree_across_filesystems_copies_without_recursion(tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on another filesystem than the temporary folder")
    src = tmp_path / "tree"
    src.mkdir()
    _deep(src, 300)
    dst = shm / f"dq-trees-{os.getpid()}"
    try:
        move(src, dst)
        assert not src.exists()
        # the copy stops one level below what collection keeps: collection then reports the rest as dropped
        assert max(d for _, _, d in walk(dst, max_depth=10**6)) == MAX_DEPTH + 1
        assert any("nested too deep" in d for d in collect_tree(dst, tmp_path / "collected"))
    finally:
        remove_tree(dst)


def test_dropped_names_that_are_not_utf8_or_carry_controls_are_reported_escaped(tmp_path: Path) -> None:
    src = tmp_path / "out"
    src.mkdir()
    os.symlink("/etc/passwd", os.path.join(os.fsencode(src), b"caf\xe9-link"))
    os.symlink("/etc/passwd", src / "two\nlines\x1b[2J")
    dropped = collect_tree(src, tmp_path / "collected")
    assert dropped == ["caf\\xe9-link", "two\\nlines\\x1b[2J"]
    for name in dropped:
        name.encode("utf-8")  # what result.yaml's writer needs


def test_the_worker_removes_a_deep_leftover_staging_folder(tmp_path: Path) -> None:
    """A job's leftover output folder on its worker, deeper than the recursion limit (the worker's
    Staging.remove used shutil.rmtree)."""
    from dropq_worker.protocol import Staging

    staging = Staging(jobs_dir=tmp_path, key="j1-1-abc")
    staging.output.mkdir(parents=True)
    _deep(staging.output, sys.getrecursionlimit() + 200)
    staging.remove()
    assert not staging.exists()
