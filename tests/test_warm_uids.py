"""Warm interpreters under per-job uids (issue 15, the hardened default): the equivalence programs run
fresh and forked with `--job-uids` give the same results, and a forked job is as confined as a fresh
one: it cannot signal, trace or read the (root) fork server, holds its uid's own group and no other,
no capability, and an environment's `.pth` file runs as the job's uid, never as root.

Real workers as root (the local pool runs jobs under their uids only as root; CI runs as root), each
with its own uid range, far from those other tests use. Jobs run /usr/bin/python3: the worker's
own interpreter lives under /root, which no job uid may enter.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_warm_equivalence import EXTRA, FOLDER, PROGRAMS, Worker, _zombie, key, start_worker, stop_worker

from dropq_worker import isolation, procs
from dropq_worker.protocol import JobSpec
from helpers import wait_until

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/usr/bin/python3"),
                                reason="jobs under uids of their own need root (CI runs as root) and /usr/bin/python3")

PYTHON = "/usr/bin/python3"
#: two ranges of 8 uids, one per worker, apart from other test processes' (and from test_owners')
BASE = 1_750_000_000 + (os.getpid() % 50_000) * 16
ENV_ID = "00000000000000e1"

ATTACK = textwrap.dedent("""\
    import ctypes, errno, os, signal
    server = os.getppid()  # a forked job's parent is its fork server
    print("server uid", os.stat(f"/proc/{server}").st_uid, "my uid", os.getuid())
    print("resuid", len(set(os.getresuid())), "resgid", len(set(os.getresgid())),
          "gid is uid", os.getgid() == os.getuid())
    print("groups", os.getgroups())
    try:
        os.kill(server, 0)
        print("signal: allowed")
    except PermissionError:
        print("signal: refused")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.ptrace(16, server, 0, 0) == 0:  # PTRACE_ATTACH
        print("ptrace: allowed")
    else:
        print("ptrace:", errno.errorcode[ctypes.get_errno()])
    for name in ("environ", "mem", "maps", "cmdline"):
        try:
            with open(f"/proc/{server}/{name}", "rb") as fh:
                fh.read(1)
            print(name + ": read")
        except PermissionError:
            print(name + ": refused")
        except OSError as exc:
            print(name + ":", errno.errorcode[exc.errno])
    caps = {}
    for line in open("/proc/self/status"):
        if line.startswith("Cap") or line.startswith("NoNewPrivs"):
            name, value = line.split(":")
            caps[name] = value.strip()
    print(sorted(caps.items()))
    print("own environ readable", len(open("/proc/self/environ", "rb").read()) > 0)
    print("fds", sorted(int(fd) for fd in os.listdir("/proc/self/fd")))
    """)

PTH_PROGRAM = textwrap.dedent("""\
    import os, sys
    print(open(os.path.join(os.environ["DROPQ_OUTPUT"], "pth-ran-as.txt")).read())
    print("uid", os.getuid())
    print("prefix is the environment", sys.prefix.endswith("%s"), "executable", sys.executable.endswith("/bin/python"))
    print("in path", any(p.endswith("site-packages") and "%s" in p for p in sys.path))
    """) % (ENV_ID, ENV_ID)

PRELOADS = textwrap.dedent("""\
    # /// script
    # [tool.dropq]
    # preload = ["csv"]
    # ///
    import sys
    print("json", "json" in sys.modules, "csv", "csv" in sys.modules, "dropq_worker", "dropq_worker" in sys.modules)
    """)

#: a child interpreter started by multiprocessing's spawn gets the interpreter flags of sys.flags: it must
#: find the environment's packages as a fresh start's child does (not -I -S, the server's own)
SPAWN = textwrap.dedent("""\
    import multiprocessing, sys
    def value(_):
        import envmod
        return envmod.VALUE, sys.flags.no_site, sys.flags.isolated
    if __name__ == "__main__":
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            print(pool.map(value, [0]))
    """)

PTH_LINE = ("import os; open(os.path.join(os.environ['DROPQ_OUTPUT'], 'pth-ran-as.txt'), 'w')"
            ".write(f'pth ran as {os.getuid()} {os.geteuid()} groups {os.getgroups()}')\n")


@pytest.fixture(scope="module")
def root() -> Iterator[Path]:
    # not under pytest's temporary folder, which is root's alone: job uids must read the programs
    folder = Path(tempfile.mkdtemp(prefix="dq-warmuid-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder)


@pytest.fixture(scope="module")
def programs(root: Path) -> Path:
    folder = root / "programs"
    for name, text in {**PROGRAMS, **FOLDER, "attack.py": ATTACK, "pth.py": PTH_PROGRAM,
                       "preloads.py": PRELOADS,
                       "spawn.py": SPAWN}.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(text.encode("latin-1" if "coding: latin-1" in text else "utf-8"))
    return folder


@pytest.fixture(scope="module")
def envs(root: Path) -> Path:
    """One environment made from the system interpreter, with a .pth file that says who ran it."""
    folder = root / "envs"
    subprocess.run([PYTHON, "-m", "venv", "--without-pip", str(folder / ENV_ID)], check=True)
    site_packages = next((folder / ENV_ID / "lib").glob("python3*/site-packages"))
    (site_packages / "whoami.pth").write_text(PTH_LINE)
    (site_packages / "envmod.py").write_text("VALUE = 7\n")
    return folder


@pytest.fixture(scope="module")
def pair(root: Path, programs: Path, envs: Path) -> Iterator[tuple[Worker, Worker]]:
    workers = root / "workers"
    workers.mkdir()
    owner = "--owner", f"{os.getuid()}:{os.getgid()}"
    fresh = start_worker(workers, "fresh", programs, "--no-warm", "--job-uids", f"{BASE}:8", *owner,
                         "--envs", str(envs), python=PYTHON)
    try:
        warm = start_worker(workers, "warm", programs, "--job-uids", f"{BASE + 8}:8", *owner,
                            "--envs", str(envs), "--preload", "json,dropq_worker", python=PYTHON)
    except BaseException:
        stop_worker(fresh)
        raise
    yield fresh, warm
    stop_worker(warm)
    stop_worker(fresh)


@pytest.mark.parametrize("program", [*PROGRAMS, "pkg/main.py"])
def test_forked_and_fresh_runs_look_the_same_under_job_uids(pair: tuple[Worker, Worker], program: str) -> None:
    fresh, warm = pair
    name = key(program)
    one = fresh.run(program, name, **EXTRA.get(program, {}))
    two = warm.run(program, name, **EXTRA.get(program, {}))
    assert not one.report.warm and two.report.warm, ("the warm worker forked it, the fresh one did not",
                                                     one.report.error, two.report.error)
    assert one.seen() == two.seen()


def _lines(text: str) -> dict[str, str]:
    return {line.split(":")[0]: line for line in text.splitlines()}


def test_a_forked_job_cannot_reach_its_fork_server(pair: tuple[Worker, Worker]) -> None:
    fresh, warm = pair
    run = warm.run("attack.py", key("attack"))
    assert run.report.warm, run.report.error
    out = run.stdout
    uid_line = out.splitlines()[0].split()
    assert uid_line[2] == "0" and BASE + 8 <= int(uid_line[5]) < BASE + 16, out  # the server is root's, the job not
    assert "resuid 1 resgid 1 gid is uid True" in out, out
    assert "groups []" in out, out
    lines = _lines(out)
    assert lines["signal"] == "signal: refused", out
    assert lines["ptrace"] == "ptrace: EPERM", out
    for name in ("environ", "mem", "maps"):
        assert lines[name] == f"{name}: refused", out
    assert "('CapAmb', '0000000000000000'), ('CapBnd', '0000000000000000'), ('CapEff', '0000000000000000'), " \
           "('CapInh', '0000000000000000'), ('CapPrm', '0000000000000000')" in out, out
    assert "own environ readable True" in out, out
    # and all of it is what a fresh start under a job uid gives, but the parent (the worker, not a server)
    same = fresh.run("attack.py", key("attack"))
    assert not same.report.warm
    keep = ("resuid", "groups", "[('Cap", "own environ", "fds")
    assert [line for line in out.splitlines() if line.startswith(keep)] == \
        [line for line in same.stdout.splitlines() if line.startswith(keep)]


def test_an_environments_pth_file_runs_as_the_job_uid(pair: tuple[Worker, Worker]) -> None:
    fresh, warm = pair
    name = key("pth")
    one = fresh.run("pth.py", name, environment=ENV_ID)
    two = warm.run("pth.py", name, environment=ENV_ID)
    assert not one.report.warm and two.report.warm, (one.report.error, two.report.error, two.stderr)
    job_uid = int(two.stdout.split("uid ")[-1].split()[0])
    assert job_uid != 0 and f"pth ran as {job_uid} {job_uid} groups []" in two.stdout, two.stdout
    assert "prefix is the environment True executable True" in two.stdout and "in path True" in two.stdout
    # the same as fresh, but for the uid, which is the next of each worker's own range
    fresh_uid = int(one.stdout.split("uid ")[-1].split()[0])
    assert one.stdout.replace(str(fresh_uid), "UID") == two.stdout.replace(str(job_uid), "UID")


def test_a_spawned_child_interpreter_finds_the_environment(pair: tuple[Worker, Worker]) -> None:
    fresh, warm = pair
    name = key("spawn")
    one = fresh.run("spawn.py", name, environment=ENV_ID)
    two = warm.run("spawn.py", name, environment=ENV_ID)
    assert two.report.warm and not one.report.warm, two.report.error
    assert one.seen() == two.seen() and two.stdout == "[(7, 0, 0)]\n", (one.stdout, two.stdout, two.stderr)


def test_the_fork_server_holds_three_capabilities_and_the_standard_library_only(pair: tuple[Worker, Worker]) -> None:
    _, warm = pair
    run = warm.run("preloads.py", key("preloads"))
    assert run.report.warm, run.report.error
    # the worker's preloads from the standard library only (dropq_worker is not there), never a program's (csv)
    assert run.stdout == "json True csv False dropq_worker False\n", run.stdout
    servers = [pid for pid in _descendants(warm.proc.pid)
               if b"forkserver.py" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert servers, "no fork server"
    for pid in servers:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert argv[1:3] == [b"-I", b"-S"] and b"csv" not in argv, argv
        status = Path(f"/proc/{pid}/status").read_text()
        cap_eff = int(next(line for line in status.splitlines() if line.startswith("CapEff")).split()[1], 16)
        assert cap_eff == (1 << 6) | (1 << 7) | (1 << 8), hex(cap_eff)  # SETGID, SETUID, SETPCAP and nothing else
        cap_inh = int(next(line for line in status.splitlines() if line.startswith("CapInh")).split()[1], 16)
        assert cap_inh == 0
        assert os.stat(f"/proc/{pid}").st_uid == 0
        maps = Path(f"/proc/{pid}/maps").read_text()
        assert "site-packages" not in maps and "dist-packages" not in maps, "the server loaded a package"


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        for child in procs.children(todo.pop()):
            found.append(child)
            todo.append(child)
    return found


def _servers(worker: Worker) -> list[int]:
    """The worker's fork servers (started by its launcher, in the worker's session; its jobs have their own)."""
    found = []
    for pid in _descendants(worker.proc.pid):
        try:
            if b"forkserver.py" in Path(f"/proc/{pid}/cmdline").read_bytes() and \
                    os.getsid(pid) == os.getsid(worker.proc.pid):
                found.append(pid)
        except OSError:
            continue
    return found


def test_jobs_that_a_privileged_server_cannot_honour_start_fresh(pair: tuple[Worker, Worker], root: Path,
                                                                 envs: Path) -> None:
    _, warm = pair
    # variables -I would ignore, and another locale: only a fresh start honours them
    assert not warm.run("hello.py", key("pythonpath"), env={"PYTHONPATH": "/nowhere"}).report.warm
    assert not warm.run("hello.py", key("locale"), env={"LANG": "C"}).report.warm
    assert warm.run("hello.py", key("bytecode"), env={"PYTHONDONTWRITEBYTECODE": ""}).report.warm
    # an environment whose interpreter is its own copy (made by its build): never run by the server
    copied = "00000000000000c0"
    subprocess.run([PYTHON, "-m", "venv", "--copies", "--without-pip", str(envs / copied)], check=True)
    try:
        run = warm.run("hello.py", key("copied"), environment=copied)
        assert (run.report.warm, run.stdout) == (False, "hello\n"), run.report.error
    finally:
        shutil.rmtree(envs / copied)


@pytest.mark.parametrize("how", ["timeout", "cancel"])
def test_a_forked_job_under_a_uid_is_stopped_whole(pair: tuple[Worker, Worker], programs: Path, how: str) -> None:
    _, warm = pair
    (programs / "sleeper.py").write_text(textwrap.dedent("""\
        import os, subprocess, sys, time
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
        open("started", "w").close()
        time.sleep(600)
        """))
    name = key(how)
    warm.transport.start(JobSpec(key=name, job_id=name, program="sleeper.py", timeout=3 if how == "timeout" else 60,
                                 kill_grace=1.0))
    wait_until(lambda: (warm.jobs / name / "started").exists(), timeout=30, what="the job to start")
    uid = os.stat(warm.jobs / name / "started").st_uid
    assert uid >= BASE + 8
    if how == "cancel":
        warm.transport.cancel(name)
    report = wait_until(lambda: (r := warm.transport.status(name, wait=5)).done and r, timeout=60,
                        what="the job to end")
    assert report.warm and report.outcome == ("timed_out" if how == "timeout" else "cancelled")
    assert not isolation.processes_of(uid), "every process of the job's uid is gone, its setsid child too"
    assert _servers(warm), "the fork server outlives its jobs"


@pytest.fixture
def lone(root: Path, programs: Path, envs: Path) -> Iterator[Worker]:
    """A warm worker of its own under job uids, for a test that kills its fork servers."""
    folder = Path(tempfile.mkdtemp(prefix="lone-", dir=root))
    folder.chmod(0o755)
    worker = start_worker(folder, "lone", programs, "--job-uids", f"{BASE + 16}:8", "--owner",
                          f"{os.getuid()}:{os.getgid()}", python=PYTHON)
    yield worker
    stop_worker(worker)


def test_a_job_whose_privileged_server_dies_while_it_runs_still_reports_its_exit(lone: Worker,
                                                                                programs: Path) -> None:
    (programs / "outlive.py").write_text(textwrap.dedent("""\
        import os, sys, time
        open("started", "w").close()
        while not os.path.exists("go-on"):
            time.sleep(0.01)
        print("outlived my fork server")
        sys.exit(9)
        """))
    name = key("outlive")
    lone.transport.start(JobSpec(key=name, job_id=name, program="outlive.py", timeout=60))
    wait_until(lambda: (lone.jobs / name / "started").exists(), timeout=30, what="the job to start")
    servers = _servers(lone)
    assert servers
    for pid in servers:
        os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not set(servers) & set(_servers(lone)), timeout=30, what="the server to go")
    (lone.jobs / name / "go-on").touch()  # as root: the job's folder is its uid's, 0700
    report = wait_until(lambda: (r := lone.transport.status(name, wait=5)).done and r, timeout=30,
                        what="the job to end")
    assert (report.outcome, report.exit_code, report.warm) == ("exited", 9, True)
    assert (lone.jobs / f"{name}.stdout").read_text() == "outlived my fork server\n"
    # the launcher starts a new one
    run = wait_until(lambda: (r := lone.run("hello.py", key("after"))).report.warm and r, timeout=60,
                     what="a new fork server to take over")
    assert run.stdout == "hello\n"


def test_the_launcher_and_its_servers_leave_with_their_worker(root: Path, programs: Path) -> None:
    folder = Path(tempfile.mkdtemp(prefix="doomed-", dir=root))
    folder.chmod(0o755)
    worker = start_worker(folder, "doomed", programs, "--job-uids", f"{BASE + 24}:8", "--owner",
                          f"{os.getuid()}:{os.getgid()}", python=PYTHON)
    try:
        assert worker.run("hello.py", key("doomed")).report.warm
        left = _descendants(worker.proc.pid)  # the launcher and the server
        assert len(left) >= 2
        worker.proc.kill()
        worker.proc.wait(10)
        wait_until(lambda: all(procs.start_time(pid) is None or _zombie(pid) for pid in left), timeout=30,
                   what="the launcher and the fork server to exit")
    finally:
        stop_worker(worker)
