"""Jobs cannot touch each other on a warm worker (issue 16): each attack of a job on the jobs that come
after it on the same worker, tried on the docker pool and, where the daemon runs as root, the local
pool (which then runs jobs under uids of their own too). One worker per daemon, so that attacker and
victims share it, as they do on a busy warm pool."""

from __future__ import annotations

import json
import os
import random
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import DaemonProcess, Workspace
from dropq.pools.transport import Transport
from dropq_worker.isolation import PER_WORKER, processes_of
from dropq_worker.protocol import JobSpec, Outcome
from helpers import containers_of, dropq_json, record_attack, wait_until

# the keys of the three jobs after this one, as every dropq before issue 16 made them (j<seq>-<attempt>),
# planted as symlinks into /tmp (to read later) or as FIFOs (to hang the worker that opens them)
PLANT = r'''
import json, os, sys
kind, tag = sys.argv[1:3]
key = os.path.basename(os.getcwd())
seq = int(key[1:].split("-")[0])
tried = planted = 0
for s in range(seq + 1, seq + 4):
    for stream in ("stdout", "stderr"):
        path = f"../j{s}-1.{stream}"
        tried += 1
        try:
            if kind == "symlink":
                os.symlink(f"/tmp/{tag}-{s}.{stream}", path)
            else:
                os.mkfifo(path)
            planted += 1
        except OSError:
            pass
print(json.dumps({"tried": tried, "planted": planted}))
'''

COLLECT = r'''
import glob, json, sys
print(json.dumps({p: open(p, errors="replace").read() for p in glob.glob(f"/tmp/{sys.argv[1]}-*")}))
'''

LEAVE = r'''
import os, subprocess, sys
tag = sys.argv[1]
for place in ("/tmp", "/dev/shm"):
    with open(f"{place}/{tag}-file", "w") as fh:
        fh.write("left behind")
os.makedirs(f"/tmp/{tag}-dir/a/b")
open(f"/tmp/{tag}-dir/a/b/deep", "w").write("x")
os.chmod(f"/tmp/{tag}-dir/a", 0o500)  # a folder its owner left unwritable: removed all the same
# and a process that would go on writing there, escaped from the job's session
subprocess.Popen([sys.executable, "-c", f"import os, time; os.setsid(); time.sleep(300)"])
print("left")
'''

LOOK = r'''
import json, os, sys
tag = sys.argv[1]
seen = {}
for place in ("/tmp", "/dev/shm"):
    names = os.listdir(place)
    seen[place] = sorted(n for n in names if n.startswith(tag) or sys.argv[2] == "all")
print(json.dumps(seen))
'''

CAPS = r'''
import json, os
def status(pid):
    return dict(line.split(":\t", 1) for line in open(f"/proc/{pid}/status").read().splitlines() if ":\t" in line)
me = status("self")
print(json.dumps({"caps": {k: v.strip() for k, v in me.items() if k.startswith("Cap")},
                  "uid": os.getuid(), "groups": os.getgroups(),
                  "worker_uid": int(status(os.getppid())["Uid"].split()[0])}))
'''

FILL = r'''
import os, time
n = 0
while True:
    # files far below jobs.max_file_bytes, in the output folder and in /tmp: only their sum is too much
    where = "/tmp" if n % 2 else "."
    with open(os.path.join(where, f"fill-{os.getpid()}-{n}"), "wb") as fh:
        fh.write(b"x" * 1048576)
    n += 1
    time.sleep(0.01)
'''

VICTIM = "open('secret.txt', 'w').write('the victim secret')\nprint('victim stdout secret')\n"

SNOOP = r'''
import json, os, sys
key = sys.argv[1]
r = {}
def attempt(name, fn):
    try:
        r[name] = f"ESCAPED: {fn()!r}"[:200]
    except OSError as exc:
        r[name] = f"denied: {type(exc).__name__}"
def rewrite():
    with open(f"../{key}/secret.txt", "w") as fh:
        fh.write("forged")
attempt("list the staging folder", lambda: os.listdir(".."))
attempt("read the previous job's file", lambda: open(f"../{key}/secret.txt").read())
attempt("rewrite the previous job's file", rewrite)
attempt("read the previous job's stdout", lambda: open(f"../{key}.stdout").read())
attempt("plant a file in the previous job's folder", lambda: open(f"../{key}/planted.txt", "w").close())
print(json.dumps(r))
'''

LINGER = r'''
import os, subprocess, sys, time
subprocess.Popen([sys.executable, "-c", "import os, time; os.setsid(); time.sleep(300)"])
os.makedirs("deep/er")
os.chmod("deep", 0o500)
print("running", flush=True)
time.sleep(300)
'''

PROGRAMS = {"linger.py": LINGER, "plant_next.py": PLANT, "collect_stolen.py": COLLECT, "leave_tmp.py": LEAVE,
            "look_tmp.py": LOOK, "caps.py": CAPS, "fill_disk.py": FILL, "victim.py": VICTIM, "snoop.py": SNOOP}

POOLS = [pytest.param("docker", marks=pytest.mark.docker), "local"]


@pytest.fixture(params=POOLS)
def isolated(request: pytest.FixtureRequest, workspace: Workspace) -> Iterator[Workspace]:
    """A workspace with one worker on the pool under test, and the attack programs."""
    pool: str = request.param
    for name, text in PROGRAMS.items():
        (workspace.programs / name).write_text(text)
    if pool == "docker":
        image = request.getfixturevalue("docker_image")
        workspace.configure(workers={"pool": "docker", "count": 1, "docker": {
            "image": image, "memory": "256m", "pids_limit": 64, "tmpfs_size": "32m"}})
    else:
        if os.geteuid() != 0:
            pytest.skip("the local pool runs jobs under uids of their own only when the daemon runs as root")
        # job uids must pass through the workspace's folders to their programs and their own folder
        os.chmod(workspace.root, 0o755)
        # a range of its own: local jobs share the host, and a job's clean-up kills every process of its uid
        # and to an interpreter: the test's own may be under root's home (pyenv)
        python = next((p for p in ("/usr/bin/python3", "/usr/local/bin/python3") if os.path.exists(p)), None)
        if python is None:
            pytest.skip("no interpreter outside root's home for jobs of other uids")
        workspace.configure(workers={"pool": "local", "count": 1, "python": python,
                                     "job_uids": 1_600_000_000 + random.randrange(1, 100_000) * 8})
    workspace.configure(jobs={"max_output_bytes": 1024 * 1024, "kill_grace": 1})
    yield workspace


def on_pool(ws: Workspace, *job_ids: str) -> str:
    """The pool the daemon runs (asserted to be the one configured), checked for each job."""
    pool = dropq_json(ws.config, "status")["daemon"]["pool"]
    wanted = ws.settings["workers"]["pool"]
    assert pool.startswith(f"{wanted} ") or pool == wanted, f"the daemon runs the {pool!r} pool, not {wanted}"
    if wanted == "docker":
        containers = containers_of(ws.state)
        for job_id in job_ids:
            assert ws.result(job_id)["worker"] in containers
    return wanted


def run(ws: Workspace, job_id: str, manifest: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
    """Drop one manifest and wait for its result (one after the other: the order is the attack)."""
    before = len(ws.results())
    ws.drop(f"{job_id}.yaml", manifest)
    return ws.wait_results(before + 1, timeout=timeout)[job_id]


@pytest.mark.parametrize("kind", ["symlink", "fifo"])
def test_links_and_fifos_planted_at_the_next_keys_neither_steal_nor_hang(isolated: Workspace,
                                                                        daemon: DaemonProcess, kind: str) -> None:
    daemon.start()
    tag = f"dq-stolen-{secrets.token_hex(4)}"  # the local pool's /tmp is the host's: names of this test's own
    planter = run(isolated, "planter", {"program": "plant_next", "args": [kind, tag]})
    victims = [f"victim{i}" for i in range(3)]
    for job_id in victims:  # each waits for the one before: a hung worker fails the test here
        run(isolated, job_id, {"program": "echo", "args": [f"{job_id} output"]}, timeout=45)
    collector = run(isolated, "collector", {"program": "collect_stolen", "args": [tag]})
    stolen = json.loads((isolated.outbox / collector["id"] / "stdout.txt").read_text())
    pool = on_pool(isolated, "planter", "collector", *victims)
    results = isolated.results()
    intact = sum(results[v]["status"] == "succeeded"
                 and (isolated.outbox / v / "stdout.txt").read_text().startswith(f"{v} output") for v in victims)
    attempts = json.loads((isolated.outbox / "planter" / "stdout.txt").read_text())
    contained = intact == len(victims) and not stolen and planter["status"] == "succeeded"
    record_attack(f"{kind}s planted at the next jobs' capture paths ({pool})", len(victims), intact * contained)
    assert contained, (attempts, stolen, {v: results[v] for v in victims})
    assert attempts["planted"] == 0, "a job could create files in its worker's staging folder"


def test_tmp_and_dev_shm_are_empty_for_the_next_job(isolated: Workspace, daemon: DaemonProcess) -> None:
    daemon.start()
    tag = f"dq-left-{secrets.token_hex(4)}"
    assert run(isolated, "leaver", {"program": "leave_tmp", "args": [tag]})["status"] == "succeeded"
    everything = "all" if isolated.settings["workers"]["pool"] == "docker" else "mine"
    looker = run(isolated, "looker", {"program": "look_tmp", "args": [tag, everything]})
    pool = on_pool(isolated, "leaver", "looker")
    seen = json.loads((isolated.outbox / "looker" / "stdout.txt").read_text())
    # the docker pool's /tmp and /dev/shm are the container's own: the next job finds them empty
    # (the looker's own Python writes nothing there); the local pool's are the host's, so only the
    # leaver's entries are looked for there
    left = [name for names in seen.values() for name in names]
    record_attack(f"/tmp and /dev/shm carried over to the next job ({pool})", 1, int(not left))
    assert looker["status"] == "succeeded" and not left, seen
    if pool == "local":
        assert not list(Path("/tmp").glob(f"{tag}*")) and not list(Path("/dev/shm").glob(f"{tag}*"))


def test_a_job_has_no_capability_and_not_the_workers_uid(isolated: Workspace, daemon: DaemonProcess) -> None:
    daemon.start()
    first = run(isolated, "caps1", {"program": "caps"})
    second = run(isolated, "caps2", {"program": "caps"})
    pool = on_pool(isolated, "caps1", "caps2")
    seen = [json.loads((isolated.outbox / r["id"] / "stdout.txt").read_text()) for r in (first, second)]
    empty = "0000000000000000"
    contained = all(all(value == empty for value in job["caps"].values()) and len(job["caps"]) >= 5
                    and job["uid"] not in (0, job["worker_uid"]) and job["groups"] in ([], [job["uid"]])
                    for job in seen)
    # one uid per job: the next job is not the owner of anything the previous one made
    contained = contained and seen[0]["uid"] != seen[1]["uid"]
    record_attack(f"a job with capabilities or its worker's uid ({pool})", 2, 2 * contained)
    assert contained, seen


def test_a_job_past_its_disk_budget_is_stopped_saying_so(isolated: Workspace, daemon: DaemonProcess) -> None:
    isolated.configure(jobs={"max_disk_bytes": 8 * 1024 * 1024, "max_file_bytes": 2 * 1024 * 1024})
    daemon.start()
    result = run(isolated, "filler", {"program": "fill_disk", "timeout": 60}, timeout=90)
    pool = on_pool(isolated, "filler")
    output = isolated.outbox / "filler" / "output"
    kept = sum(p.stat().st_size for p in output.iterdir())
    message = "the job wrote more than 8.0 MiB (jobs.max_disk_bytes); it was stopped"
    contained = result["status"] == "failed" and result["error"] == message and kept < 64 * 1024 * 1024
    record_attack(f"disk fill (many files under the size limit) ({pool})", 1, int(contained))
    assert contained, (result, kept)


@pytest.mark.docker
def test_the_next_job_cannot_read_or_rewrite_the_previous_jobs_staging(workspace: Workspace,
                                                                       daemon: DaemonProcess,
                                                                       docker_image: str) -> None:
    """The previous job's staging held in place (the daemon stopped before it could publish it), and its
    key handed to the next job: a job that learnt a key still cannot reach what it names."""
    for name, text in PROGRAMS.items():
        (workspace.programs / name).write_text(text)
    workspace.configure(workers={"pool": "docker", "count": 1,
                                 "docker": {"image": docker_image, "on_shutdown": "leave"}})
    daemon.start()
    on_pool(workspace)
    daemon.stop()  # its container stays, and nothing publishes what the worker runs from here
    work = workspace.state / "workers" / "w1" / "work"
    token = (workspace.state / "workers" / "w1" / "token").read_text()
    worker = Transport(socket_path=str(work / "worker.sock"), token=token)
    try:
        victim = worker.start(JobSpec(key="va-1", job_id="va", program="victim.py"), wait=30)
        snoop = worker.start(JobSpec(key="vb-1", job_id="vb", program="snoop.py", args=("va-1",)), wait=30)
    finally:
        worker.close()
    assert victim.outcome is Outcome.EXITED and victim.exit_code == 0, victim
    assert snoop.outcome is Outcome.EXITED and snoop.exit_code == 0, snoop
    report = json.loads((work / "jobs" / "vb-1.stdout").read_text())
    secret = (work / "jobs" / "va-1" / "secret.txt").read_text()
    denied = sum(verdict.startswith("denied") for verdict in report.values())
    intact = secret == "the victim secret"
    record_attack("reading or rewriting the previous job's staging (docker)", len(report), denied * intact)
    assert denied == len(report) and intact, report
    assert not (work / "jobs" / "va-1" / "planted.txt").exists()


# local only: a docker worker's death ends its container, and every process in it, by itself
@pytest.mark.parametrize("isolated", ["local"], indirect=True)
def test_a_worker_killed_mid_job_leaves_nothing_of_the_job_to_the_next(isolated: Workspace,
                                                                       daemon: DaemonProcess) -> None:
    """A local worker killed with SIGKILL cannot clean up after its job: the worker that replaces it
    kills every process of its job uids (a `setsid` escapee too) and takes back their staging."""
    daemon.start()
    isolated.drop("linger.yaml", {"program": "linger", "retries": 0})
    first = isolated.settings["workers"]["job_uids"]
    uids = range(first, first + PER_WORKER)
    wait_until(lambda: len([p for uid in uids for p in processes_of(uid)]) >= 2, what="the job and its escapee")
    token = (isolated.state / "workers" / "w1" / "token").read_text()
    worker = Transport(socket_path=str(isolated.state / "workers" / "w1" / "worker.sock"), token=token)
    try:
        os.kill(worker.health().pid, 9)
    finally:
        worker.close()
    result = isolated.wait_results(1, timeout=60)["linger"]
    on_pool(isolated, "linger")

    def alive() -> list[int]:
        return [pid for uid in uids for pid in processes_of(uid)]

    deadline = time.monotonic() + 30
    while alive() and time.monotonic() < deadline:  # the new worker ends them as it starts
        time.sleep(0.05)
    left = alive()
    staging = isolated.state / "workers" / "w1" / "jobs"
    owned = [e.name for e in staging.iterdir() if e.lstat().st_uid in uids]
    record_attack("processes and files of a job whose worker was killed (local)", 1, int(not left and not owned))
    assert result["status"] == "failed", result
    assert not left and not owned, (left, owned)
