"""dropq benchmarks, side by side with the baseline a user would pick instead.

    python -m bench            the full suite (under 10 minutes on 2 cores)
    python -m bench --smoke    a few jobs per figure, to check that it runs (the test suite does this)
    python -m bench --only 1,2 some figures only
    DROPQ_BENCH_IMAGE=dropq-worker:TAG python -m bench --only 8   the docker figures on another image tag

Each figure runs both arms in this process tree, interleaved, several times, and prints medians and
ratios. The baselines: GNU parallel -j2 running the same programs with the same interpreter (on the
host for the local pool; for the docker pool, inside a worker-image container on the same bind mount,
with xargs -P2 there as a leaner second baseline), and one `docker run --rm` per job.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import math
import os
import select
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
PYTHON = subprocess.run(["python3", "-c", "import sys; print(sys.executable)"], capture_output=True,
                        text=True, check=True).stdout.strip()
#: the worker image of the docker figures; another tag (DROPQ_BENCH_IMAGE=dropq-worker:mybranch) lets a branch
#: measure its own worker without touching the shared image
IMAGE = os.environ.get("DROPQ_BENCH_IMAGE", "dropq-worker:latest")


@dataclass
class Figure:
    name: str
    rows: list[tuple[str, str, str, str]] = field(default_factory=list)  # what, dropq, baseline, ratio


# --- a workspace with a running daemon ---------------------------------------------------------------

class Bench:
    def __init__(self, *, pool: str = "local", count: int = 2, agents: bool = False,
                 workers: dict[str, object] | None = None) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="dqbench-"))
        self.inbox, self.outbox, self.programs = self.root / "inbox", self.root / "outbox", self.root / "programs"
        for folder in (self.inbox, self.outbox, self.programs):
            folder.mkdir()
        (self.programs / "pass.py").write_text("")
        (self.programs / "sleep.py").write_text("import sys, time\ntime.sleep(float(sys.argv[1]))\n")
        config = {"workers": {"pool": pool, "count": count, "docker": {"image": IMAGE, "on_shutdown": "remove"},
                              **(workers or {})},
                  "intake": {"rescan": 30}, "log_level": "info", "http": {"port": 0}, "disk": {"min_free": "1m"}}
        if agents:  # this host runs none: every job goes through an agent (`dropq agent`, on loopback here)
            (self.root / "agents.token").write_text("bench-agents-token-0123456789")
            config["workers"] = {"pool": "local", "count": 0}
            config["agents"] = {"listen": "127.0.0.1:0", "token_file": str(self.root / "agents.token")}
        (self.root / "config.yaml").write_text(yaml.safe_dump(config))
        self.agents: list[tuple[subprocess.Popen[bytes], IO[bytes]]] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self.seq = 0
        self.watch: _Renames | None = None

    def start(self) -> float:
        self.log = open(self.root / "daemon.log", "ab")  # closed in stop()
        started = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "-m", "dropq", "-c", str(self.root / "config.yaml"), "run"],
                                     stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT)
        while b"dropq is running" not in (self.root / "daemon.log").read_bytes():
            if self.proc.poll() is not None or time.perf_counter() - started > 120:
                raise RuntimeError((self.root / "daemon.log").read_text()[-3000:])
            time.sleep(0.01)
        return started

    def start_agent(self, name: str, workers: int = 1) -> None:
        """Start `dropq agent` with `workers` local workers; returns once it has registered."""
        import sqlite3

        db = sqlite3.connect(f"file:{self.root / 'state' / 'dropq.sqlite3'}?mode=ro", uri=True)
        try:
            url = db.execute("SELECT value FROM meta WHERE key = 'agents'").fetchone()[0]
        finally:
            db.close()
        log_path = self.root / f"{name}.log"
        log = open(log_path, "ab")  # closed in stop()
        proc = subprocess.Popen([sys.executable, "-m", "dropq", "agent", "--server", url, "--token-file",
                                 str(self.root / "agents.token"), "--workers", str(workers), "--name", name,
                                 "--work-dir", str(self.root / name)], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        self.agents.append((proc, log))
        started = time.perf_counter()
        while b"registered" not in log_path.read_bytes():
            if proc.poll() is not None or time.perf_counter() - started > 120:
                raise RuntimeError(log_path.read_text()[-3000:])
            time.sleep(0.01)

    def stop(self) -> None:
        for proc, log in self.agents:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(60)
            log.close()
        self.agents = []
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(60)
        self.log.close()

    def close(self) -> None:
        if self.watch is not None:
            self.watch.close()
        self.stop()
        subprocess.run(["docker", "rm", "-f", *self._containers()], capture_output=True)
        # removed at the end of the suite, not now: on ext4 without a journal (this machine's disk) every
        # file created in the next minutes would first skip past the thousands of inodes just freed
        # (ext4's recently_deleted check), charging one figure for the clean-up of the one before
        _LEFT.append(self.root)

    def _containers(self) -> list[str]:
        out = subprocess.run(["docker", "ps", "-aq", "--filter", f"label=io.dropq.state={self.root / 'state'}"],
                             capture_output=True, text=True)
        return out.stdout.split()

    def drop(self, program: str, args: list[str] | None = None, *, fresh: bool = False) -> str:
        self.seq += 1
        name = f"b{self.seq}"
        tmp = self.inbox / f".{name}.tmp"
        tmp.write_text(_manifest(program, tuple(args or ()), fresh))
        os.rename(tmp, self.inbox / f"{name}.yaml")
        return name

    def committed(self) -> int:
        return sum(1 for n in os.listdir(self.outbox) if not n.startswith("."))

    def wait_committed(self, n: int, timeout: float = 600) -> None:
        """Block until n job folders are in the outbox. Woken by inotify as each commit's rename lands,
        so the waiting costs the machine nothing (a polling loop took ~1-3 ms of CPU per job from the
        2 cores the jobs share, and was late by up to its interval)."""
        if self.watch is None:
            self.watch = _Renames(self.outbox)
        deadline = time.perf_counter() + timeout
        while (have := self.committed()) < n:
            if time.perf_counter() > deadline:
                raise RuntimeError(f"only {have} of {n} committed")
            self.watch.wait_for(n - have, deadline)

    def cpu_seconds(self) -> float:
        """CPU seconds used so far by the daemon and its worker processes."""
        assert self.proc is not None
        pids = [self.proc.pid, *_pids_mentioning(str(self.root / "state" / "workers"))]
        return sum(_cpu(pid) for pid in pids)

    def peak_rss_mb(self) -> float:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")


#: workspaces of finished figures, removed when the suite ends
_LEFT: list[Path] = []


class _Renames:
    """Entries renamed into a folder, counted from inotify (IN_MOVED_TO): how a commit lands."""

    _IN_MOVED_TO = 0x80
    _IN_CLOEXEC = 0o2000000

    def __init__(self, folder: Path) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self._libc.inotify_init1(self._IN_CLOEXEC)
        if self.fd < 0 or self._libc.inotify_add_watch(self.fd, os.fsencode(folder), self._IN_MOVED_TO) < 0:
            raise OSError(ctypes.get_errno(), "inotify")

    def wait_for(self, count: int, deadline: float) -> None:
        """Wait until `count` names not starting with '.' were renamed in, or the deadline (the caller
        re-counts the folder, so an event read here for a later wait is never needed)."""
        seen = 0
        while seen < count:
            left = deadline - time.perf_counter()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                return
            data = os.read(self.fd, 65536)
            offset = 0
            while offset < len(data):
                _wd, _mask, _cookie, length = struct.unpack_from("iIII", data, offset)
                name = data[offset + 16:offset + 16 + length].rstrip(b"\0")
                offset += 16 + length
                if name and not name.startswith(b"."):
                    seen += 1

    def close(self) -> None:
        os.close(self.fd)


@functools.cache
def _manifest(program: str, args: tuple[str, ...], fresh: bool = False) -> str:
    return yaml.safe_dump({"program": program, "args": list(args), **({"fresh_interpreter": True} if fresh else {})})


@contextmanager
def bench(**kw: object) -> Iterator[Bench]:
    b = Bench(**kw)  # type: ignore[arg-type]
    try:
        yield b
    finally:
        b.close()


def _cpu(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _pids_mentioning(text: str) -> list[int]:
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if text in Path(entry.path, "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def timed(fn: Callable[..., object], *args: object) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def run_batch(b: Bench, program: str, args: list[str], n: int, fresh: bool = False) -> None:
    """Drop n manifests and wait until all are committed."""
    base = b.committed()
    for _ in range(n):
        b.drop(program, args, fresh=fresh)
    b.wait_committed(base + n)


def run(argv: list[str]) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def parallel(argv: list[str], n: int, jobs: int = 2) -> None:
    """GNU parallel -jN running argv once per job (argv gets the job number as its last argument)."""
    seq = "\n".join(str(i) for i in range(n)) + "\n"
    subprocess.run(["parallel", f"-j{jobs}", *argv], input=seq, text=True, check=True, capture_output=True)


def fmt(seconds: float) -> str:
    return f"{seconds:.3f} s" if seconds >= 0.1 else f"{seconds * 1000:.2f} ms"


# --- the figures ---------------------------------------------------------------------------------------

def fig_throughput(reps: int, scale: float) -> Figure:
    fig = Figure("1. Throughput, local pool, 2 warm workers (drop -> committed outbox folder)")
    for label, program, args, n in (("trivial jobs", "pass.py", [], int(1000 * scale)),
                                    ("100 ms jobs", "sleep.py", ["0.1"], int(100 * scale))):
        d_times, p_times, cpu = [], [], []
        with bench() as b:
            b.start()
            b.drop(program, args)
            b.wait_committed(1)  # warm
            for _ in range(reps):
                daemon_cpu = _cpu(b.proc.pid) if b.proc else 0.0
                d_times.append(timed(run_batch, b, program, args, n))
                cpu.append((_cpu(b.proc.pid) if b.proc else 0.0) - daemon_cpu)
                p_times.append(timed(parallel, [PYTHON, str(b.programs / program), *args], n))
        d, p = statistics.median(d_times), statistics.median(p_times)
        fig.rows.append((f"{n} {label}", fmt(d), fmt(p), f"{p / d:.2f}"))
        fig.rows.append((f"  daemon CPU for those {n}", f"{statistics.median(cpu):.2f} s", "", ""))
    return fig


def fig_latency(reps: int, scale: float) -> Figure:
    fig = Figure("2. Added latency on an idle system (drop by rename -> commit, minus the program's own run time)")
    n = int(200 * scale)
    direct = statistics.median(timed(run, [PYTHON, os.devnull]) for _ in range(20))
    with bench() as b:
        b.start()
        b.drop("pass.py")
        b.wait_committed(1)
        added = []
        for _ in range(n):
            added.append(timed(run_batch, b, "pass.py", [], 1) - direct)
    added.sort()
    p50, p99 = added[len(added) // 2], added[min(len(added) - 1, int(len(added) * 0.99))]
    fig.rows.append((f"p50 over {n} jobs", fmt(p50), f"program alone {fmt(direct)}", "goal <= 10 ms"))
    fig.rows.append((f"p99 over {n} jobs", fmt(p99), "", "goal <= 50 ms"))
    return fig


def docker_ready() -> bool:
    """Whether an engine answers; the worker image is then built (from Debian packages) unless it
    is current, so the figure never measures a worker older than the code."""
    if subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        return False
    built = subprocess.run([sys.executable, "-m", "dropq", "image", "build", "--from-debian", "--tag", IMAGE],
                           capture_output=True, text=True, cwd=ROOT)
    if built.returncode != 0:
        print(f"bench: could not build {IMAGE}: {built.stderr.strip()[-500:]}", file=sys.stderr)
    return built.returncode == 0


def fig_docker(reps: int, scale: float) -> Figure:
    fig = Figure("3. Docker pool: warm workers vs a baseline in a container, and vs one `docker run --rm` per job")
    if not docker_ready():
        fig.rows.append(("skipped", "no Docker engine, or the worker image could not be built", "", ""))
        return fig
    n_fast, n_run = max(2, int(300 * scale)), max(2, int(40 * scale))
    d_fast, p_fast, x_fast, d_run, r_run = [], [], [], [], []
    with bench(pool="docker") as b:
        b.start()
        b.drop("pass.py")
        b.wait_committed(1)
        mount = ["-v", f"{b.programs}:/dropq/programs:ro", "--network", "none", "--user", "65534:65534"]
        # GNU parallel is a Perl script that the image's perl-base runs: mounted from the host
        gnu = ["-v", f"{shutil.which('parallel')}:/usr/local/bin/parallel:ro"]
        script = f"seq {n_fast} | parallel -j2 python3 /dropq/programs/pass.py"
        in_container = ["docker", "run", "--rm", *mount, *gnu, "--entrypoint", "sh", IMAGE, "-c", script]
        script = f"seq {n_fast} | xargs -P 2 -n 1 python3 /dropq/programs/pass.py"
        xargs = ["docker", "run", "--rm", *mount, "--entrypoint", "sh", IMAGE, "-c", script]
        per_job = ["docker", "run", "--rm", *mount, "--entrypoint", "python3", IMAGE, "/dropq/programs/pass.py"]
        for _ in range(reps):
            d_fast.append(timed(run_batch, b, "pass.py", [], n_fast))
            p_fast.append(timed(run, in_container))
            x_fast.append(timed(run, xargs))
            d_run.append(timed(run_batch, b, "pass.py", [], n_run))
            r_run.append(timed(parallel, per_job, n_run))
    d, p, x = statistics.median(d_fast), statistics.median(p_fast), statistics.median(x_fast)
    fig.rows.append((f"{n_fast} trivial jobs vs parallel -j2 in a container", fmt(d), fmt(p), f"{p / d:.2f}"))
    fig.rows.append((f"{n_fast} trivial jobs vs xargs -P2 in a container", fmt(d), fmt(x), f"{x / d:.2f}"))
    d, r = statistics.median(d_run), statistics.median(r_run)
    fig.rows.append((f"{n_run} trivial jobs vs parallel -j2 docker run --rm", fmt(d), fmt(r), f"{r / d:.1f}"))
    return fig


def fig_backlog(reps: int, scale: float) -> Figure:
    fig = Figure("4. Backlog present at start (first dispatch, steady throughput, daemon peak RSS)")
    for backlog in (int(10_000 * scale), int(100_000 * scale)):
        with bench() as b:
            for _ in range(backlog):
                b.drop("pass.py")
            started = b.start()
            b.wait_committed(1)
            first = time.perf_counter() - started
            window = max(50, int(1000 * scale))
            b.wait_committed(50)
            t0, c0 = time.perf_counter(), b.committed()
            b.wait_committed(c0 + window)
            rate = window / (time.perf_counter() - t0)
            fig.rows.append((f"{backlog} queued: first commit after start", fmt(first), "", "goal <= 2 s"))
            fig.rows.append((f"{backlog} queued: steady throughput", f"{rate:.0f} jobs/s", "", ""))
            fig.rows.append((f"{backlog} queued: daemon peak RSS", f"{b.peak_rss_mb():.0f} MB", "", "goal < 200 MB"))
    return fig


def fig_idle(reps: int, scale: float) -> Figure:
    fig = Figure("5. Idle cost: the daemon and 4 idle workers")
    seconds = max(5.0, 60 * scale)
    with bench(count=4) as b:
        b.start()
        time.sleep(2)
        before = b.cpu_seconds()
        time.sleep(seconds)
        used = b.cpu_seconds() - before
    fig.rows.append((f"CPU seconds over {seconds:.0f} s", f"{used:.2f} s", "",
                     f"{used * 60 / seconds:.2f} s/min (goal < 0.5)"))
    return fig


#: a program that declares a dependency it does not import, and the same program declaring nothing: the
#: difference between the two is what running in an environment costs, not what the package costs
IN_ENV = '# /// script\n# dependencies = ["six"]\n# ///\n'
HEAVY = ["tabulate", "numpy"]


def _isolated_env() -> dict[str, str]:
    """This host's environment without its pip configuration (its extra local indexes and wheel folders
    would give pip files uv never sees), so that both installers reach the same index."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "UV_"))}
    return {**env, "PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1",
            "PIP_CERT": os.environ.get("SSL_CERT_FILE", "/etc/ssl/certs/ca-certificates.crt")}


def _build_with(tool: str, packages: list[str], cache: Path) -> float:
    """Seconds to make a virtualenv holding `packages` with pip (venv + pip install) or uv (as dropq does)."""
    from dropq.envs.install import uv_binary

    folder = Path(tempfile.mkdtemp(prefix="dqbench-env-"))
    env = _isolated_env()
    start = time.perf_counter()
    if tool == "uv":
        uv = str(uv_binary())
        subprocess.run([uv, "venv", "-q", "--no-config", "--python", PYTHON, str(folder / "v")], check=True, env=env)
        subprocess.run([uv, "pip", "install", "-q", "--no-config", "--python", str(folder / "v" / "bin" / "python"),
                        "--cache-dir", str(cache), *packages], check=True, env=env)
    else:
        subprocess.run([PYTHON, "-m", "venv", str(folder / "v")], check=True, env=env)
        subprocess.run([str(folder / "v" / "bin" / "pip"), "install", "-q", "--cache-dir", str(cache), *packages],
                       check=True, env={**env, "PIP_CACHE_DIR": str(cache)})
    took = time.perf_counter() - start
    shutil.rmtree(folder, ignore_errors=True)
    return took


def fig_envs(reps: int, scale: float) -> Figure:
    fig = Figure("6. Environments: the installer, the first job of a new environment, and steady throughput "
                 "(local pool)")
    # pip against uv, on the same dependency list, from a cold cache and from a warm one
    for tool_cache in ("cold", "warm"):
        times: dict[str, list[float]] = {"uv": [], "pip": []}
        for _ in range(reps):
            for tool in ("uv", "pip"):
                cache = Path(tempfile.mkdtemp(prefix="dqbench-cache-"))
                if tool_cache == "warm":
                    _build_with(tool, HEAVY, cache)
                times[tool].append(_build_with(tool, HEAVY, cache))
                shutil.rmtree(cache, ignore_errors=True)
        u, q = statistics.median(times["uv"]), statistics.median(times["pip"])
        fig.rows.append((f"build {' + '.join(HEAVY)}, {tool_cache} cache: uv | pip", fmt(u), fmt(q), f"{q / u:.2f}"))
    # the first job of a new environment (its build included) against the first job of a program without one
    first, plain = [], []
    for _ in range(reps):
        with bench() as b:
            (b.programs / "in_env.py").write_text(IN_ENV)
            (b.programs / "plain.py").write_text("")
            b.start()
            plain.append(timed(run_batch, b, "plain.py", [], 1))
            first.append(timed(run_batch, b, "in_env.py", [], 1))
    fig.rows.append(("first job: new environment (build) | no environment", fmt(statistics.median(first)),
                     fmt(statistics.median(plain)), f"{statistics.median(plain) / statistics.median(first):.2f}"))
    # steady throughput, the environment built: goal within 10 % of the same program without one
    n = max(5, int(300 * scale))
    with_env, without = [], []
    with bench() as b:
        (b.programs / "in_env.py").write_text(IN_ENV)
        (b.programs / "plain.py").write_text("")
        b.start()
        run_batch(b, "in_env.py", [], 1)  # builds it
        for _ in range(reps):
            with_env.append(timed(run_batch, b, "in_env.py", [], n))
            without.append(timed(run_batch, b, "plain.py", [], n))
    w, o = statistics.median(with_env), statistics.median(without)
    fig.rows.append((f"{n} jobs: in an environment | without", fmt(w), fmt(o), f"{o / w:.2f}"))
    return fig


def fig_arrays(reps: int, scale: float) -> Figure:
    fig = Figure("7. Arrays: one manifest with a 10,000-task matrix | 10,000 separate manifests of the same program "
                 "(local pool, 2 warm workers, drop -> committed outbox folder(s))")
    # a square matrix keeps the manifest small (100 x 100 values, not a list of 10,000)
    side = max(2, int(math.sqrt(10_000 * scale)))
    n = side * side
    array = yaml.safe_dump({"program": "pass.py", "matrix": {"i": list(range(side)), "j": list(range(side))}})
    # one repetition at full size: each arm is 10,000 jobs, and three of each would take the suite past its
    # 10 minutes on 2 cores
    reps = reps if scale < 1 else 1
    a_times, s_times, a_cpu, s_cpu = [], [], [], []
    with bench() as b:
        b.start()
        run_batch(b, "pass.py", [], 1)  # warm
        for rep in range(reps):
            daemon_cpu = _cpu(b.proc.pid) if b.proc else 0.0
            a_times.append(timed(_run_array, b, f"arr{rep}", array))
            a_cpu.append((_cpu(b.proc.pid) if b.proc else 0.0) - daemon_cpu)
            daemon_cpu = _cpu(b.proc.pid) if b.proc else 0.0
            s_times.append(timed(run_batch, b, "pass.py", [], n))
            s_cpu.append((_cpu(b.proc.pid) if b.proc else 0.0) - daemon_cpu)
    a, m = statistics.median(a_times), statistics.median(s_times)
    fig.rows.append((f"{n} trivial tasks: one array | {n} manifests", fmt(a), fmt(m), f"{m / a:.2f}"))
    fig.rows.append(("  daemon CPU for them", f"{statistics.median(a_cpu):.2f} s", f"{statistics.median(s_cpu):.2f} s",
                     f"{statistics.median(s_cpu) / max(statistics.median(a_cpu), 1e-9):.2f}"))
    return fig


def _run_array(b: Bench, name: str, text: str) -> None:
    """Drop one array manifest and wait until its one folder is committed (every task has ended)."""
    base = b.committed()
    tmp = b.inbox / f".{name}.tmp"
    tmp.write_text(text)
    os.rename(tmp, b.inbox / f"{name}.yaml")
    b.wait_committed(base + 1)
    result = yaml.safe_load((b.outbox / name / "result.yaml").read_text())
    if result["status"] != "succeeded":
        raise RuntimeError(f"the array {name} ended {result['status']}: {result['error']}")


def fig_agents(reps: int, scale: float) -> Figure:
    fig = Figure("8. Agents (`dropq agent` on loopback, local pools): throughput of 0.5 s jobs with N agents of one "
                 "worker each, and the latency an agent adds")
    per_agent = max(2, int(20 * scale))
    rates: dict[int, float] = {}
    for n_agents in (1, 2, 4):
        n = per_agent * n_agents
        times = []
        with bench(agents=True) as b:
            b.start()
            for i in range(n_agents):
                b.start_agent(f"a{i + 1}")
            run_batch(b, "sleep.py", ["0.5"], n_agents)  # warm: every agent has fetched the programs
            for _ in range(reps):
                times.append(timed(run_batch, b, "sleep.py", ["0.5"], n))
        rates[n_agents] = n / statistics.median(times)
        ideal = rates[1] * n_agents
        fig.rows.append((f"{n_agents} agent(s): {n} jobs", f"{rates[n_agents]:.2f} jobs/s",
                         f"{n_agents} x one agent: {ideal:.2f} jobs/s", f"{rates[n_agents] / ideal:.2f} (goal >= 0.9)"))
    n = int(200 * scale)
    p50: dict[str, float] = {}
    for arm in ("local", "agent"):
        with bench(count=1, agents=arm == "agent") as b:
            b.start()
            if arm == "agent":
                b.start_agent("a1")
            b.drop("pass.py")
            b.wait_committed(1)
            took = sorted(timed(run_batch, b, "pass.py", [], 1) for _ in range(n))
        p50[arm] = took[len(took) // 2]
    fig.rows.append((f"latency p50 over {n} trivial jobs: agent | local worker", fmt(p50["agent"]), fmt(p50["local"]),
                     f"added {fmt(p50['agent'] - p50['local'])} (goal <= 10 ms)"))
    return fig


#: the program of issue 15 whose imports a warm interpreter preloads
IMPORTS = ('# /// script\n# [tool.dropq]\n# preload = ["json", "csv", "decimal", "email", "http.client", '
           '"xml.etree.ElementTree", "sqlite3", "asyncio"]\n# ///\n'
           "import json, csv, decimal, email, http.client, xml.etree.ElementTree, sqlite3, asyncio\n")
#: a numpy program in an environment of its own (numpy from the index, through dropq's environments), numpy preloaded
NUMPY = ('# /// script\n# dependencies = ["numpy"]\n# [tool.dropq]\n# preload = ["numpy"]\n# ///\n'
         "import numpy as np\nprint(int(np.arange(1000).sum()))\n")


def _fork_servers(b: Bench) -> list[int]:
    """The fork servers of the bench's workers (children of the worker processes running forkserver.py)."""
    found = []
    for worker in _pids_mentioning(str(b.root / "state" / "workers")):
        for task in Path(f"/proc/{worker}/task").glob("*/children"):
            for pid in task.read_text().split():
                try:
                    if b"forkserver.py" in Path(f"/proc/{pid}/cmdline").read_bytes():
                        found.append(int(pid))
                except OSError:
                    continue
    return found


def _env_python(b: Bench) -> str:
    found = sorted((b.root / "state" / "envs").glob("*/bin/python"))
    if not found:
        raise RuntimeError("the numpy environment was not built")
    return str(found[0])


def fig_warm(reps: int, scale: float) -> Figure:
    fig = Figure("9. Warm interpreters, local pool, 2 workers: forked | fresh (fresh_interpreter: true) | "
                 "parallel -j2, interleaved")
    with bench() as b:
        (b.programs / "imports.py").write_text(IMPORTS)
        (b.programs / "numpy_job.py").write_text(NUMPY)
        b.start()
        for program in ("pass.py", "imports.py", "numpy_job.py"):
            run_batch(b, program, [], 2)  # builds the numpy environment; starts each fork server
        for label, program, n, python in (("trivial jobs", "pass.py", int(300 * scale), PYTHON),
                                          ("stdlib-import jobs", "imports.py", int(200 * scale), PYTHON),
                                          ("numpy jobs, numpy preloaded", "numpy_job.py", int(200 * scale),
                                           _env_python(b))):
            n = max(n, 4)
            warm, fresh, par = [], [], []
            for _ in range(reps):
                warm.append(timed(run_batch, b, program, [], n))
                fresh.append(timed(run_batch, b, program, [], n, True))
                par.append(timed(parallel, [python, str(b.programs / program)], n))
            w, f, p = statistics.median(warm), statistics.median(fresh), statistics.median(par)
            fig.rows.append((f"{n} {label}: forked vs parallel", fmt(w), fmt(p), f"{p / w:.2f}"))
            fig.rows.append((f"{n} {label}: fresh vs parallel", fmt(f), fmt(p), f"{p / f:.2f}"))
        # latency as figure 2 counts it (drop -> commit, less `python3 /dev/null` run directly), both ways
        direct = statistics.median(timed(run, [PYTHON, os.devnull]) for _ in range(20))
        n = max(10, int(200 * scale))
        for fresh_arm in (False, True):
            took = sorted(timed(run_batch, b, "pass.py", [], 1, fresh_arm) for _ in range(n))
            p50, p99 = took[len(took) // 2], took[min(len(took) - 1, int(len(took) * 0.99))]
            fig.rows.append((f"drop -> commit p50 / p99 over {n}, {'fresh' if fresh_arm else 'forked'}",
                             f"{fmt(p50)} / {fmt(p99)}", f"program alone {fmt(direct)}",
                             f"less it: {fmt(p50 - direct)} / {fmt(p99 - direct)}"))
        # the idle fork servers' CPU
        servers = _fork_servers(b)
        seconds = max(5.0, 60 * scale)
        before = sum(_cpu(pid) for pid in servers)
        time.sleep(seconds)
        used = sum(_cpu(pid) for pid in servers) - before
        fig.rows.append((f"{len(servers)} idle fork servers, CPU over {seconds:.0f} s", f"{used:.2f} s", "",
                         f"{used * 60 / seconds:.2f} s/min (goal < 0.5)"))
    return fig


def fig_warm_docker(reps: int, scale: float) -> Figure:
    fig = Figure("10. Warm interpreters, docker pool, 2 workers: forked vs xargs -P2 in a worker-image container, "
                 "interleaved; with workers.job_uids: null, then with per-job uids (the default)")
    if not docker_ready():
        fig.rows.append(("skipped", "no Docker engine, or the worker image could not be built", "", ""))
        return fig
    n = max(4, int(300 * scale))
    # per-job uids: the fork server is privileged and takes no program's preload, only the operator's
    # (workers.preload, standard library only): the imports program's list is given there
    stdlib = ["json", "csv", "decimal", "email", "http.client", "xml.etree.ElementTree", "sqlite3", "asyncio"]
    settings: tuple[tuple[str, dict[str, Any]], ...] = (
        ("job_uids: null", {"job_uids": None}), ("per-job uids", {"preload": stdlib}))
    for setting, workers in settings:
        with bench(pool="docker", workers=workers) as b:
            (b.programs / "imports.py").write_text(IMPORTS)
            b.start()
            mount = ["-v", f"{b.programs}:/dropq/programs:ro", "--network", "none", "--user", "65534:65534"]
            for label, program in (("trivial jobs", "pass.py"), ("stdlib-import jobs", "imports.py")):
                run_batch(b, program, [], 2)
                script = f"seq {n} | xargs -P 2 -n 1 python3 /dropq/programs/{program}"
                xargs = ["docker", "run", "--rm", *mount, "--entrypoint", "sh", IMAGE, "-c", script]
                warm, fresh, xs = [], [], []
                for _ in range(reps):
                    warm.append(timed(run_batch, b, program, [], n))
                    fresh.append(timed(run_batch, b, program, [], n, True))
                    xs.append(timed(run, xargs))
                w, f, x = statistics.median(warm), statistics.median(fresh), statistics.median(xs)
                fig.rows.append((f"{n} {label}, {setting}: forked vs xargs -P2", fmt(w), fmt(x), f"{x / w:.2f}"))
                fig.rows.append((f"{n} {label}, {setting}: fresh vs xargs -P2", fmt(f), fmt(x), f"{x / f:.2f}"))
    return fig


FIGURES = {"1": fig_throughput, "2": fig_latency, "3": fig_docker, "4": fig_backlog, "5": fig_idle, "6": fig_envs,
           "7": fig_arrays, "8": fig_agents, "9": fig_warm, "10": fig_warm_docker}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="a few jobs per figure: checks that it runs")
    p.add_argument("--only", default="1,2,3,4,5,6,7,8,9,10", help="figures to run, e.g. 1,2")
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args(argv)
    scale, reps = (0.02, 1) if args.smoke else (1.0, args.reps)
    if shutil.which("parallel") is None:
        print("bench: GNU parallel is needed for the baselines (apt-get install parallel)", file=sys.stderr)
        return 2
    begun = time.perf_counter()
    start_up = statistics.median(timed(run, [PYTHON, "-c", "pass"]) for _ in range(20))
    print(f"machine: {os.cpu_count()} cores; `python3 -c pass` takes {fmt(start_up)}")
    try:
        for key in args.only.split(","):
            fig = FIGURES[key.strip()](reps, scale)
            print(f"\n{fig.name}")
            widths = [max(len(r[i]) for r in [("what", "dropq", "baseline", "ratio"), *fig.rows]) for i in range(4)]
            for row in [("what", "dropq", "baseline", "ratio (baseline/dropq)"), *fig.rows]:
                print("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)))
            sys.stdout.flush()
    finally:
        for root in _LEFT:
            shutil.rmtree(root, ignore_errors=True)
    print(f"\nsuite took {time.perf_counter() - begun:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
