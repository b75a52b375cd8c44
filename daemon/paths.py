"""Path checks for untrusted names, and moves that never follow a link.

Every path a manifest names is checked twice: lexically (no absolute path, no `..`, no NUL) when the
manifest is parsed, and again after resolving symlinks, against the real path of its root, right
before any file operation. Comparing whole path components (`Path.is_relative_to`) rather than string
prefixes is what refuses a sibling such as `inbox-evil/` for the root `inbox/`.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from pathlib import Path, PurePosixPath

from dropq.errors import UnsafePathError
from dropq.escape import printable
from dropq_worker.trees import LONG_PATH, remove_tree, too_deep, walk

__all__ = ["MAX_DEPTH", "check_relative", "collect_tree", "move", "remove_tree", "resolve_inside", "walk"]


def check_relative(value: object, *, what: str) -> PurePosixPath:
    """A lexically safe relative path, or UnsafePathError naming `what`."""
    if not isinstance(value, str) or not value.strip():
        raise UnsafePathError(f"{what} must be a non-empty relative path")
    if "\x00" in value:
        raise UnsafePathError(f"{what} {value!r} contains a NUL byte")
    path = PurePosixPath(value)
    if path.is_absolute():
        raise UnsafePathError(f"{what} {value!r} is an absolute path; give a path relative to its folder")
    if ".." in path.parts:
        raise UnsafePathError(f"{what} {value!r} contains '..'; it may not leave its folder")
    if not path.parts:
        raise UnsafePathError(f"{what} {value!r} names no file")
    return path


def resolve_inside(root: Path, rel: PurePosixPath, *, what: str) -> Path:
    """`root/rel`, provided that no symlink on the way leads elsewhere; the file need not exist."""
    real_root = Path(os.path.realpath(root))
    candidate = real_root.joinpath(*rel.parts)
    real = Path(os.path.realpath(candidate))
    if not real.is_relative_to(real_root):
        raise UnsafePathError(f"{what} {str(rel)!r} leads outside its folder through a symlink")
    if real != candidate:
        raise UnsafePathError(f"{what} {str(rel)!r} goes through a symlink, which is not allowed")
    return candidate


#: collection keeps a job's folders this deep; anything deeper is dropped and reported (no program that
#: means its output to be read nests folders this far, and a walk must stay bounded)
MAX_DEPTH = 128


def move(src: Path, dst: Path) -> None:
    """Rename `src` to `dst`, copying (without following links) when they are on different filesystems."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(src, dst)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        if src.is_dir() and not src.is_symlink():
            _copy_tree(src, dst)
            remove_tree(src)
        else:
            shutil.copy2(src, dst, follow_symlinks=False)
            os.unlink(src)


def collect_tree(src: Path, dst: Path) -> list[str]:
    """Move what a job left in `src` to `dst`, keeping only directories and regular files.

    The tree is moved first, by one rename, into a folder the job cannot reach; only then is each
    entry checked with lstat, so a job racing the check cannot swap a link in. Symlinks, FIFOs,
    sockets, devices and files with more than one hard link (possibly a link to a file outside the
    job) are removed, never read and never written through, and so are folders nested deeper than
    MAX_DEPTH (or with paths longer than LONG_PATH). Returns their paths relative to `dst` for
    result.yaml (a deep folder's, shortened).
    """
    if not os.path.lexists(src):
        dst.mkdir(parents=True, exist_ok=True)
        return []
    move(src, dst)
    if not stat.S_ISDIR(os.lstat(dst).st_mode):
        os.unlink(dst)
        dst.mkdir()
        return ["."]
    # Judge every entry from one snapshot taken before anything is removed: dropping one of two hard
    # links would otherwise leave the other looking like a file of its own.
    doomed: list[tuple[Path, bool]] = []
    for path, st, depth in walk(dst, max_depth=MAX_DEPTH):
        if stat.S_ISDIR(st.st_mode):
            if too_deep(str(path), depth, MAX_DEPTH):
                doomed.append((path, True))
        elif not (stat.S_ISREG(st.st_mode) and st.st_nlink == 1):
            doomed.append((path, False))
    dropped = []
    for path, deep in doomed:
        # the names are the job's: shown escaped (a byte that is not UTF-8 would stop result.yaml's writing)
        rel = printable(str(path.relative_to(dst)))
        if deep:
            remove_tree(path)
            dropped.append(f"{rel[:200]}... (folders nested too deep: {MAX_DEPTH} levels or {LONG_PATH} "
                           "characters at most)")
        else:
            os.unlink(path)
            dropped.append(rel)
    return sorted(dropped)


def _copy_tree(src: Path, dst: Path) -> None:
    """Copy a tree without recursion or following links; FIFOs, sockets and devices are left out
    (reading a FIFO would block). Links are copied as links, to be judged later like the rest."""
    dst.mkdir()
    for path, st, _ in walk(src, max_depth=MAX_DEPTH + 1):
        target = dst / path.relative_to(src)
        if stat.S_ISDIR(st.st_mode):
            target.mkdir()
        elif stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(path), target)
        elif stat.S_ISREG(st.st_mode):
            shutil.copy2(path, target, follow_symlinks=False)
