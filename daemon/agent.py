"""`dropq agent`: run a daemon's jobs on this host's own pool (README: More than one host).

The agent connects out to the daemon's agents API (dropq.pools.agents), registers its N workers and then,
one thread per worker, leases a job by long-poll, fetches its inputs, runs it on its local worker exactly
as the daemon's balancer would, renews the lease while it runs, and sends back the staging folder and the
final report. The daemon commits it; the agent keeps nothing.

Failure rules: a lease the daemon refuses to renew (409) ended: the job runs elsewhere, so it is stopped
here and its result dropped. So is a job whose lease could not be renewed for agents.lease_seconds (the
daemon gave it up by then). A daemon that restarted (410: an unknown session) is registered with again,
listing the jobs still running, which it collects. On start the agent reconciles: whatever a killed agent
left running on its workers is stopped, and their staging folders emptied.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import IO, Any

import requests
import yaml

from dropq.config import Config
from dropq.errors import AgentError, BadArchive, ConfigError, JobRefused, ProtocolMismatch, TransportError
from dropq.ops.access import read_token
from dropq.paths import remove_tree
from dropq.pools.agents import REPORT, SESSION, SHA256, WORKER
from dropq.pools.base import Pool, WorkerHandle
from dropq.pools.tarball import pack, receive, unpack
from dropq_worker.protocol import PROTOCOL, JobSpec, JobState, Outcome, ProtocolError, Report

log = logging.getLogger("dropq.agent")

#: the agent's own settings, optional, in its work folder: the `workers:` and `jobs:` sections of a config.yaml
SETTINGS = "agent.yaml"
#: a report longer than this (a long error) is sent in a request of its own rather than in a header
MAX_REPORT_HEADER = 8192
#: the largest inputs (or programs folder) the agent accepts from its daemon
MAX_DOWNLOAD = 64 * 1024**3


class Unauthorized(AgentError):
    """The daemon refused the token (401): retrying cannot help."""


class SessionGone(AgentError):
    """The daemon does not know this agent's session (410): it restarted; register again."""


class Unreachable(AgentError):
    """The daemon did not answer (down, restarting, network cut)."""


def default_work_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/dropq-agent")
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "dropq-agent"


def agent_config(work_dir: Path, *, pool: str, workers: int) -> Config:
    """The configuration of the agent's own pool: its folders under `work_dir`, and the `workers:` and `jobs:`
    sections of work_dir/agent.yaml when there is one (a docker image, limits)."""
    data: dict[str, Any] = {}
    settings = work_dir / SETTINGS
    if settings.exists():
        loaded = yaml.safe_load(settings.read_text(encoding="utf-8")) or {}
        if not isinstance(loaded, dict) or set(loaded) - {"workers", "jobs", "log_level"}:
            raise ConfigError(f"{settings}: only the keys workers, jobs and log_level belong there")
        data.update(loaded)
    data["workers"] = {**data.get("workers", {}), "pool": pool, "count": workers}
    data.update(inbox="inbox", outbox="outbox", programs="programs", state="state", http={"enabled": False})
    return Config.from_mapping(data, base=work_dir, source=settings)


class Client:
    """The agents API, from the agent's side. Thread-safe: each thread keeps its own connection."""

    def __init__(self, server: str, token: str, *, ca: Path | None) -> None:
        self.server = server.rstrip("/")
        self._auth = {"Authorization": f"Bearer {token}"}
        self.verify: bool | str = str(ca) if ca else True
        self.session = ""
        self._local = threading.local()

    def _http(self) -> requests.Session:
        http: requests.Session | None = getattr(self._local, "http", None)
        if http is None:
            http = self._local.http = requests.Session()
        return http

    def call(self, method: str, path: str, *, worker: str = "", timeout: float = 30.0,
             **kwargs: Any) -> requests.Response:
        headers = {**self._auth, SESSION: self.session, WORKER: worker, **kwargs.pop("headers", {})}
        try:
            answer = self._http().request(method, self.server + path, headers=headers, timeout=timeout,
                                          verify=self.verify, **kwargs)
        except requests.RequestException as exc:
            self._local.http = None
            raise Unreachable(f"the daemon at {self.server} did not answer: {exc}") from None
        if answer.status_code == 401:
            raise Unauthorized(f"the daemon at {self.server} refused the token (401)")
        if answer.status_code == 410:
            raise SessionGone("the daemon does not know this agent's session")
        if answer.status_code >= 500:
            raise Unreachable(f"the daemon at {self.server} failed ({answer.status_code})")
        return answer


@dataclass
class _Lease:
    worker: str
    key: str
    last_ok: float = field(default_factory=time.monotonic)
    dropped: str | None = None
    ended: threading.Event = field(default_factory=threading.Event)


class Agent:
    def __init__(self, *, server: str, token: str, pool: str, workers: int, name: str, work_dir: Path,
                 ca: Path | None) -> None:
        self.name = name
        self.host = socket.gethostname()
        self.work_dir = work_dir
        work_dir.mkdir(parents=True, exist_ok=True)
        (work_dir / "programs").mkdir(exist_ok=True)
        self.config = agent_config(work_dir, pool=pool, workers=workers)
        self.pool_kind = pool
        self.count = workers
        self.client = Client(server, token, ca=ca)
        self.lease = 30.0
        self.remote: list[str] = []
        self._lock = threading.Lock()
        self._generation = 0
        self._leases: dict[str, _Lease] = {}
        self._stop = threading.Event()
        self._programs = ""
        self._programs_lock = threading.Lock()
        self.pool: Pool | None = None
        #: why the agent stopped by itself (a refused token), or None
        self.failure: str | None = None

    # --- life ---------------------------------------------------------------------------------

    def run(self) -> int:
        from dropq.ops.service import host_pool

        pool = self.pool = host_pool(self.config)
        pool.start()
        try:
            self._reconcile(pool)
            self.register(0)
            threads = [threading.Thread(target=self._serve, args=(handle, i), name=f"agent-{handle.name}", daemon=True)
                       for i, handle in enumerate(pool.workers())]
            for thread in threads:
                thread.start()
            log.info("agent %s: serving %s with %d %s worker(s)", self.name, self.client.server, self.count,
                     self.pool_kind)
            self._stop.wait()
        finally:
            self._cancel_running(pool)
            pool.stop()
        if self.failure:
            raise AgentError(self.failure)
        return 0

    def stop(self) -> None:
        self._stop.set()

    def _cancel_running(self, pool: Pool) -> None:
        """Stopping: whatever the workers still run is cancelled. Its lease runs out and the daemon retries it
        elsewhere; a docker worker left running for the next agent (on_shutdown: leave) would otherwise finish
        it for nothing, its result dropped."""
        for handle in pool.workers():
            try:
                busy = handle.transport.health(timeout=self.config.workers.health_timeout).job
                if busy:
                    log.info("worker %s: stopping job %s, this agent is stopping", handle.name, busy)
                    handle.transport.cancel(busy)
            except (TransportError, ProtocolMismatch) as exc:
                log.warning("worker %s: could not stop what it runs: %s", handle.name, exc)

    def _reconcile(self, pool: Pool) -> None:
        """A killed agent left its workers (which live on in their own session) and their files: whatever a
        worker still runs is stopped (the daemon has given that job up, or will), the folders emptied."""
        for handle in pool.workers():
            try:
                busy = handle.transport.health(timeout=self.config.workers.health_timeout).job
            except (TransportError, ProtocolMismatch) as exc:
                log.warning("worker %s: %s; replacing it", handle.name, exc)
                busy = "?"
            if busy:
                log.info("worker %s still ran job %s from an earlier agent: stopping it", handle.name, busy)
                pool.replace(handle.name)
            for folder in (handle.jobs_dir, handle.inputs_dir):
                for entry in os.scandir(folder):
                    if entry.is_dir(follow_symlinks=False):
                        remove_tree(Path(entry.path))
                    else:
                        os.unlink(entry.path)

    def register(self, seen: int) -> None:
        """(Re)register with the daemon, listing the jobs running here; retried until it answers. `seen`: the
        generation the caller knew, so that threads that all found the session gone register once."""
        with self._lock:
            if self._generation != seen:
                return
            delay = 0.2
            while not self._stop.is_set():
                running = [{"worker": lease.worker, "key": lease.key} for lease in self._leases.values()]
                body = {"name": self.name, "host": self.host, "workers": self.count, "pool": self.pool_kind,
                        "protocol": PROTOCOL, "running": running}
                try:
                    answer = self.client.call("POST", "/v1/register", json=body, timeout=10)
                except (Unreachable, SessionGone) as exc:
                    log.warning("agent %s: cannot register yet: %s", self.name, exc)
                    self._stop.wait(delay)
                    delay = min(delay * 2, 5.0)
                    continue
                if answer.status_code != 200:
                    raise AgentError(f"the daemon refused this agent: {_error(answer)}")
                reply = answer.json()
                self.client.session = str(reply["session"])
                self.lease = float(reply["lease_seconds"])
                self.remote = [str(w) for w in reply["workers"]]
                accepted = set(reply.get("accepted", []))
                now = time.monotonic()
                for lease in self._leases.values():
                    if lease.key in accepted:
                        lease.last_ok = now
                    else:
                        self._drop(lease, "the daemon did not take it back when the agent registered again")
                self._generation += 1
                log.info("agent %s: registered (lease %gs)%s", self.name, self.lease,
                         f"; {len(accepted)} running job(s) taken back" if accepted else "")
                return

    # --- one worker ------------------------------------------------------------------------------

    def _serve(self, handle: WorkerHandle, index: int) -> None:
        delay = 0.2
        while not self._stop.is_set():
            remote = self.remote[index]
            generation = self._generation
            try:
                answer = self.client.call("POST", "/v1/poll", worker=remote,
                                          json={"wait": max(0.5, min(20.0, self.lease / 2))},
                                          timeout=self.lease + 10)
            except SessionGone:
                self.register(generation)
                continue
            except Unreachable as exc:
                log.warning("worker %s: %s", remote, exc)
                self._stop.wait(delay)
                delay = min(delay * 2, 5.0)
                continue
            except Unauthorized as exc:
                self.failure = str(exc)
                self.stop()
                return
            delay = 0.2
            if answer.status_code == 204:
                continue
            if answer.status_code != 200:
                log.warning("worker %s: the daemon answered %d: %s", remote, answer.status_code, _error(answer))
                self._stop.wait(1.0)
                continue
            try:
                spec = JobSpec.from_json(answer.json()["spec"])
            except (ProtocolError, KeyError, ValueError) as exc:
                log.error("worker %s: a malformed job from the daemon: %s", remote, exc)
                continue
            self._programs_current(answer.json().get("programs"))
            try:
                self._run(handle, remote, spec)
            except Unauthorized as exc:
                self.failure = str(exc)
                self.stop()
                return
            except Exception:
                log.exception("worker %s: job %s failed on this agent", remote, spec.key)

    def _run(self, handle: WorkerHandle, remote: str, spec: JobSpec) -> None:
        key = spec.key
        lease = _Lease(worker=remote, key=key)
        with self._lock:
            self._leases[remote] = lease
        renewer = threading.Thread(target=self._renew, args=(handle, lease), name=f"renew-{remote}", daemon=True)
        renewer.start()
        try:
            report = self._execute(handle, lease, spec)
            lease.ended.set()
            renewer.join()
            if lease.dropped is None and time.monotonic() - lease.last_ok > self.lease:
                self._drop(lease, f"no contact with the daemon for more than {self.lease:g}s")
            if lease.dropped is not None:
                log.warning("job %s: result dropped: %s", key, lease.dropped)
                return
            self._send(handle, lease, report)
        finally:
            lease.ended.set()
            with self._lock:
                self._leases.pop(remote, None)
            handle.staging(key).remove()
            remove_tree(handle.inputs_dir / key)
            handle.transport.forget(key)

    def _execute(self, handle: WorkerHandle, lease: _Lease, spec: JobSpec) -> Report:
        """Run the job on the local worker, as the daemon's balancer does; its final report."""
        assert self.pool is not None
        started = time.time()
        try:
            if spec.inputs:
                self._fetch_inputs(handle, lease)
            rlimit = self.pool.apply_limits(handle.name, memory=spec.memory, cpus=None)
            spec = replace(spec, memory_rlimit=rlimit)
            report = handle.transport.start(spec, wait=5.0)
            while not report.done:
                report = handle.transport.status(spec.key, wait=5.0)
        except JobRefused as exc:
            # the worker read the job and said no (a program missing here): running it again here would not help
            log.warning("job %s: the local worker %s refused it: %s", spec.key, handle.name, exc)
            return Report(key=spec.key, state=JobState.RUNNING, started_at=started).ended(
                Outcome.ERROR, finished_at=time.time(), error=f"the agent {self.name} could not run it: {exc}")
        except (TransportError, ProtocolMismatch) as exc:
            # the local worker died or refused: not the job's fault, the daemon retries it
            log.warning("job %s: the local worker %s failed: %s", spec.key, handle.name, exc)
            return Report(key=spec.key, state=JobState.RUNNING, started_at=started).ended(
                Outcome.STOPPED, finished_at=time.time(), error=str(exc))
        except BadArchive as exc:
            return Report(key=spec.key, state=JobState.RUNNING, started_at=started).ended(
                Outcome.ERROR, finished_at=time.time(), error=f"its inputs could not be fetched: {exc}")
        finally:
            if spec.memory is not None:
                self.pool.lift_limits(handle.name)
        return report

    def _renew(self, handle: WorkerHandle, lease: _Lease) -> None:
        while not lease.ended.wait(self.lease / 3):
            generation = self._generation
            try:
                answer = self.client.call("POST", f"/v1/jobs/{lease.key}/renew", worker=lease.worker,
                                          timeout=self.lease)
            except SessionGone:
                self.register(generation)
                continue
            except (Unreachable, Unauthorized) as exc:
                if time.monotonic() - lease.last_ok > self.lease:
                    self._drop(lease, f"no contact with the daemon for more than {self.lease:g}s ({exc})")
                    return
                continue
            if answer.status_code == 409:
                self._drop(lease, "the daemon ended its lease (it runs elsewhere)")
                return
            if answer.status_code == 200:
                lease.last_ok = time.monotonic()
                if answer.json().get("cancel"):
                    try:
                        handle.transport.cancel(lease.key)
                    except TransportError as exc:
                        log.warning("job %s: could not cancel it: %s", lease.key, exc)

    def _drop(self, lease: _Lease, why: str) -> None:
        """Stop the job of a lease that has ended; its result is not sent."""
        if lease.dropped is not None:
            return
        lease.dropped = why
        log.warning("job %s: stopping it: %s", lease.key, why)
        assert self.pool is not None
        handle = next(h for h, r in zip(self.pool.workers(), self.remote, strict=False) if r == lease.worker)
        try:
            handle.transport.cancel(lease.key)
        except TransportError:
            pass  # not started yet, or ended: nothing runs to stop

    def _fetch_inputs(self, handle: WorkerHandle, lease: _Lease) -> None:
        answer = self.client.call("GET", f"/v1/jobs/{lease.key}/inputs", worker=lease.worker, stream=True,
                                  timeout=self.lease)
        if answer.status_code != 200:
            raise BadArchive(f"the daemon answered {answer.status_code}: {_error(answer)}")
        length = int(answer.headers.get("Content-Length", "-1"))
        with receive(answer.raw, length=length if length >= 0 else None, sha256=answer.headers.get(SHA256),
                     limit=MAX_DOWNLOAD) as body:
            target = handle.inputs_dir / lease.key
            remove_tree(target)
            target.mkdir(parents=True)
            unpack(body, target, limit=MAX_DOWNLOAD)

    def _send(self, handle: WorkerHandle, lease: _Lease, report: Report) -> None:
        """The staging folder, then the report; a 409 means the lease ended meanwhile (dropped)."""
        staging = handle.staging(lease.key)
        with tempfile.TemporaryFile() as spool:
            digest, left_out = pack([("output", staging.output), ("stdout", staging.stdout),
                                     ("stderr", staging.stderr)], spool)
            if left_out:
                log.warning("job %s: left out of its result, not regular files: %s", lease.key, ", ".join(left_out))
            size = spool.tell()
            headers = {SHA256: digest, "Content-Length": str(size)}
            said = json.dumps(report.to_json())
            if len(said) <= MAX_REPORT_HEADER:  # one request for both (a long error goes on its own)
                headers[REPORT] = said
            answer = self._put_result(lease, spool, headers)
            if answer is None:
                return
        if answer.status_code == 409:
            log.warning("job %s: result refused: %s", lease.key, _error(answer))
            return
        if answer.status_code != 200:
            raise AgentError(f"job {lease.key}: the daemon refused its files ({answer.status_code}): {_error(answer)}")
        if REPORT in headers:
            return
        answer = self.client.call("POST", f"/v1/jobs/{lease.key}/done", worker=lease.worker,
                                  json={"report": report.to_json()}, timeout=30)
        if answer.status_code != 200:
            log.warning("job %s: report refused (%d): %s", lease.key, answer.status_code, _error(answer))

    def _put_result(self, lease: _Lease, spool: IO[bytes], headers: dict[str, str]) -> requests.Response | None:
        """PUT the result's tar, tried again while the lease may still hold (a daemon restarting meanwhile
        collects it when it is back); None when it is dropped."""
        while True:
            spool.seek(0)
            generation = self._generation
            try:
                return self.client.call("PUT", f"/v1/jobs/{lease.key}/result", worker=lease.worker,
                                        data=spool, timeout=max(60.0, self.lease), headers=headers)
            except SessionGone:
                self.register(generation)  # lists this job: it is still in self._leases
                if lease.dropped is not None:
                    log.warning("job %s: result dropped: %s", lease.key, lease.dropped)
                    return None
            except Unreachable as exc:
                if time.monotonic() - lease.last_ok > self.lease:
                    log.warning("job %s: result dropped: no contact with the daemon for more than %gs (%s)",
                                lease.key, self.lease, exc)
                    return None
                if self._stop.wait(0.5):
                    return None

    def _programs_current(self, digest: Any) -> None:
        """Fetch the daemon's programs folder when it changed (the poll's answer names its digest)."""
        if not isinstance(digest, str) or digest == self._programs:
            return
        with self._programs_lock:
            if digest == self._programs:
                return
            answer = self.client.call("GET", "/v1/programs", stream=True, timeout=60)
            if answer.status_code != 200:
                log.warning("could not fetch the programs (%d): %s", answer.status_code, _error(answer))
                return
            length = int(answer.headers.get("Content-Length", "-1"))
            fresh = Path(tempfile.mkdtemp(prefix=".programs-", dir=self.work_dir))
            try:
                with receive(answer.raw, length=length if length >= 0 else None, sha256=answer.headers.get(SHA256),
                             limit=MAX_DOWNLOAD) as body:
                    unpack(body, fresh, limit=MAX_DOWNLOAD)
                _replace_contents(self.work_dir / "programs", fresh)
            except BaseException:
                shutil.rmtree(fresh, ignore_errors=True)
                raise
            self._programs = answer.headers.get("X-Dropq-Programs", digest)
            log.info("programs updated from the daemon")


def _replace_contents(folder: Path, fresh: Path) -> None:
    """Make `folder` hold what `fresh` holds, entry by entry, keeping the folder itself: a docker worker has it
    bind-mounted, and a mount holds the folder it was made on, not its path (a folder renamed into its place
    would never be seen). Each entry is renamed in whole, so a program is never seen half-written."""
    wanted = {e.name for e in os.scandir(fresh)}
    stamp = f"{os.getpid()}-{time.monotonic_ns()}"
    for entry in os.scandir(folder):
        if entry.name not in wanted and not entry.name.startswith(".dropq-"):
            _remove(Path(entry.path))
    for name in wanted:
        target = folder / name
        if os.path.lexists(target):
            aside = folder / f".dropq-old-{stamp}-{name}"
            os.rename(target, aside)
            os.rename(fresh / name, target)
            _remove(aside)
        else:
            os.rename(fresh / name, target)
    shutil.rmtree(fresh, ignore_errors=True)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _error(answer: requests.Response) -> str:
    try:
        body = answer.json()
    except ValueError:
        return answer.text[:200]
    return str(body.get("error")) if isinstance(body, dict) else str(body)[:200]


def run(args: Any) -> int:
    """The `dropq agent` command."""
    logging.basicConfig(level=logging.INFO, format="dropq agent: %(levelname)s %(name)s: %(message)s")
    token = read_token(Path(args.token_file), key="--token-file")
    name = (args.name or socket.gethostname()).lower()
    agent = Agent(server=args.server, token=token, pool=args.pool, workers=args.workers, name=name,
                  work_dir=Path(args.work_dir or default_work_dir()).resolve(),
                  ca=Path(args.ca) if args.ca else None)

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s; stopping", signal.Signals(signum).name)
        agent.stop()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    return agent.run()
