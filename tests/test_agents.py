"""Agents: a real daemon and real `dropq agent` processes on 127.0.0.1, with local pools (issue 14).

The leases are short (2-3 s) so that losing an agent costs the test a few seconds, not thirty.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from conftest import DaemonProcess, Workspace
from helpers import dropq, dropq_json, wait_for_status, wait_until

TOKEN = "agents-test-token-0123456789abcdef"


class Agents:
    """`dropq agent` processes of one test, killed by pid at the end."""

    def __init__(self, ws: Workspace) -> None:
        self.ws = ws
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.token = ws.root / "agents.token"
        self.token.write_text(TOKEN)
        self.token.chmod(0o600)

    def url(self) -> str:
        db = sqlite3.connect(f"file:{self.ws.state / 'dropq.sqlite3'}?mode=ro", uri=True)
        try:
            row = db.execute("SELECT value FROM meta WHERE key = 'agents'").fetchone()
        finally:
            db.close()
        assert row and row[0], "the daemon published no agents address"
        return str(row[0])

    def start(self, name: str, *, workers: int = 1, token: Path | None = None,
              pool: str = "local") -> subprocess.Popen[bytes]:
        log = open(self.log_path(name), "ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "dropq", "agent", "--server", self.url(), "--token-file", str(token or self.token),
             "--pool", pool, "--workers", str(workers), "--name", name, "--work-dir", str(self.ws.root / name)],
            stdout=log, stderr=subprocess.STDOUT, cwd=self.ws.root)
        log.close()
        self.procs[name] = proc
        return proc

    def log_path(self, name: str) -> Path:
        return self.ws.root / f"{name}.log"

    def log(self, name: str) -> str:
        return self.log_path(name).read_text(errors="replace")

    def wait_registered(self, *names: str) -> None:
        for name in names:
            def registered(n: str = name) -> bool:
                return "registered" in self.log(n)
            wait_until(registered, timeout=30, what=f"agent {name} to register")

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)  # one stopped by a test must be able to die
                proc.terminate()
        for name, proc in self.procs.items():
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
            print(f"--- agent {name} ---\n{self.log(name)[-5000:]}")


@pytest.fixture
def agents(workspace: Workspace) -> Iterator[Agents]:
    group = Agents(workspace)
    # a fixed port, not 0: a restarted daemon must be found where its agents knew it
    workspace.configure(workers={"pool": "local", "count": 0},
                        agents={"listen": f"127.0.0.1:{free_port()}", "token_file": str(group.token),
                                "lease_seconds": 3})
    yield group
    group.stop_all()


def _word(job_id: str) -> str:
    """A word wordcount counts (letters only) that is this job's own."""
    return "x" + "".join(chr(ord("a") + int(d)) for d in job_id[1:])


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def running_on(ws: Workspace, job_id: str) -> str:
    """The worker the job runs on, once it runs."""
    def worker() -> str | None:
        shown = dropq(ws.config, "show", job_id, "--json")
        if shown.returncode != 0:
            return None
        record = json.loads(shown.stdout)
        return str(record["worker"]) if record["status"] == "running" and record.get("worker") else None
    return str(wait_until(worker, timeout=30, what=f"{job_id} to run"))


def test_three_agents_share_two_hundred_jobs_each_committed_once(workspace: Workspace, daemon: DaemonProcess,
                                                                 agents: Agents) -> None:
    daemon.start()
    for name in ("a1", "a2", "a3"):
        agents.start(name, workers=2)
    agents.wait_registered("a1", "a2", "a3")
    ids = [f"j{i:03d}" for i in range(200)]
    # three kinds of job, so that inputs travel to the agents and output folders come back
    for i, job_id in enumerate(ids):
        if i % 3 == 0:
            workspace.drop(f"{job_id}.yaml", {"program": "echo", "args": [job_id]})
        elif i % 3 == 1:
            workspace.put(f"{job_id}.txt", f"{_word(job_id)} {_word(job_id)} b\n")
            workspace.drop(f"{job_id}.yaml", {"program": "wordcount", "input": f"{job_id}.txt"})
        else:
            workspace.drop(f"{job_id}.yaml", {"program": "makefiles", "args": [str(i % 5 + 1)]})
    results = workspace.wait_results(200, timeout=180)
    assert sorted(os.listdir(workspace.outbox)) == ids, "each job committed once, nothing else"
    assert all(r["status"] == "succeeded" and r["attempts"] == 1 for r in results.values()), results
    for i, job_id in enumerate(ids):
        stdout = (workspace.outbox / job_id / "stdout.txt").read_text()
        if i % 3 == 0:
            assert stdout.startswith(job_id)
        elif i % 3 == 1:
            assert stdout == f"2 {_word(job_id)}\n1 b\n"
            assert (workspace.outbox / job_id / "inputs" / f"{job_id}.txt").read_text().startswith(_word(job_id))
        else:
            output = workspace.outbox / job_id / "output"
            count = i % 5 + 1
            assert sorted(p.name for p in output.iterdir()) == sorted([*(f"part-{n}.txt" for n in range(1, count + 1)),
                                                                      "summary"])
            assert (output / f"part-{count}.txt").read_text() == f"this is part {count} of {count}\n"
    by_agent = {name: sum(1 for r in results.values() if r["worker"].startswith(f"{name}-w"))
                for name in ("a1", "a2", "a3")}
    assert all(count > 0 for count in by_agent.values()), by_agent
    assert sum(by_agent.values()) == 200
    # `dropq workers` groups the workers by agent
    listed = dropq_json(workspace.config, "workers")
    assert {w["agent"] for w in listed} == {"a1", "a2", "a3"}, listed
    assert {w["agent_state"] for w in listed} == {"connected"}, listed
    assert [w["name"] for w in listed] == [f"a{i}-w{j}" for i in (1, 2, 3) for j in (1, 2)]


def test_an_agent_killed_mid_job_loses_its_lease_and_the_job_runs_on_another(
        workspace: Workspace, daemon: DaemonProcess, agents: Agents) -> None:
    daemon.start()
    agents.start("a1")
    agents.start("a2")
    agents.wait_registered("a1", "a2")
    workspace.drop("victim.yaml", {"program": "sleep", "args": ["2"], "retries": 2})
    worker = running_on(workspace, "victim")
    victim, other = ("a1", "a2") if worker.startswith("a1-") else ("a2", "a1")
    agents.procs[victim].kill()
    agents.procs[victim].wait(10)
    result = workspace.wait_results(1, timeout=60)["victim"]
    assert result["status"] == "succeeded"
    assert result["attempts"] == 2
    assert result["worker"].startswith(f"{other}-w"), result
    assert f"worker lost (agent {victim} did not renew its lease" in daemon.log_text()
    # the killed agent comes back: it stops what its orphaned worker still ran, and serves again
    agents.start(victim)
    wait_until(lambda: agents.log(victim).count("registered") >= 2, timeout=30, what="the agent to come back")
    workspace.drop("after.yaml", {"program": "echo", "args": ["after"]})
    assert workspace.wait_results(2, timeout=30)["after"]["status"] == "succeeded"
    assert sorted(os.listdir(workspace.outbox)) == ["after", "victim"]


#: a job that says it started, waits for its gate file to appear, and says it ended (files beside the gate):
#: the test decides when it ends, whatever the machine's load, and sees it whether forked or started fresh
GATE = ("import os, sys, time\n"
        "open(sys.argv[1] + '.started', 'w').close()\n"
        "while not os.path.exists(sys.argv[1]):\n    time.sleep(0.02)\n"
        "open(sys.argv[1] + '.ended', 'w').close()\n")


def test_a_daemon_restart_collects_the_jobs_agents_run_without_running_them_again(
        workspace: Workspace, daemon: DaemonProcess, agents: Agents) -> None:
    workspace.configure(agents={"lease_seconds": 6})
    (workspace.programs / "gate.py").write_text(GATE)
    daemon.start()
    agents.start("a1", workers=2)
    agents.start("a2")
    agents.wait_registered("a1", "a2")
    gates = {job_id: workspace.root / f"{job_id}.gate" for job_id in ("long0", "long1", "quick")}
    # two run on through the restart; the third ends while the daemon is down, and its agent keeps its result
    for job_id, gate in gates.items():
        workspace.drop(f"{job_id}.yaml", {"program": "gate", "args": [str(gate)]})
    for job_id, gate in gates.items():
        started = Path(f"{gate}.started")
        wait_until(started.exists, timeout=30, what=f"{job_id} to run")
    stopped_at = time.time()
    assert daemon.stop() == 0
    gates["quick"].touch()
    wait_until(lambda: os.path.exists(f"{gates['quick']}.ended"), timeout=30, what="the quick job to end")
    daemon.start()
    gates["long0"].touch()
    gates["long1"].touch()
    results = workspace.wait_results(3, timeout=60)
    assert sorted(os.listdir(workspace.outbox)) == ["long0", "long1", "quick"]
    for job_id, result in results.items():
        assert result["status"] == "succeeded", result
        assert result["attempts"] == 1, result
        # the very run that began before the restart: a job run again would have started after it
        started = yaml.safe_load(f"t: {result['started_at']}")["t"].timestamp()
        assert started < stopped_at, (job_id, result["started_at"], stopped_at)
    assert "running job(s) taken back" in agents.log("a1") + agents.log("a2")


def test_a_job_running_on_an_agent_is_cancelled_there(workspace: Workspace, daemon: DaemonProcess,
                                                     agents: Agents) -> None:
    daemon.start()
    agents.start("a1")
    agents.wait_registered("a1")
    workspace.drop("long.yaml", {"program": "sleep", "args": ["60"]})
    running_on(workspace, "long")
    assert dropq(workspace.config, "cancel", "long").returncode == 0
    result = workspace.wait_results(1, timeout=30)["long"]
    assert result["status"] == "cancelled" and result["duration_seconds"] < 20, result
    workspace.drop("next.yaml", {"program": "echo", "args": ["next"]})
    assert workspace.wait_results(2, timeout=30)["next"]["status"] == "succeeded"


def test_an_agent_cut_off_past_its_lease_commits_no_second_result(workspace: Workspace, daemon: DaemonProcess,
                                                                 agents: Agents) -> None:
    workspace.configure(agents={"lease_seconds": 2})
    daemon.start()
    agents.start("a1")
    agents.start("a2")
    agents.wait_registered("a1", "a2")
    workspace.drop("cut.yaml", {"program": "sleep", "args": ["1.5"], "retries": 2})
    worker = running_on(workspace, "cut")
    victim, other = ("a1", "a2") if worker.startswith("a1-") else ("a2", "a1")
    agents.procs[victim].send_signal(signal.SIGSTOP)
    try:
        result = workspace.wait_results(1, timeout=60)["cut"]
        assert result["attempts"] == 2 and result["worker"].startswith(f"{other}-w"), result
    finally:
        agents.procs[victim].send_signal(signal.SIGCONT)
    wait_until(lambda: "result dropped" in agents.log(victim) or "result refused" in agents.log(victim),
               timeout=30, what="the cut-off agent to drop its result")
    assert os.listdir(workspace.outbox) == ["cut"]
    assert workspace.result("cut") == result, "the result committed first stands"
    assert wait_for_status(workspace.config, "cut", "succeeded") == "succeeded"


def test_a_wrong_token_is_refused_and_learns_nothing(workspace: Workspace, daemon: DaemonProcess,
                                                    agents: Agents) -> None:
    daemon.start()
    url = agents.url()
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Bearer {TOKEN}x"},
                    {"Authorization": TOKEN}):
        answer = requests.post(f"{url}/v1/register", json={"name": "x", "workers": 1}, headers=headers, timeout=10)
        assert answer.status_code == 401
        assert answer.json() == {"error": "unauthorized"}
    wrong = workspace.root / "wrong.token"
    wrong.write_text("a-wrong-token-of-the-right-length")
    proc = agents.start("intruder", token=wrong)
    assert proc.wait(30) != 0
    assert "refused the token" in agents.log("intruder")
    assert not agents.url().startswith("https")


# --- a hostile agent: the test itself, speaking the API with the right token --------------------------


class Hostile:
    def __init__(self, url: str, name: str = "evil") -> None:
        self.url = url
        self.name = name
        self.auth = {"Authorization": f"Bearer {TOKEN}"}
        self.register([])

    def register(self, running: list[dict[str, str]]) -> list[str]:
        """Register (again), saying which leases it still runs; the keys the daemon took back."""
        answer = requests.post(f"{self.url}/v1/register", headers=self.auth, timeout=10,
                               json={"name": self.name, "host": "h", "workers": 1, "pool": "local",
                                     "protocol": _protocol(), "running": running})
        assert answer.status_code == 200, answer.text
        self.session = answer.json()["session"]
        self.worker = answer.json()["workers"][0]
        return list(answer.json()["accepted"])

    def call(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        headers = {**self.auth, "X-Dropq-Session": self.session, "X-Dropq-Worker": self.worker,
                   **kwargs.pop("headers", {})}
        return requests.request(method, self.url + path, headers=headers, timeout=30, **kwargs)

    def lease(self) -> str:
        def take() -> str | None:
            answer = self.call("POST", "/v1/poll", json={"wait": 1})
            return str(answer.json()["spec"]["key"]) if answer.status_code == 200 else None
        return str(wait_until(take, timeout=30, what="a lease"))


def _protocol() -> int:
    from dropq_worker.protocol import PROTOCOL

    return PROTOCOL


def _tar(members: list[tuple[str, bytes | None, bytes]]) -> bytes:
    """A tar of (name, kind, data): kind None is a regular file, b"sym" a symlink to data, b"dev" a device."""
    import io
    import tarfile

    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, kind, data in members:
            info = tarfile.TarInfo(name)
            if kind == b"sym":
                info.type, info.linkname = tarfile.SYMTYPE, data.decode()
                tar.addfile(info)
            elif kind == b"dev":
                info.type = tarfile.CHRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _put(hostile: Hostile, key: str, body: bytes) -> requests.Response:
    import hashlib

    return hostile.call("PUT", f"/v1/jobs/{key}/result", data=body,
                        headers={"X-Dropq-Sha256": hashlib.sha256(body).hexdigest()})


def test_a_hostile_agent_cannot_write_outside_the_staging_folder_nor_answer_for_another(
        workspace: Workspace, daemon: DaemonProcess, agents: Agents) -> None:
    from helpers import record_attack

    daemon.start()
    evil = Hostile(agents.url())
    workspace.drop("prey.yaml", {"program": "echo", "args": ["x"], "retries": 0})
    key = evil.lease()
    staging = workspace.state / "workers" / evil.worker / "jobs"
    attacks = {
        "dotdot": _tar([("output/../../../../escaped", None, b"x")]),
        "absolute": _tar([(str(workspace.root / "escaped"), None, b"x")]),
        "symlink": _tar([("output/link", b"sym", str(workspace.root).encode())]),
        "device": _tar([("output/dev", b"dev", b"")]),
        "other top": _tar([("elsewhere/x", None, b"x")]),
        "twice": _tar([("stdout", None, b"a"), ("stdout", None, b"b")]),
    }
    contained = 0
    for name, body in attacks.items():
        answer = _put(evil, key, body)
        if answer.status_code == 400 and not list(workspace.root.rglob("escaped")):
            contained += 1
        else:
            print(f"attack {name}: {answer.status_code} {answer.text}")
    # a body whose checksum does not match, and one larger than announced, are refused as well
    good = _tar([("stdout", None, b"hello\n")])
    bad_sum = evil.call("PUT", f"/v1/jobs/{key}/result", data=good, headers={"X-Dropq-Sha256": "0" * 64})
    contained += bad_sum.status_code == 400
    huge = evil.call("POST", "/v1/poll", data=b"{" + b" " * (128 * 1024) + b"}",
                     headers={"Content-Type": "application/json"})
    contained += huge.status_code == 400
    # another agent's lease: it may neither renew it nor answer for it
    thief = Hostile(agents.url(), name="thief")
    report = {"key": key, "state": "done", "outcome": "exited", "exit_code": 0, "started_at": 1.0}
    theft = [thief.call("POST", f"/v1/jobs/{key}/renew"), _put(thief, key, good),
             thief.call("POST", f"/v1/jobs/{key}/done", json={"report": report})]
    contained += all(a.status_code == 409 for a in theft)
    tried = len(attacks) + 3
    assert list(staging.iterdir()) == [], "nothing of the refused tars is left in the slot's staging folder"
    record_attack("hostile agent: result tar and leases", tried, contained)
    assert contained == tried
    # an impostor under the holder's name: the lease stays bound to the holder's session
    impostor = Hostile(agents.url(), name="evil")
    assert impostor.call("POST", f"/v1/jobs/{key}/renew").status_code == 409
    assert impostor.register([{"worker": evil.worker, "key": "j9-9-000000000000"}]) == []
    assert evil.call("POST", f"/v1/jobs/{key}/renew").status_code == 410, "its session was replaced: register again"
    assert evil.register([{"worker": evil.worker, "key": key}]) == [key]
    assert impostor.call("POST", f"/v1/jobs/{key}/renew").status_code == 410
    # the lease itself still works for its holder, and the job is committed once, from it
    assert _put(evil, key, good).status_code == 200
    done = evil.call("POST", f"/v1/jobs/{key}/done", json={"report": {
        "key": key, "state": "done", "outcome": "exited", "exit_code": 0, "started_at": time.time(),
        "finished_at": time.time()}})
    assert done.status_code == 200, done.text
    assert workspace.wait_results(1, timeout=30)["prey"]["status"] == "succeeded"
    assert (workspace.outbox / "prey" / "stdout.txt").read_text() == "hello\n"
    # the lease has ended: a second result is refused
    again = _put(evil, key, good)
    assert again.status_code == 409


def test_a_lease_not_renewed_is_given_to_another_agent(workspace: Workspace, daemon: DaemonProcess,
                                                       agents: Agents) -> None:
    workspace.configure(agents={"lease_seconds": 2})
    daemon.start()
    silent = Hostile(agents.url(), name="silent")
    workspace.drop("orphan.yaml", {"program": "echo", "args": ["y"], "retries": 1})
    key = silent.lease()
    agents.start("a1")
    result = workspace.wait_results(1, timeout=60)["orphan"]
    assert result["status"] == "succeeded" and result["attempts"] == 2 and result["worker"].startswith("a1-")
    # the one that went silent is shown as lost, its worker no longer busy with the job
    def states() -> dict[str, str]:
        return {w["agent"]: w["agent_state"] for w in dropq_json(workspace.config, "workers")}
    wait_until(lambda: states()["silent"] == "lost", timeout=15, what="the silent agent to show as lost")
    listed = dropq_json(workspace.config, "workers")
    assert states() == {"silent": "lost", "a1": "connected"}, listed
    assert {w["name"]: w["job"] for w in listed}["silent-w1"] is None
    assert "agent silent on h: lost" in dropq(workspace.config, "workers").stdout
    assert silent.call("POST", f"/v1/jobs/{key}/renew").status_code == 409


def test_agents_init_makes_a_certificate_the_agent_checks_the_daemon_by(workspace: Workspace, daemon: DaemonProcess,
                                                                        agents: Agents) -> None:
    made = subprocess.run([sys.executable, "-m", "dropq", "agents", "init", "--dir", str(workspace.root / "tls"),
                           "--name", "127.0.0.1"], capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    folder = workspace.root / "tls"
    assert (folder / "agents.token").stat().st_mode & 0o777 == 0o600
    assert (folder / "agents.key").stat().st_mode & 0o777 == 0o600
    assert "tls: {cert:" in made.stdout
    agents.token = folder / "agents.token"
    workspace.configure(agents={"token_file": str(agents.token),
                                "tls": {"cert": str(folder / "agents.crt"), "key": str(folder / "agents.key")}})
    daemon.start()
    assert agents.url().startswith("https://127.0.0.1:")
    # without the certificate to trust, the agent refuses to talk to the daemon
    assert requests.post(f"{agents.url()}/v1/register", timeout=10,
                         verify=str(folder / "agents.crt")).status_code == 401
    with pytest.raises(requests.exceptions.SSLError):
        requests.post(f"{agents.url()}/v1/register", timeout=10)
    log = open(agents.log_path("a1"), "ab")
    proc = subprocess.Popen([sys.executable, "-m", "dropq", "agent", "--server", agents.url(), "--token-file",
                             str(agents.token), "--ca", str(folder / "agents.crt"), "--name", "a1", "--work-dir",
                             str(workspace.root / "a1")], stdout=log, stderr=subprocess.STDOUT)
    log.close()
    agents.procs["a1"] = proc
    workspace.drop("secure.yaml", {"program": "echo", "args": ["over tls"]})
    assert workspace.wait_results(1, timeout=60)["secure"]["status"] == "succeeded"
    assert (workspace.outbox / "secure" / "stdout.txt").read_text().startswith("over tls")


def test_an_agent_back_from_kill_9_stops_what_its_workers_still_ran(workspace: Workspace, daemon: DaemonProcess,
                                                                    agents: Agents) -> None:
    # the job's own pid, from the job: a forked job's command line is its fork server's, not its program's
    (workspace.programs / "pidsleep.py").write_text(
        "import os, sys, time\nopen(sys.argv[1], 'w').write(str(os.getpid()))\ntime.sleep(300)\n")
    pid_file = workspace.root / "orphan.pid"
    daemon.start()
    agents.start("a1")
    agents.wait_registered("a1")
    workspace.drop("orphan.yaml", {"program": "pidsleep", "args": [str(pid_file)], "retries": 0})
    running_on(workspace, "orphan")
    pid = int(wait_until(lambda: pid_file.exists() and pid_file.read_text(), timeout=30, what="the job to run"))
    agents.procs["a1"].kill()
    agents.procs["a1"].wait(10)
    assert _alive(pid), "kill -9 of the agent leaves its worker, and the job, running"
    agents.start("a1")
    wait_until(lambda: "from an earlier agent: stopping it" in agents.log("a1"), timeout=30,
               what="the agent to reconcile")
    wait_until(lambda: not _alive(pid), timeout=30, what="the orphaned job to be stopped")
    result = workspace.wait_results(1, timeout=30)["orphan"]
    assert result["status"] == "failed" and "lost" in result["error"], result


def _alive(pid: int) -> bool:
    """The process runs (a zombie, or a pid gone, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def test_the_daemons_own_workers_and_an_agents_serve_one_queue(workspace: Workspace, daemon: DaemonProcess,
                                                                agents: Agents) -> None:
    workspace.configure(workers={"count": 1})
    daemon.start()
    agents.start("a1")
    agents.wait_registered("a1")
    for i in range(12):
        workspace.drop(f"m{i}.yaml", {"program": "sleep", "args": ["0.3"]})
    results = workspace.wait_results(12, timeout=60)
    assert all(r["status"] == "succeeded" and r["attempts"] == 1 for r in results.values()), results
    assert {r["worker"] for r in results.values()} == {"w1", "a1-w1"}
    listed = dropq_json(workspace.config, "workers")
    assert [(w["name"], w["agent"]) for w in listed] == [("w1", None), ("a1-w1", "a1")]
    metrics = daemon.get("/metrics").text
    assert f'dropq_agent_up{{agent="a1",host="{socket.gethostname()}"}} 1.0' in metrics, metrics
    assert 'dropq_agent_workers{agent="a1"' in metrics and "dropq_agent_last_contact_seconds" in metrics
    shown = daemon.get("/api/workers").json()
    assert [(w["name"], w["agent"], w["agent_state"]) for w in shown["workers"]] == [
        ("w1", None, None), ("a1-w1", "a1", "connected")]


def test_a_program_changed_on_the_daemon_reaches_a_running_agent(workspace: Workspace, daemon: DaemonProcess,
                                                                  agents: Agents) -> None:
    daemon.start()
    agents.start("a1")
    agents.wait_registered("a1")
    workspace.drop("first.yaml", {"program": "echo", "args": ["one"]})
    assert workspace.wait_results(1, timeout=30)["first"]["status"] == "succeeded"
    (workspace.programs / "shout.py").write_text("import sys\nprint(' '.join(sys.argv[1:]).upper())\n")
    workspace.drop("second.yaml", {"program": "shout", "args": ["two"]})
    assert workspace.wait_results(2, timeout=30)["second"]["status"] == "succeeded"
    assert (workspace.outbox / "second" / "stdout.txt").read_text() == "TWO\n"


@pytest.mark.docker
def test_an_agent_runs_jobs_on_its_own_docker_workers(workspace: Workspace, daemon: DaemonProcess, agents: Agents,
                                                       docker_image: str) -> None:
    from helpers import containers_of, remove_containers

    (workspace.root / "d1").mkdir()
    (workspace.root / "d1" / "agent.yaml").write_text(yaml.safe_dump({"workers": {"docker": {"image": docker_image}}}))
    daemon.start()
    try:
        agents.start("d1", workers=2, pool="docker")
        agents.wait_registered("d1")
        assert set(containers_of(workspace.root / "d1" / "state")) == {"w1", "w2"}
        for i in range(4):
            workspace.put(f"t{i}.txt", "a b a\n")
            workspace.drop(f"c{i}.yaml", {"program": "wordcount", "input": f"t{i}.txt"})
        workspace.drop("files.yaml", {"program": "makefiles", "args": ["2"]})
        results = workspace.wait_results(5, timeout=120)
        assert all(r["status"] == "succeeded" and r["worker"].startswith("d1-w") for r in results.values()), results
        assert (workspace.outbox / "c3" / "stdout.txt").read_text() == "2 a\n1 b\n"
        index = workspace.outbox / "files" / "output" / "summary" / "index.txt"
        assert index.read_text() == "part-1.txt\npart-2.txt\n"
        # a program added on the daemon's host reaches the containers, whose programs folder is a bind mount
        (workspace.programs / "shout.py").write_text("import sys\nprint(' '.join(sys.argv[1:]).upper())\n")
        workspace.drop("late.yaml", {"program": "shout", "args": ["late"]})
        assert workspace.wait_results(6, timeout=60)["late"]["status"] == "succeeded"
    finally:
        agents.stop_all()
        remove_containers(workspace.root / "d1" / "state")


def test_an_arrays_tasks_run_on_agents_and_publish_one_folder(workspace: Workspace, daemon: DaemonProcess,
                                                              agents: Agents) -> None:
    # arrays (issue 13) and agents (issue 14) meet: a task is a job to the balancer, so it may run anywhere
    daemon.start()
    for name in ("a1", "a2"):
        agents.start(name, workers=1)
    agents.wait_registered("a1", "a2")
    workspace.drop("arr.yaml", {"program": "echo", "args": ["task {n}"], "matrix": {"n": list(range(12))}})
    result = workspace.wait_results(1, timeout=120)["arr"]
    assert result["counts"] == {"succeeded": 12}, result
    folder = workspace.outbox / "arr" / "tasks"
    workers = []
    for i in range(12):
        assert (folder / str(i) / "stdout.txt").read_text().startswith(f"task {i}\n")
        workers.append(yaml.safe_load((folder / str(i) / "result.yaml").read_text())["worker"])
    assert {w.split("-w")[0] for w in workers} == {"a1", "a2"}, workers
