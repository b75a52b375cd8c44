"""Process-tree hygiene for the worker: nothing a job starts may outlive it.

The worker makes itself a child subreaper, so a job's orphans (a daemonised child, a grandchild that
called setsid and escaped the process group) are re-parented to the worker instead of init. When a
job ends, the worker kills its process group and then every child it still has: those can only be
what jobs left behind.

Why not psutil (considered for issue 19; decided against): of what this module and isolation.py read,
psutil covers three, and none better. `Process.children()` finds children by reading every process's
/proc/PID/stat (its ppid map), the slow path `children()` below avoids with the kernel's per-thread
children lists (that scan was a third of a worker's CPU per job on a busy host); `create_time()` is a
float rebuilt from the boot time, where the `running.pid` check wants the kernel's exact start ticks;
`process_iter(["uids"])` reads the same /proc/PID/status as `isolation.processes_of`, for about eight
fewer lines. The rest (prctl subreaper and dumpable, oom_score_adj, the cgroup's memory and pids
counters) psutil does not cover at all. Against that: a compiled dependency on the host (the local pool
runs this package there) and in the image, whose Debian base is built once and reused by its tag, so
existing hosts would need a new base tag and a debootstrap at upgrade. Revisit if the worker needs
per-process CPU or memory figures, which psutil does well.
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
from pathlib import Path

_PR_SET_CHILD_SUBREAPER = 36
_PR_SET_DUMPABLE = 4

#: children of the worker that are its own, not left by a job: its fork servers (see warm.py), which
#: kill_leftovers() must leave alone
_SPARED: set[int] = set()


def spare(pid: int) -> None:
    _SPARED.add(pid)


def unspare(pid: int) -> None:
    _SPARED.discard(pid)


def become_subreaper() -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def make_undumpable() -> bool:
    """Keep processes of the same uid (the jobs) out of /proc/<pid>/environ and /proc/<pid>/mem, where
    the worker's token would be; a job's exec() resets its own flag, so this one process is covered."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def children(pid: int) -> list[int]:
    """The direct children of `pid`. The kernel lists them per thread in /proc/PID/task/TID/children
    (a few tiny reads); where that file is missing, every process's stat is read instead, which was
    a third of a worker's CPU time per job on a busy host."""
    found: list[int] = []
    listed = False
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        tasks = []
    for tid in tasks:
        try:
            text = Path(f"/proc/{pid}/task/{tid}/children").read_text()
        except OSError:
            continue
        listed = True
        found.extend(int(child) for child in text.split())
    if listed:
        return found
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        # the command name may contain spaces and parentheses; the fields after the last ')' do not
        fields = stat[stat.rfind(")") + 2 :].split()
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def start_time(pid: int) -> int | None:
    """The kernel's start time of `pid` (clock ticks since boot), to tell a reused pid from the original."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rfind(")") + 2 :].split()[19])


def kill_group(pgid: int, sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass
    except PermissionError as exc:  # a setuid program in the group; nothing more we may do
        if exc.errno != errno.EPERM:
            raise


def kill_leftovers(*, rounds: int = 50) -> int:
    """Kill and reap every child of this process (what finished jobs left behind), but for its fork
    servers; how many were killed."""
    me = os.getpid()
    killed = 0
    for _ in range(rounds):
        pids = [pid for pid in children(me) if pid not in _SPARED]
        if not pids:
            break
        for pid in pids:
            try:
                pgid = os.getpgid(pid)
                if pgid != os.getpgrp():
                    os.killpg(pgid, signal.SIGKILL)
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            killed += 1
        for pid in pids:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
    return killed


# --- memory: the cgroup a worker container runs in ------------------------------------------------

_OOM_FILES = ("/sys/fs/cgroup/memory.events", "/sys/fs/cgroup/memory/memory.oom_control")
_LIMIT_FILES = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def _counter(paths: tuple[str, ...], key: str) -> int | None:
    """The value of `key` in the first of these cgroup files (v2, then v1) that has it."""
    for path in paths:
        try:
            for line in Path(path).read_text().splitlines():
                name, _, value = line.partition(" ")
                if name == key:
                    return int(value)
        except (OSError, ValueError):
            continue
    return None


def _limit(paths: tuple[str, ...]) -> int | None:
    """The first of these cgroup limit files that holds a number ("max" and huge values mean none)."""
    for path in paths:
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        return int(text) if text.isdigit() and int(text) < 1 << 60 else None
    return None


_PIDS_EVENTS = ("/sys/fs/cgroup/pids.events", "/sys/fs/cgroup/pids/pids.events")
_PIDS_MAX = ("/sys/fs/cgroup/pids.max", "/sys/fs/cgroup/pids/pids.max")


def oom_kills() -> int | None:
    """How many processes the kernel's OOM killer has killed in this cgroup, if it says."""
    return _counter(_OOM_FILES, "oom_kill")


def memory_limit() -> int | None:
    """This cgroup's memory limit in bytes, or None when there is none."""
    return _limit(_LIMIT_FILES)


def pids_refusals() -> int | None:
    """How often this cgroup refused a new process for its pids limit (a fork bomb hits it)."""
    return _counter(_PIDS_EVENTS, "max")


def pids_limit() -> int | None:
    return _limit(_PIDS_MAX)


def make_oom_victim(pid: int) -> None:
    """Make `pid` the first process the OOM killer picks, so a job that eats all memory dies, not the
    worker serving it. Raising one's own score needs no privilege."""
    try:
        Path(f"/proc/{pid}/oom_score_adj").write_text("1000")
    except OSError:
        return


def human_bytes(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:g} {unit}" if unit == "bytes" else f"{n:.0f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)
