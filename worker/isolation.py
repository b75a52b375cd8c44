"""Each job under a uid of its own, so that the kernel, not care, keeps it to its own things.

A worker given a range of job uids (`--job-uids BASE:COUNT`) runs as root with a few capabilities and
starts each job under the next uid of its range, with no supplementary groups and no capabilities
at all (the worker empties its bounding set at start, and setuid() to a non-root uid clears the rest).
The job can then write only its own output folder (made for it, mode 0700) and the private `/tmp`;
the worker's socket, its staging folder (mode 0711: it can neither list nor create there), the
capture files and every other job's files are not its own and not writable by it.

When the job ends, the worker:

1. kills every process of the job's uid, from a child that took that uid (`kill(-1)` reaches every
   process the sender may signal, so a `setsid` escapee too, and nothing of any other uid);
2. removes every entry the uid owns in `/tmp` and `/dev/shm`;
3. takes the output tree back: every entry is `lchown`ed to the owner (the daemon's uid), and the
   folder is made 0700, so no job uid can reach it again;

and only then reports the job done: the next job, under the next uid, finds nothing of it.

Nothing here recurses: a job's tree may be deeper than Python's stack.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import signal
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from . import procs, trees

_PR_CAPBSET_DROP = 24
#: how many uids each worker takes from the configured range (workers.job_uids), rotated per job
PER_WORKER = 8
#: where a job may leave files besides its output folder, which the worker empties of them
SCRATCH = (Path("/tmp"), Path("/dev/shm"))


class IsolationError(RuntimeError):
    """The worker cannot isolate its jobs as it was asked to (not root, a capability missing)."""


@dataclass(frozen=True, kw_only=True)
class JobUids:
    """The uids this worker's jobs run as (first, first+1, ...), and who gets their files afterwards."""

    first: int
    count: int
    owner_uid: int
    owner_gid: int

    def nth(self, n: int) -> int:
        return self.first + n % self.count


def parse_uids(text: str, owner: str) -> JobUids:
    """`BASE:COUNT` and `UID:GID`, as given on the worker's command line."""
    first, _, count = text.partition(":")
    uid, _, gid = owner.partition(":")
    try:
        uids = JobUids(first=int(first), count=int(count or 1), owner_uid=int(uid), owner_gid=int(gid or uid))
    except ValueError:
        raise IsolationError(f"--job-uids BASE:COUNT and --owner UID:GID take numbers, "
                             f"not {text!r} and {owner!r}") from None
    if uids.first <= 0 or uids.count < 1:
        raise IsolationError("job uids start above 0 (root), and there is at least one")
    return uids


def prepare_worker() -> None:
    """Check the worker may switch uids, and empty its bounding set, so that no program a job runs can
    ever gain a capability (not even through a file capability or a set-uid binary)."""
    if os.geteuid() != 0:
        raise IsolationError("a worker that runs jobs under their own uids must start as root "
                             "(with only the capabilities SECURITY.md lists)")
    libc = ctypes.CDLL(None, use_errno=True)
    cap = 0
    while cap < 64:
        if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            err = ctypes.get_errno()
            if err == 22:  # EINVAL: past the last capability this kernel knows
                break
            raise IsolationError(f"could not drop capability {cap} from the bounding set "
                                 f"({os.strerror(err)}; the worker needs CAP_SETPCAP)")
        cap += 1


def make_output(path: Path, uid: int) -> None:
    """The job's working folder, its own and no one else's."""
    os.mkdir(path, 0o700)
    os.chown(path, uid, uid)


def processes_of(uid: int) -> list[int]:
    """The live processes whose real, effective or saved uid is `uid` (zombies are dead already)."""
    wanted = str(uid).encode()
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/status", "rb") as fh:
                fields = dict(line.split(b":", 1) for line in fh.read().splitlines() if b":" in line)
        except OSError:  # gone meanwhile
            continue
        if fields.get(b"State", b"Z").split()[:1] in ([b"Z"], [b"X"]):
            continue
        if wanted in fields.get(b"Uid", b"").split()[:3]:
            found.append(int(entry.name))
    return found


def kill_uid(uid: int, *, reap: bool = True) -> None:
    """Kill every process running as `uid` and, with `reap`, reap them (they are all the worker's: it
    is their subreaper, or init); without, signal them once and return.

    Usually none is left and this is one look at /proc; otherwise a child that becomes `uid` calls
    kill(-1), which reaches every process of that uid at once (`setsid` escapees and processes forked
    meanwhile included) and nothing of another uid."""
    for _ in range(20):
        if not processes_of(uid):
            return
        _kill_all_as(uid)
        if not reap:
            return
        procs.kill_leftovers()  # reaps them: a dead child stays a zombie (and a pid) until then


def _kill_all_as(uid: int) -> None:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child only makes system calls, then leaves
        code = 0
        try:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            os.kill(-1, signal.SIGKILL)
        except BaseException:  # noqa: BLE001 - a forked child must never return into the worker
            code = 1
        os._exit(code)
    os.waitpid(pid, 0)


def walk(root: Path) -> Iterator[tuple[str, os.stat_result]]:
    """Every entry below `root` with its lstat, however deep (see trees.walk), skipping what cannot be read."""
    for path, st, _ in trees.walk(root, skip_errors=True):
        yield str(path), st


def remove_tree(path: str) -> None:
    """Remove `path` and all below it, however deep, without following a link (see trees.remove_tree)."""
    trees.remove_tree(Path(path))


def owned_in_scratch(uid: int) -> list[str]:
    """The top-level entries of /tmp and /dev/shm that `uid` owns (what a job of that uid left)."""
    found = []
    for place in SCRATCH:
        try:
            with os.scandir(place) as entries:
                for entry in entries:
                    try:
                        if entry.stat(follow_symlinks=False).st_uid == uid:
                            found.append(entry.path)
                    except OSError:
                        continue
        except OSError:
            continue
    return found


def clear_scratch(uid: int) -> None:
    for path in owned_in_scratch(uid):
        remove_tree(path)


def take_back(output: Path, uids: JobUids) -> None:
    """Give the job's output tree to the owner and close the folder to every job uid."""
    try:
        os.lchown(output, uids.owner_uid, uids.owner_gid)
    except FileNotFoundError:
        return
    os.chmod(output, 0o700)
    for path, _ in walk(output):
        try:
            os.lchown(path, uids.owner_uid, uids.owner_gid)
        except FileNotFoundError:
            continue


def human(n: int) -> str:
    """A byte count in words: 1.0 GiB, 512.0 KiB."""
    for unit in ("bytes", "KiB", "MiB"):
        if n < 1024:
            return f"{n} bytes" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n:.1f} GiB"


def reclaim(jobs: Path, uids: JobUids) -> list[str]:
    """At the worker's start: end whatever a previous worker process's jobs left (their processes, their
    files in /tmp and /dev/shm), and take back every staging entry a job uid still owns, so that none
    of it reaches the jobs this worker runs, and the daemon (maybe not root) can remove it. The names
    of the entries taken back."""
    mine = range(uids.first, uids.first + uids.count)
    for uid in mine:
        kill_uid(uid)
        clear_scratch(uid)
    taken = []
    with os.scandir(jobs) as entries:
        for entry in entries:
            if entry.stat(follow_symlinks=False).st_uid in mine:
                take_back(Path(entry.path), uids)
                taken.append(entry.name)
    return taken


def disk_used(output: Path, uid: int | None) -> int:
    """Bytes on disk of the job's output tree, plus (with `uid`) of what that uid owns in /tmp and
    /dev/shm. A file linked several times counts once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    roots = [output] + ([Path(p) for p in owned_in_scratch(uid)] if uid is not None else [])
    for root in roots:
        try:
            top = os.lstat(root)
        except OSError:
            continue
        below = walk(root) if stat.S_ISDIR(top.st_mode) else iter(())
        for _, st in itertools.chain([(str(root), top)], below):
            if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                if (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
    return total
