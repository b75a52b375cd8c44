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

from .errors import UnsafePathError


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


def move(src: Path, dst: Path) -> None:
    """Rename `src` to `dst`, copying (without following links) when they are on different filesystems."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(src, dst)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        if src.is_dir() and not src.is_symlink():
            shutil.copytree(src, dst, symlinks=True, ignore=_special_files)
            shutil.rmtree(src)
        else:
            shutil.copy2(src, dst, follow_symlinks=False)
            os.unlink(src)


def collect_tree(src: Path, dst: Path) -> list[str]:
    """Move what a job left in `src` to `dst`, keeping only directories and regular files.

    The tree is moved first, by one rename, into a folder the job cannot reach; only then is each
    entry checked with lstat, so a job racing the check cannot swap a link in. Symlinks, FIFOs,
    sockets, devices and files with more than one hard link (possibly a link to a file outside the
    job) are removed, never read and never written through. Returns their paths relative to `dst`,
    for result.yaml.
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
    doomed: list[Path] = []
    for folder, dirs, files in os.walk(dst, followlinks=False):
        for name in [*dirs, *files]:
            path = Path(folder, name)
            st = os.lstat(path)
            if not (stat.S_ISDIR(st.st_mode) or (stat.S_ISREG(st.st_mode) and st.st_nlink == 1)):
                doomed.append(path)
        # os.walk lists a symlink to a directory among `dirs` without descending into it; keep it so
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(folder, d))]
    dropped = []
    for path in doomed:
        os.unlink(path)
        dropped.append(str(path.relative_to(dst)))
    return sorted(dropped)


def remove_tree(path: Path) -> None:
    """Remove a folder and everything in it; a folder already gone is fine."""
    try:
        os.rmdir(path)  # most are empty by now (their content was moved out): one syscall
        return
    except FileNotFoundError:
        return
    except OSError:
        pass
    if os.path.lexists(path):
        shutil.rmtree(path)


def _special_files(folder: str, names: list[str]) -> list[str]:
    """For copytree: FIFOs, sockets and devices are never copied (reading a FIFO would block)."""
    keep = (stat.S_ISDIR, stat.S_ISREG, stat.S_ISLNK)
    return [n for n in names if not any(test(os.lstat(os.path.join(folder, n)).st_mode) for test in keep)]
