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
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from .errors import UnsafePathError
from .escape import printable


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
#: a path longer than this is moved up before it is read or removed, so no call ever passes PATH_MAX
#: (4096) however deep an untrusted tree goes: a name adds at most 256 to it
_LONG_PATH = 3072


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


def walk(root: Path, *, max_depth: int = MAX_DEPTH) -> Iterator[tuple[Path, os.stat_result, int]]:
    """Every entry under `root` (not `root` itself) with its lstat and depth (1 for root's children),
    parents before children, never following a link. Iterative: an untrusted tree's depth can never
    exhaust the stack (os.walk, Path.rglob and shutil.rmtree recurse). Folders deeper than
    `max_depth`, or whose path passes _LONG_PATH, are yielded but not entered."""
    stack: list[tuple[str, int]] = [(str(root), 0)]
    while stack:
        folder, depth = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            st = entry.stat(follow_symlinks=False)
            yield Path(entry.path), st, depth + 1
            if stat.S_ISDIR(st.st_mode) and not _too_deep(entry.path, depth + 1, max_depth):
                stack.append((entry.path, depth + 1))


def _too_deep(path: str, depth: int, max_depth: int) -> bool:
    return depth >= max_depth or len(path) > _LONG_PATH


def collect_tree(src: Path, dst: Path) -> list[str]:
    """Move what a job left in `src` to `dst`, keeping only directories and regular files.

    The tree is moved first, by one rename, into a folder the job cannot reach; only then is each
    entry checked with lstat, so a job racing the check cannot swap a link in. Symlinks, FIFOs,
    sockets, devices and files with more than one hard link (possibly a link to a file outside the
    job) are removed, never read and never written through, and so are folders nested deeper than
    MAX_DEPTH (or with paths longer than _LONG_PATH). Returns their paths relative to `dst` for
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
    for path, st, depth in walk(dst):
        if stat.S_ISDIR(st.st_mode):
            if _too_deep(str(path), depth, MAX_DEPTH):
                doomed.append((path, True))
        elif not (stat.S_ISREG(st.st_mode) and st.st_nlink == 1):
            doomed.append((path, False))
    dropped = []
    for path, deep in doomed:
        # the names are the job's: shown escaped (a byte that is not UTF-8 would stop result.yaml's writing)
        rel = printable(str(path.relative_to(dst)))
        if deep:
            remove_tree(path)
            dropped.append(f"{rel[:200]}... (folders nested too deep: {MAX_DEPTH} levels or {_LONG_PATH} "
                           "characters at most)")
        else:
            os.unlink(path)
            dropped.append(rel)
    return sorted(dropped)


def remove_tree(path: Path) -> None:
    """Remove a folder and everything in it, however deep; a folder already gone is fine.

    Iterative, and no path it uses passes _LONG_PATH: a folder found that deep is first renamed to a
    short name beside `path`, then removed from there. It never follows a link."""
    try:
        os.rmdir(path)  # most are empty by now (their content was moved out): one syscall
        return
    except FileNotFoundError:
        return
    except OSError:
        pass
    if not os.path.lexists(path):
        return
    if not stat.S_ISDIR(os.lstat(path).st_mode):
        os.unlink(path)
        return
    parked = 0
    stack = [str(path)]  # folders to empty; a folder is removed once a second visit finds it empty
    while stack:
        folder = stack[-1]
        if len(folder) > _LONG_PATH:
            parked += 1
            short = f"{path}.deep-{os.getpid()}-{parked}"
            os.rename(folder, short)
            stack[-1] = folder = short
        pushed = False
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                    pushed = True
                else:
                    os.unlink(entry.path)
        if not pushed:
            os.rmdir(folder)
            stack.pop()


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
