"""A job forked from a warm interpreter is what a fresh `python PROGRAM ARGS` would be, as far as the
program can tell (issue 15): each program below runs on two real worker processes, one started with
`--no-warm` (fresh interpreters) and one forking from its fork server, and both give the same outcome,
exit code, signal, stdout and stderr (each worker's staging folder masked, the one path that differs).
The report says which way each ran, so a warm run that quietly fell back to fresh fails the test.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from dropq.errors import TransportError
from dropq.pools.transport import Transport
from dropq_worker import procs
from dropq_worker.protocol import JobSpec, Report
from dropq_worker.warm import ProgramOptions, read_options
from helpers import wait_until

#: name -> source; each is a small program exercising one thing a program could notice
PROGRAMS: dict[str, str] = {
    "hello.py": "print('hello')\n",
    "no_newline.py": "import sys\nsys.stdout.write('no newline at the end')\nsys.stderr.write('nor here')\n",
    "large_output.py": ("import sys\nfor i in range(40000):\n    print(f'line {i} ' + 'x' * 60)\n"
                        "sys.stderr.write('e' * 1_500_000)\n"),
    "unicode.py": "print('h\\u00e9llo \\u2713 \\U0001f600')\nimport sys\nprint(sys.getfilesystemencoding())\n",
    "exit_code.py": "import sys\nprint('before')\nsys.exit(3)\n",
    "exit_string.py": "import sys\nprint('before', flush=True)\nsys.exit('it went wrong')\n",
    "exit_none.py": "import sys\nsys.exit()\n",
    "exit_object.py": "import sys\nsys.exit([1, 'two'])\n",
    "exit_os.py": "import os\nprint('lost in the buffer')\nos._exit(5)\n",
    "raise.py": textwrap.dedent("""\
        def inner():
            raise ValueError("boom")
        def outer():
            try:
                inner()
            except ValueError as exc:
                raise RuntimeError("wrapped") from exc
        print("about to fail")
        outer()
        """),
    "syntax_error.py": "print('never')\nx = (\n",
    "keyboard_interrupt.py": "import atexit\natexit.register(print, 'atexit ran')\nraise KeyboardInterrupt\n",
    "excepthook.py": textwrap.dedent("""\
        import sys
        def hook(kind, value, tb):
            print("hooked:", kind.__name__, value, tb.tb_frame.f_code.co_name, tb.tb_next is None, file=sys.stderr)
        sys.excepthook = hook
        raise LookupError("custom")
        """),
    "process_group.py": textwrap.dedent("""\
        import os
        print("own group:", os.getpgid(0) == os.getpid(), "own session:", os.getsid(0) == os.getpid())
        # not os.getppid(): the parent is the fork server, not the worker (README: what a program can observe)
        """),
    "cwd.py": "import os\nprint(os.getcwd())\nprint(os.listdir('.'))\nopen('made.txt', 'w').write('x')\n",
    "environment.py": "import os\nfor k, v in sorted(os.environ.items()):\n    print(k, '=', v)\n",
    "rlimits.py": textwrap.dedent("""\
        import resource
        for name in sorted(n for n in dir(resource) if n.startswith("RLIMIT_")):
            print(name, resource.getrlimit(getattr(resource, name)))
        """),
    "stdin.py": textwrap.dedent("""\
        import os, stat, sys
        print(repr(sys.stdin.read()), sys.stdin.isatty())
        st = os.fstat(0)
        print(stat.S_ISCHR(st.st_mode), os.path.realpath('/proc/self/fd/0'))
        import fcntl
        print(fcntl.fcntl(0, fcntl.F_GETFL) & os.O_ACCMODE, os.get_inheritable(0))
        """),
    "fds.py": textwrap.dedent("""\
        import os
        print(sorted(int(fd) for fd in os.listdir('/proc/self/fd')))
        for fd in (0, 1, 2):
            print(fd, os.get_inheritable(fd), os.get_blocking(fd))
        print(open(os.devnull).fileno())
        """),
    "signal_handlers.py": textwrap.dedent("""\
        import signal
        for n in range(1, signal.NSIG):
            try:
                print(n, signal.getsignal(n))
            except ValueError:
                pass
        print(sorted(signal.pthread_sigmask(signal.SIG_BLOCK, [])))
        """),
    "signal_own_handler.py": textwrap.dedent("""\
        import os, signal
        got = []
        signal.signal(signal.SIGTERM, lambda n, f: got.append(n))
        os.kill(os.getpid(), signal.SIGTERM)
        print("handled", got)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        print("not reached")
        """),
    "sigint.py": "import os, signal\ntry:\n    os.kill(os.getpid(), signal.SIGINT)\nexcept KeyboardInterrupt:\n"
                 "    print('KeyboardInterrupt raised, as python does')\n",
    "sigpipe.py": textwrap.dedent("""\
        import os
        r, w = os.pipe()
        os.close(r)
        try:
            os.write(w, b"x")
        except BrokenPipeError:
            print("SIGPIPE ignored, EPIPE raised")
        """),
    "script_identity.py": textwrap.dedent("""\
        import sys
        print(__name__, __file__, __doc__, __package__, __spec__, __cached__, type(__loader__).__name__,
              __loader__.name, __loader__.path)
        print(sys.argv)
        print(sys.orig_argv)
        print(sys.executable)
        print(sys.path[0])
        print(sys.flags)
        print(sorted(k for k in globals()))
        import __main__
        print(__main__.__dict__ is globals(), sys.modules["__main__"] is __main__)
        """),
    "sys_path.py": "import sys\nprint(*sys.path, sep='\\n')\nprint(sys.prefix, sys.base_prefix)\n",
    "atexit.py": textwrap.dedent("""\
        import atexit, sys
        atexit.register(print, "second")
        atexit.register(lambda: print("first", sys.modules["__main__"].MARK))
        MARK = "main module intact"
        print("body")
        """),
    "atexit_exit.py": "import atexit, sys\natexit.register(print, 'atexit after exit')\nsys.exit(4)\n",
    "finalizer.py": textwrap.dedent("""\
        import sys
        class Noisy:
            def __del__(self):
                sys.stdout.write("finalized at exit\\n")
        keep = Noisy()
        print("body")
        """),
    "threads.py": textwrap.dedent("""\
        import threading, time
        out = []
        def slow():
            time.sleep(0.3)
            print("non-daemon thread finished after the main body", flush=True)
        threading.Thread(target=slow).start()
        threading.Thread(target=lambda: time.sleep(60), daemon=True).start()
        print("main body done", threading.current_thread() is threading.main_thread(), flush=True)
        """),
    "thread_exception.py": textwrap.dedent("""\
        import threading
        def bad():
            raise KeyError("in a thread")
        t = threading.Thread(target=bad, name="worker-thread")
        t.start()
        t.join()
        print("main goes on")
        """),
    "subprocess_child.py": textwrap.dedent("""\
        import subprocess, sys
        r = subprocess.run([sys.executable, "-c", "import sys; print('child', sys.argv[1:])", "a"],
                           capture_output=True, text=True)
        print(r.returncode, r.stdout, end="")
        r = subprocess.run("echo shell $((1+2))", shell=True, capture_output=True, text=True)
        print(r.stdout, end="")
        """),
    "stdio_objects.py": textwrap.dedent("""\
        import sys
        for s in (sys.stdin, sys.stdout, sys.stderr):
            print(s.name, s.encoding, s.errors, s.line_buffering, s.write_through, s.isatty(), s.seekable(),
                  type(s.buffer).__name__, s is getattr(sys, "__" + s.name[1:-1] + "__"))
        """),
    "warnings_top.py": "import warnings\nwarnings.warn('careful')\nwarnings.warn('old', DeprecationWarning)\n",
    "pickle_main.py": textwrap.dedent("""\
        import pickle
        class Point:
            def __init__(self, x):
                self.x = x
        p = pickle.loads(pickle.dumps(Point(3)))
        print(type(p).__module__, type(p).__qualname__, p.x)
        """),
    "tz.py": "import time\nprint(time.tzname, time.timezone, time.strftime('%Z', time.localtime(0)))\n",
    "ids.py": "import os\nprint(os.getuid() == os.geteuid(), os.getgid() == os.getegid(), os.umask(0o22))\n",
    "user_site.py": ("import site, os\n"
                     "print(site.ENABLE_USER_SITE, site.getusersitepackages().startswith(os.environ['HOME']))\n"),
    "tempdir.py": "import tempfile, os\nprint(tempfile.gettempdir() == os.environ['TMPDIR'])\n",
    "coding_cookie.py": "# -*- coding: latin-1 -*-\nprint('caf\xe9')\n",
    "import_error.py": "import a_module_that_does_not_exist\n",
    "killed.py": "import os, signal\nprint('going', flush=True)\nos.kill(os.getpid(), signal.SIGKILL)\n",
    "unclosed_file.py": "f = open('data.txt', 'w')\nf.write('written, never closed')\nprint('leaving it open')\n",
    "helper_finalizer.py": ("import sys, os\nsys.path.insert(0, os.getcwd())\n"
                            "open('noisy_mod.py', 'w').write('class N:\\n def __del__(self): print(\\'module object "
                            "finalized\\')\\nn = N()\\n')\nimport noisy_mod\nprint('imported')\n"),
    "exit_big_code.py": "import sys\nsys.exit(300)\n",
    "memory_limit.py": "import resource\nprint(resource.getrlimit(resource.RLIMIT_DATA))\n",
}

#: a folder program importing its own modules
FOLDER = {
    "pkg/main.py": ("import helper\nfrom sub import deep\n"
                    "print(helper.NAME, deep.VALUE, helper.__file__.endswith('pkg/helper.py'))\n"),
    "pkg/helper.py": "NAME = 'helper'\n",
    "pkg/sub/__init__.py": "",
    "pkg/sub/deep.py": "VALUE = 42\n",
}

#: per program: spec fields beyond key, job_id and program
EXTRA: dict[str, dict[str, Any]] = {
    "script_identity.py": {"args": ["one", "two words", ""]},
    "environment.py": {"env": {"GREETING": "hi", "EMPTY": ""}},
    "tz.py": {"env": {"TZ": "Asia/Kolkata"}},
    "memory_limit.py": {"memory_rlimit": 2 * 1024 ** 3},
    "rlimits.py": {"memory_rlimit": 3 * 1024 ** 3},
}


@dataclass(frozen=True)
class Run:
    report: Report
    stdout: str
    stderr: str

    def seen(self) -> tuple[Any, ...]:
        return (self.report.outcome, self.report.exit_code, self.report.signal, self.report.error,
                self.stdout, self.stderr)


@dataclass
class Worker:
    proc: subprocess.Popen[bytes]
    transport: Transport
    jobs: Path

    def run(self, program: str, key: str, *, timeout: float = 60, **extra: Any) -> Run:
        spec = JobSpec(key=key, job_id=key, program=program, timeout=timeout, kill_grace=1.0, **extra)
        self.transport.start(spec)
        report = wait_until(lambda: (r := self.transport.status(key, wait=5)).done and r, timeout=90,
                            what=f"job {key} to end")
        out = (self.jobs / f"{key}.stdout").read_text(errors="replace")
        err = (self.jobs / f"{key}.stderr").read_text(errors="replace")
        return Run(report, mask(out, self.jobs), mask(err, self.jobs))

    def servers(self) -> list[int]:
        """The worker's fork servers: its children running forkserver.py in its own session (a job whose
        server died is the worker's child too, with the same command line, but in a session of its own)."""
        found = []
        for pid in procs.children(self.proc.pid):
            try:
                if b"forkserver.py" in Path(f"/proc/{pid}/cmdline").read_bytes() and \
                        os.getsid(pid) == os.getsid(self.proc.pid):
                    found.append(pid)
            except OSError:
                continue
        return found


def mask(text: str, jobs: Path) -> str:
    return text.replace(str(jobs), "<JOBS>")


def _answers(transport: Transport) -> bool:
    try:
        transport.health(timeout=1)
    except TransportError:
        return False
    return True


def start_worker(root: Path, name: str, programs: Path, *flags: str, python: str = sys.executable) -> Worker:
    sock = Path(tempfile.mkdtemp(prefix="dqw-")) / "w.sock"
    jobs = root / name / "jobs"
    (root / name / "inputs").mkdir(parents=True)
    proc = subprocess.Popen([sys.executable, "-m", "dropq_worker", "--socket", str(sock), "--programs",
                             str(programs), "--inputs", str(root / name / "inputs"), "--jobs", str(jobs),
                             "--python", python, "--name", name, *flags])
    transport = Transport(socket_path=str(sock), timeout=30)
    wait_until(lambda: sock.exists() and _answers(transport), timeout=30, what=f"worker {name} to answer")
    return Worker(proc, transport, jobs)


def stop_worker(worker: Worker) -> None:
    worker.transport.close()
    worker.proc.terminate()
    worker.proc.wait(20)
    sock = Path(worker.transport.socket_path)
    sock.unlink(missing_ok=True)
    sock.parent.rmdir()


@pytest.fixture(scope="module")
def programs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("warm-programs")
    for name, text in {**PROGRAMS, **FOLDER}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(text.encode("latin-1" if "coding: latin-1" in text else "utf-8"))
    return root


@pytest.fixture(scope="module")
def pair(programs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Worker, Worker]]:
    root = tmp_path_factory.mktemp("warm-workers")
    fresh = start_worker(root, "fresh", programs, "--no-warm")
    try:
        warm = start_worker(root, "warm", programs)
    except BaseException:
        stop_worker(fresh)
        raise
    yield fresh, warm
    stop_worker(warm)
    stop_worker(fresh)


_counter = iter(range(1_000_000))


def key(name: str) -> str:
    return f"{name.replace('/', '-').replace('.', '_')}-{os.getpid()}-{next(_counter)}"


@pytest.mark.parametrize("program", [*PROGRAMS, "pkg/main.py"])
def test_forked_and_fresh_runs_look_the_same(pair: tuple[Worker, Worker], program: str) -> None:
    fresh, warm = pair
    name = key(program)  # the same key on both: the job id is in the environment and the paths
    one = fresh.run(program, name, **EXTRA.get(program, {}))
    two = warm.run(program, name, **EXTRA.get(program, {}))
    assert not one.report.warm and two.report.warm, ("the warm worker forked it, the fresh one did not",
                                                     one.report.error, two.report.error)
    assert one.seen() == two.seen()


def test_an_unclosed_file_is_flushed_at_exit_either_way(pair: tuple[Worker, Worker]) -> None:
    fresh, warm = pair
    name = key("unclosed")
    for worker in (fresh, warm):
        worker.run("unclosed_file.py", name)
        assert (worker.jobs / name / "data.txt").read_text() == "written, never closed"


def test_the_equivalence_list_is_long_enough() -> None:
    assert len(PROGRAMS) + 1 >= 30


def test_random_state_is_new_in_each_forked_job(pair: tuple[Worker, Worker], programs: Path) -> None:
    (programs / "rand.py").write_text("import random, os\nprint(random.random(), os.urandom(8).hex())\n")
    _, warm = pair
    first, second = (warm.run("rand.py", key("rand")) for _ in range(2))
    assert first.report.warm and second.report.warm
    assert first.stdout != second.stdout


def tree_program(programs: Path) -> str:
    """A program that starts a child and a grandchild (same process group), writes their pids, and waits."""
    (programs / "tree.py").write_text(textwrap.dedent("""\
        import os, subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c",
            "import subprocess, sys, time; g = subprocess.Popen(['sleep', '300']); print(g.pid, flush=True); "
            "time.sleep(300)"],
            stdout=subprocess.PIPE, text=True)
        grandchild = child.stdout.readline().strip()
        open("pids", "w").write(f"{os.getpid()} {child.pid} {grandchild}")
        time.sleep(300)
        """))
    return "tree.py"


def _pids(worker: Worker, name: str) -> list[int]:
    path = worker.jobs / name / "pids"
    return [int(p) for p in path.read_text().split()] if path.exists() and path.read_text().count(" ") == 2 else []


@pytest.mark.parametrize("which", ["fresh", "warm"])
def test_a_timeout_kills_the_whole_tree(pair: tuple[Worker, Worker], programs: Path, which: str) -> None:
    worker = pair[0] if which == "fresh" else pair[1]
    run = worker.run(tree_program(programs), name := key("timeout"), timeout=3)
    assert run.report.outcome == "timed_out" and run.report.warm == (which == "warm")
    pids = _pids(worker, name)
    assert len(pids) == 3
    assert all(procs.start_time(pid) is None for pid in pids), "the program, its child and grandchild are gone"


@pytest.mark.parametrize("which", ["fresh", "warm"])
def test_a_cancel_kills_the_whole_tree(pair: tuple[Worker, Worker], programs: Path, which: str) -> None:
    worker = pair[0] if which == "fresh" else pair[1]
    name = key("cancel")
    worker.transport.start(JobSpec(key=name, job_id=name, program=tree_program(programs), kill_grace=1.0))
    pids = wait_until(lambda: _pids(worker, name), timeout=30, what="the tree to start")
    worker.transport.cancel(name)
    report = wait_until(lambda: (r := worker.transport.status(name, wait=5)).done and r, timeout=30,
                        what="the cancel")
    assert report.outcome == "cancelled" and report.warm == (which == "warm")
    assert all(procs.start_time(pid) is None for pid in pids)


def test_opt_outs_start_fresh(pair: tuple[Worker, Worker], programs: Path) -> None:
    _, warm = pair
    (programs / "optout.py").write_text(textwrap.dedent("""\
        # /// script
        # [tool.dropq]
        # fresh-interpreter = true
        # ///
        print("fresh by its own choice")
        """))
    (programs / "shell.sh").write_text("#!/bin/sh\necho not python\n")
    (programs / "shell.sh").chmod(0o755)
    assert not warm.run("optout.py", key("optout")).report.warm
    assert not warm.run("hello.py", key("manifest-optout"), fresh_interpreter=True).report.warm
    assert not warm.run("shell.sh", key("shell")).report.warm
    assert not warm.run("hello.py", key("home"), env={"HOME": "/tmp"}).report.warm
    assert warm.run("hello.py", key("default")).report.warm


def test_a_program_preload_is_imported_before_the_fork(pair: tuple[Worker, Worker], programs: Path) -> None:
    _, warm = pair
    (programs / "preloaded.py").write_text(textwrap.dedent("""\
        # /// script
        # [tool.dropq]
        # preload = ["decimal", "email.parser"]
        # ///
        import sys
        print("decimal" in sys.modules, "email.parser" in sys.modules, "xml.dom" in sys.modules)
        """))
    run = warm.run("preloaded.py", key("preload"))
    assert run.report.warm and run.stdout == "True True False\n"


@pytest.fixture
def lone(programs: Path, tmp_path: Path) -> Iterator[Worker]:
    """A warm worker of its own, for a test that kills its fork servers."""
    worker = start_worker(tmp_path, "lone", programs)
    yield worker
    stop_worker(worker)


def test_the_fork_server_dying_mid_stream_loses_no_job_and_runs_none_twice(
        lone: Worker, programs: Path, tmp_path: Path) -> None:
    """Jobs run one after the other while the fork server is killed again and again, at any point of a
    job's start or run: each job runs exactly once (its line in the ledger) and reports its own exit code."""
    warm = lone
    ledger = tmp_path / "ledger"
    ledger.touch()
    (programs / "ledger.py").write_text(textwrap.dedent("""\
        import os, sys, time
        with open(sys.argv[1], "a") as fh:
            fh.write(sys.argv[2] + "\\n")
        time.sleep(float(sys.argv[3]))
        sys.exit(int(sys.argv[4]))
        """))
    stop = threading.Event()
    kills = []

    def killer() -> None:
        while not stop.is_set():
            for pid in warm.servers():
                try:
                    os.kill(pid, signal.SIGKILL)
                    kills.append(pid)
                except ProcessLookupError:
                    continue
            stop.wait(0.07)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    names = []
    try:
        for i in range(40):
            name = key("ledger")
            names.append(name)
            run = warm.run("ledger.py", name, args=[str(ledger), name, str(0.05 * (i % 3)), str(i % 7)])
            assert (run.report.outcome, run.report.exit_code) == ("exited", i % 7), (run.report.signal, run)
    finally:
        stop.set()
        thread.join()
    assert ledger.read_text().splitlines() == names, "every job ran once, in order"
    assert kills, "the fork server was killed at least once"
    # a new server takes over (at once, or after a back-off if its starts kept being killed)
    run = wait_until(lambda: (r := warm.run("hello.py", key("after"))).report.warm and r, timeout=60,
                     what="a new fork server to take over")
    assert run.stdout == "hello\n"


def test_a_job_whose_server_dies_while_it_runs_still_reports_its_exit(lone: Worker, programs: Path) -> None:
    warm = lone
    (programs / "outlive.py").write_text(textwrap.dedent("""\
        import os, sys, time
        open("started", "w").close()
        while not os.path.exists("go-on"):
            time.sleep(0.01)
        print("outlived my fork server")
        sys.exit(9)
        """))
    name = key("outlive")
    warm.transport.start(JobSpec(key=name, job_id=name, program="outlive.py", timeout=60))
    wait_until(lambda: (warm.jobs / name / "started").exists(), timeout=30, what="the job to start")
    servers = warm.servers()
    assert servers
    for pid in servers:
        os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not set(servers) & set(warm.servers()), timeout=10, what="the server to go")
    (warm.jobs / name / "go-on").touch()
    report = wait_until(lambda: (r := warm.transport.status(name, wait=5)).done and r, timeout=30,
                        what="the job to end")
    assert (report.outcome, report.exit_code, report.warm) == ("exited", 9, True)
    assert (warm.jobs / f"{name}.stdout").read_text() == "outlived my fork server\n"


def test_an_idle_fork_server_uses_no_cpu(pair: tuple[Worker, Worker]) -> None:
    _, warm = pair
    warm.run("hello.py", key("idle"))
    servers = warm.servers()
    assert servers

    def cpu() -> int:
        return sum(sum(int(f) for f in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[11:13])
                   for pid in servers)

    before = cpu()
    time.sleep(1.0)  # measuring idle use over a span: the span itself is what is measured, not awaited
    assert cpu() - before <= 1, "an idle fork server sleeps in recvmsg"


def test_fork_servers_leave_with_their_worker(programs: Path, tmp_path: Path) -> None:
    """A worker killed outright (no clean-up of its own) leaves no fork server behind: each sees its
    socket close and exits."""
    worker = start_worker(tmp_path, "doomed", programs)
    try:
        assert worker.run("hello.py", key("doomed")).report.warm
        servers = worker.servers()
        assert servers
        worker.proc.kill()
        worker.proc.wait(10)
        wait_until(lambda: all(procs.start_time(pid) is None or _zombie(pid) for pid in servers), timeout=20,
                   what="the fork servers to exit")
    finally:
        stop_worker(worker)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


@pytest.mark.parametrize(("text", "expected"), [
    ("print(1)\n", ProgramOptions()),
    ("# /// script\n# dependencies = []\n# ///\n", ProgramOptions()),
    ("# /// script\n# [tool.dropq]\n# preload = ['numpy', 'xml.etree']\n# ///\n",
     ProgramOptions(preload=("numpy", "xml.etree"))),
    ("# /// script\n# [tool.dropq]\n# fresh-interpreter = true\n# ///\n", ProgramOptions(fresh=True)),
    # malformed: ignored (the worker logs it), the program runs with the defaults
    ("# /// script\n# [tool.dropq]\n# preload = ['os; rm -rf']\n# ///\n", ProgramOptions()),
    ("# /// script\n# [tool.dropq]\n# fresh-interpreter = 'yes'\n# ///\n", ProgramOptions()),
    ("# /// script\n# [tool.dropq\n# ///\n", ProgramOptions()),
])
def test_program_options_are_read_from_the_pep_723_block(tmp_path: Path, text: str,
                                                         expected: ProgramOptions) -> None:
    (tmp_path / "p.py").write_text(text)
    assert read_options(tmp_path / "p.py") == expected


def test_a_folder_program_says_it_in_its_pyproject(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text("[tool.dropq]\npreload = ['decimal']\n")
    assert read_options(tmp_path / "pyproject.toml") == ProgramOptions(preload=("decimal",))


def test_numpy_preloaded_is_reseeded_in_each_forked_job(programs: Path, tmp_path: Path) -> None:
    """numpy's global generator is copied into every child of a server that preloaded it (numpy 2 loads
    numpy.random lazily: preloading `numpy.random` is what makes one); each forked job reseeds it, so two
    jobs draw different numbers, as two fresh runs do."""
    from dropq.envs.install import uv_binary

    venv = tmp_path / "np"
    uv = str(uv_binary())
    made = subprocess.run([uv, "venv", "-q", "--python", sys.executable, str(venv)], capture_output=True, text=True)
    if made.returncode == 0:
        made = subprocess.run([uv, "pip", "install", "-q", "--python", str(venv / "bin" / "python"), "numpy"],
                              capture_output=True, text=True, timeout=300)
    if made.returncode != 0:
        pytest.skip(f"numpy could not be installed into a virtualenv: {made.stderr.strip()[-300:]}")
    (programs / "nprand.py").write_text("# /// script\n# [tool.dropq]\n# preload = ['numpy.random']\n# ///\n"
                                        "import numpy\nprint(numpy.random.random())\n")
    worker = start_worker(tmp_path, "numpy", programs, python=str(venv / "bin" / "python"))
    try:
        runs = [worker.run("nprand.py", key("nprand")) for _ in range(2)]
    finally:
        stop_worker(worker)
    assert all(r.report.warm and r.report.exit_code == 0 for r in runs), runs
    assert runs[0].stdout != runs[1].stdout
