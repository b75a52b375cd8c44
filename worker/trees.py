"""Walking and removing untrusted trees: a job's folders may be nested far deeper than Python's
recursion limit or PATH_MAX.

os.walk, Path.rglob and shutil.rmtree recurse (a 1,500-deep chain of folders raises RecursionError),
and any call given a path longer than PATH_MAX (4096) fails. Here every walk is iterative, and no
call is given a path longer than LONG_PATH: walk() does not enter a folder past it (it yields it,
for the caller to judge), and remove_tree() first renames such a folder to a short name beside the
tree. Links are never followed. Defined once, in the worker package, for the worker (clean-up, disk
accounting, taking a job's files back) and the daemon (collection, removal) alike.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

#: a path longer than this is not entered by walk() and is moved up by remove_tree(), so no call ever
#: passes PATH_MAX (4096): a name adds at most 256 to it
LONG_PATH = 3072


def too_deep(path: str, depth: int, max_depth: int | None) -> bool:
    """Whether walk() leaves the folder `path` (at `depth`) unentered."""
    return (max_depth is not None and depth >= max_depth) or len(path) > LONG_PATH


def walk(root: Path, *, max_depth: int | None = None,
         skip_errors: bool = False) -> Iterator[tuple[Path, os.stat_result, int]]:
    """Every entry under `root` (not `root` itself) with its lstat and depth (1 for root's children),
    parents before children, never following a link. Folders at `max_depth`, or whose path passes
    LONG_PATH, are yielded but not entered. A folder that vanishes meanwhile is skipped; with
    `skip_errors`, so is one that cannot be read for any other reason."""
    stack: list[tuple[str, int]] = [(str(root), 0)]
    while stack:
        folder, depth = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError:
            if skip_errors:
                continue
            raise
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            yield Path(entry.path), st, depth + 1
            if stat.S_ISDIR(st.st_mode) and not too_deep(entry.path, depth + 1, max_depth):
                stack.append((entry.path, depth + 1))


def remove_tree(path: Path) -> None:
    """Remove a folder (or a file) and everything in it, however deep; one already gone is fine.

    Iterative, and no path it uses passes LONG_PATH: a folder found that deep is first renamed to a
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
        if len(folder) > LONG_PATH:
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
