"""The sandbox holds (docker pool, real engine): each attack is contained, ends as its own clear result,
and other jobs keep running. Skips without an engine; fails instead under DROPQ_REQUIRE_DOCKER=1."""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import DaemonProcess, Workspace
from dropq.errors import TransportError
from dropq.pools.transport import Transport
from dropq_worker.protocol import PROTOCOL
from helpers import containers_of, dropq_json, record_attack

pytestmark = pytest.mark.docker

ATTACKER = r'''
import json, os, socket, sys
port = int(sys.argv[1])
r = {}
def attempt(name, fn):
    try:
        fn()
        r[name] = "ESCAPED"
    except Exception as exc:
        r[name] = f"contained: {type(exc).__name__}"
def connect_host_loopback():
    socket.create_connection(("127.0.0.1", port), timeout=2).close()
def raw_socket():
    socket.socket(socket.AF_PACKET, socket.SOCK_RAW).close()
def interfaces():
    names = [name for _, name in socket.if_nameindex()]
    if names != ["lo"]:
        return
    raise OSError("only loopback")
def write(path):
    with open(path, "w") as fh:
        fh.write("x")
attempt("network: host loopback", connect_host_loopback)
attempt("network: a raw socket (CAP_NET_RAW)", raw_socket)
attempt("network: an interface besides loopback", interfaces)
attempt("become root: setuid(0)", lambda: os.setuid(0))
attempt("read: /etc/shadow", lambda: open("/etc/shadow").read())
attempt("read: the worker's token in /proc/1/environ", lambda: open("/proc/1/environ", "rb").read())
attempt("read: the worker's memory", lambda: open("/proc/1/mem", "rb").read(1))
attempt("write: root filesystem", lambda: write("/etc/owned"))
attempt("write: programs", lambda: write("/dropq/programs/owned.py"))
attempt("write: inputs", lambda: write("/dropq/inputs/owned"))
def api(token):
    s = socket.socket(socket.AF_UNIX)
    s.connect("/dropq/work/worker.sock")
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    body = json.dumps({"id": "evil", "program": "echo.py"})
    s.sendall(f"POST /jobs HTTP/1.1\r\nHost: w\r\n{auth}Content-Type: application/json\r\n"
              f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n{body}".encode())
    status = s.recv(100).split()[1]
    s.close()
    if status != b"202":
        raise PermissionError(status.decode())
attempt("worker API: no token", lambda: api(None))
attempt("worker API: a wrong token", lambda: api("guess"))
attempt("mknod a device", lambda: os.mknod("/tmp/dev", 0o600 | 0o020000, os.makedev(1, 3)))
print(json.dumps(r))
'''

PROGRAMS = {
    "attacker.py": ATTACKER,
    "forkbomb.py": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
    "balloon.py": "chunks = []\nwhile True:\n    chunks.append(bytearray(16 * 1024 * 1024))\n",
    "fill_tmp.py": "with open('/tmp/fill', 'wb') as fh:\n    while True:\n        fh.write(b'x' * 1048576)\n",
    "big_file.py": "with open('big.bin', 'wb') as fh:\n    while True:\n        fh.write(b'x' * 1048576)\n",
    "flood.py": "import sys\nchunk = b'x' * 1048576\nfor _ in range(1024):\n    sys.stdout.buffer.write(chunk)\n"
                "sys.stdout.buffer.write(b'THE END')\n",
    "plant.py": ("import os\nos.symlink('/etc/passwd', 'passwd-link')\nos.symlink('/', 'root-link')\n"
                 "open('mine.txt', 'w').write('x')\nos.link('mine.txt', 'mine-again.txt')\n"
                 "os.mkfifo('fifo')\nimport socket\ns = socket.socket(socket.AF_UNIX)\ns.bind('sock')\n"
                 "os.remove('../stdout.txt')\nos.symlink('/etc/shadow', '../stdout.txt')\n"
                 "print('planted')\n"),
    "escape.py": ("import subprocess, sys, time\n"
                  "p = subprocess.Popen([sys.executable, '-c', 'import os, time; os.setsid(); time.sleep(300)'])\n"
                  "print(p.pid, flush=True)\n"),
}


@pytest.fixture
def sandbox(workspace: Workspace, docker_image: str) -> Iterator[Workspace]:
    for name, text in PROGRAMS.items():
        (workspace.programs / name).write_text(text)
    workspace.configure(
        workers={"pool": "docker", "count": 2,
                 "docker": {"image": docker_image, "memory": "128m", "pids_limit": 48, "tmpfs_size": "16m"}},
        jobs={"max_output_bytes": 1024 * 1024, "kill_grace": 1})
    yield workspace
    # every sandbox test must have asserted where its jobs ran (an attack "contained" on the local
    # pool proves nothing); this catches a test that forgot, or a config that lost the pool
    if (workspace.state / "dropq.sqlite3").exists():
        pool = dropq_json(workspace.config, "status")["daemon"].get("pool", "")
        assert pool.startswith("docker ("), f"the daemon ran on the {pool!r} pool, not in containers"


def ran_in_containers(ws: Workspace, *job_ids: str) -> None:
    """Assert that the daemon runs the docker pool, and that each job ran on one of its containers."""
    pool = dropq_json(ws.config, "status")["daemon"]["pool"]
    assert pool.startswith("docker ("), f"the daemon runs the {pool!r} pool, not containers"
    containers = containers_of(ws.state)
    for job_id in job_ids:
        worker = ws.result(job_id)["worker"]
        assert worker in containers, f"{job_id} ran on {worker}, which is not a container of this daemon"


@pytest.fixture
def host_listener() -> Iterator[tuple[int, list[bytes]]]:
    """A TCP listener on the host's loopback: a job that reached it would show up here."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.2)
    seen: list[bytes] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            seen.append(b"connection")
            conn.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1], seen
    stop.set()
    thread.join(2)
    server.close()


def test_in_container_attacks_are_contained(sandbox: Workspace, daemon: DaemonProcess,
                                            host_listener: tuple[int, list[bytes]]) -> None:
    port, seen = host_listener
    daemon.start()
    sandbox.drop("attack.yaml", {"program": "attacker", "args": [str(port)]})
    result = sandbox.wait_results(1, timeout=60)["attack"]
    assert result["status"] == "succeeded", result
    ran_in_containers(sandbox, "attack")
    report = json.loads((sandbox.outbox / "attack" / "stdout.txt").read_text())
    for name, verdict in report.items():
        record_attack(name, 1, int(verdict.startswith("contained")))
    assert not seen, "the job reached the host's loopback"
    assert all(v.startswith("contained") for v in report.values()), report


def test_resource_attacks_end_as_their_own_clear_errors(sandbox: Workspace, daemon: DaemonProcess) -> None:
    daemon.start()
    jobs = {
        "forkbomb": ({"program": "forkbomb", "timeout": 5}, "limit of 48 allows"),
        "balloon": ({"program": "balloon", "timeout": 60}, "ran out of memory"),
        "filltmp": ({"program": "fill_tmp", "timeout": 60}, "exited with code 1"),
        "flood": ({"program": "flood", "timeout": 120}, None),
    }
    for name, (manifest, _) in jobs.items():
        sandbox.drop(f"{name}.yaml", manifest)
    sandbox.drop("bystander.yaml", {"program": "echo", "args": ["unharmed"]})
    results = sandbox.wait_results(len(jobs) + 1, timeout=240)
    ran_in_containers(sandbox, "bystander", *jobs)
    assert results["bystander"]["status"] == "succeeded", "other jobs keep running"
    contained = {}
    for name, (_, phrase) in jobs.items():
        r = results[name]
        contained[name] = phrase is None or (r["status"] in ("failed", "timed_out") and phrase in (r["error"] or ""))
    contained["filltmp"] &= "No space left on device" in (sandbox.outbox / "filltmp" / "stderr.txt").read_text()
    flood = results["flood"]
    stdout = (sandbox.outbox / "flood" / "stdout.txt").read_bytes()
    # the flood is contained when its stdout was capped at max_output_bytes and the tail kept
    contained["flood"] = (flood["status"] == "succeeded" and flood["stdout_truncated"] is True
                          and len(stdout) < 1024 * 1024 + 200 and stdout.endswith(b"THE END"))
    for name, ok in contained.items():
        record_attack({"forkbomb": "fork bomb", "balloon": "memory balloon", "filltmp": "disk fill (/tmp tmpfs)",
                       "flood": "1 GiB of stdout"}[name], 1, int(ok))
    assert all(contained.values()), {name: results[name] for name, ok in contained.items() if not ok}


def test_planted_links_and_special_files_are_never_followed(sandbox: Workspace, daemon: DaemonProcess) -> None:
    daemon.start()
    shadow = Path("/etc/shadow")
    shadow_before = shadow.read_bytes() if os.access(shadow, os.R_OK) else b""
    sandbox.drop("plant.yaml", {"program": "plant"})
    result = sandbox.wait_results(1, timeout=60)["plant"]
    ran_in_containers(sandbox, "plant")
    folder = sandbox.outbox / "plant"
    links = [p for p in folder.rglob("*") if p.is_symlink()]
    specials = [p for p in folder.rglob("*") if not (p.is_dir() or p.is_file()) or p.is_symlink()]
    stdout = folder / "stdout.txt"
    contained = (not links and not specials and stdout.is_file() and not stdout.is_symlink()
                 and stdout.read_bytes() == b"" and sorted(result["dropped"]) == sorted(
                     ["fifo", "mine-again.txt", "mine.txt", "passwd-link", "root-link", "sock"]))
    if shadow_before:
        contained = contained and shadow.read_bytes() == shadow_before
    record_attack("planted symlinks, hardlinks, FIFO, socket, stdout symlink", 6, 6 if contained else 0)
    assert contained, (result.get("dropped"), links, specials, stdout.read_bytes()[:100])


def test_a_setsid_grandchild_is_gone_when_its_job_ends(sandbox: Workspace, daemon: DaemonProcess) -> None:
    daemon.start()
    sandbox.drop("escape.yaml", {"program": "escape"})
    assert sandbox.wait_results(1, timeout=60)["escape"]["status"] == "succeeded"
    ran_in_containers(sandbox, "escape")
    alive = []
    for container in containers_of(sandbox.state).values():
        top = container.top(ps_args="-eo pid,args")["Processes"] or []
        alive += [p for p in top if "os.setsid" in " ".join(p)]
    record_attack("setsid grandchild outliving its job", 1, int(not alive))
    assert not alive


def test_api_calls_from_the_host_without_or_with_a_wrong_token_are_refused(sandbox: Workspace,
                                                                           daemon: DaemonProcess) -> None:
    daemon.start()
    ran_in_containers(sandbox)
    sock = str(sandbox.state / "workers" / "w1" / "work" / "worker.sock")
    refused = 0
    for token in (None, "wrong-token"):
        transport = Transport(socket_path=sock, token=token)
        status, _ = transport.request("POST", "/jobs", {"id": "evil", "program": "echo.py"})
        transport.close()
        refused += status == 401
    assert not (sandbox.state / "workers" / "w1" / "work" / "jobs" / "evil").exists(), "no side effect"
    mode = os.stat(sock).st_mode & 0o777
    token_file = sandbox.state / "workers" / "w1" / "token"
    record_attack("worker API without or with a wrong token", 2, refused)
    assert refused == 2 and mode == 0o600 and token_file.stat().st_mode & 0o777 == 0o600
    right = Transport(socket_path=sock, token=token_file.read_text())
    try:
        assert right.health().protocol == PROTOCOL
    except TransportError as exc:  # pragma: no cover - a failure message, not a branch
        raise AssertionError(exc) from exc
    finally:
        right.close()


def test_a_file_past_the_size_limit_stops_the_program_saying_so(sandbox: Workspace, daemon: DaemonProcess) -> None:
    sandbox.configure(jobs={"max_file_bytes": 4 * 1024 * 1024, "max_output_bytes": 1024 * 1024})
    daemon.start()
    sandbox.drop("big.yaml", {"program": "big_file", "timeout": 60})
    sandbox.drop("bystander.yaml", {"program": "echo"})
    results = sandbox.wait_results(2, timeout=60)
    ran_in_containers(sandbox, "big", "bystander")
    big = results["big"]
    contained = big["status"] == "failed" and "file size limit" in big["error"]
    contained = contained and (sandbox.outbox / "big" / "output" / "big.bin").stat().st_size <= 4 * 1024 * 1024
    record_attack("disk fill (one file in the staging folder)", 1, int(contained))
    assert contained, big
    assert results["bystander"]["status"] == "succeeded"
