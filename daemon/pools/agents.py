"""Agents: workers on other hosts, as slots of this daemon's pool (README: More than one host).

The balancer stays the one scheduler. An agent (`dropq agent`, dropq.agent) registers with N workers;
each becomes a slot here whose transport is a mailbox, not a socket: `start(spec)` offers the job, the
agent leases it by long-poll, fetches the inputs (a tar with its sha256), runs it on its own pool, renews
the lease while it runs, sends the finished staging folder back (a tar, checked and unpacked into this
slot's local staging folder) and then its report. The balancer's own `_follow` and `_commit` do the rest,
as for a local worker. A lease not renewed within agents.lease_seconds makes `status()` raise UnknownJob:
the balancer's lost-worker path retries the job elsewhere. Whatever comes for a lease that has ended is
refused (409), so a late or duplicate result is never committed.

Agents pull over one HTTP(S) port: they connect out, so an agent needs no open port, and the daemon
stays the only host that must be reachable.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import re
import secrets
import shutil
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server
from werkzeug.wrappers import Request, Response

from dropq.config import Config
from dropq.errors import BadArchive, ConfigError, PoolError, TransportError, UnknownJob
from dropq.ops.access import read_token, token_readable_by_others
from dropq.pools.base import Incarnation, Pool, WorkerHandle, make_folders
from dropq.pools.tarball import pack, programs_digest, receive, unpack
from dropq.pools.transport import Transport
from dropq.queue.jobs import JobStatus
from dropq.queue.store import JobRecord, Store
from dropq_worker.protocol import (
    PROTOCOL,
    Health,
    JobSpec,
    JobState,
    Outcome,
    ProtocolError,
    Report,
    Staging,
    WorkerState,
    check_key,
)

log = logging.getLogger("dropq.agents")

#: an agent's name: one path part, and a prefix of its workers' names (<agent>-w1 ...)
AGENT_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")
#: the largest JSON body the agents API reads (a register lists at most 256 running jobs)
MAX_JSON = 64 * 1024
#: how long one long-poll for a job may wait, at most (a fraction of the lease: a waiting agent is in contact)
POLL_MAX = 20.0
SESSION = "X-Dropq-Session"
WORKER = "X-Dropq-Worker"
SHA256 = "X-Dropq-Sha256"
#: the job's final report, sent along with its files (PUT .../result) when it is small enough for a header
REPORT = "X-Dropq-Report"
#: the three pieces of a job's staging folder, as named in the result's tar
RESULT_TOPS = frozenset({"output", "stdout", "stderr"})


def worker_names(agent: str, count: int) -> list[str]:
    return [f"{agent}-w{i + 1}" for i in range(count)]


@dataclass
class _Agent:
    name: str
    host: str
    pool: str
    workers: list[str]
    session: str | None = None
    #: monotonic time of the last request (None: not heard from since this daemon started)
    contact: float | None = None
    #: the wall-clock time last written to the store (written at most once a second)
    written: float = 0.0


@dataclass
class _Slot:
    name: str
    agent: str
    handle: WorkerHandle
    #: the job attempt this slot holds (offered, leased or done), or None
    key: str | None = None
    offer: JobSpec | None = None
    offered_at: float = 0.0
    leased: bool = False
    #: monotonic time the lease ends unless renewed
    expires: float = 0.0
    started_at: float = 0.0
    report: Report | None = None
    cancel: bool = False
    #: a job that was running here when this daemon started: the balancer follows it, and the agent has until
    #: the grace ends to say it still runs it
    reattach: bool = False
    uploads: int = field(default=0)
    #: the session of the agent that holds the lease: another process registered under the agent's name (a
    #: copy started by mistake, or a hostile one) cannot renew it or answer for it
    session: str | None = None

    def clear(self) -> None:
        self.key, self.offer, self.leased, self.report, self.cancel = None, None, False, None, False


class AgentPool(Pool):
    kind = "agents"
    #: a job on an agent goes on while this daemon restarts: the agent reports it when it registers again
    keeps_jobs_running = True

    def __init__(self, config: Config, *, store: Store, key_of: Callable[[JobRecord], str]) -> None:
        super().__init__()
        assert config.agents is not None
        self.config = config
        self.settings = config.agents
        self.lease = float(config.agents.lease_seconds)
        self.store = store
        self._key_of = key_of
        self._token = read_token(config.agents.token_file, key="agents.token_file")
        if token_readable_by_others(config.agents.token_file):
            log.warning("agents.token_file %s can be read by every user of this host (chmod 600 it)",
                        config.agents.token_file)
        self._cond = threading.Condition()
        self._agents: dict[str, _Agent] = {}
        self._slots: dict[str, _Slot] = {}
        self._sessions: dict[str, str] = {}
        self._grace_until = 0.0
        self._digest, self._digest_at = "", 0.0
        self._digest_of: tuple[int, int] = (0, 0)
        self._server: BaseWSGIServer | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    # --- the pool, as the balancer sees it ------------------------------------------------------

    def start(self) -> None:
        for row in self.store.agents():
            self._add_agent(_Agent(name=row["name"], host=row["host"], pool=row["pool"],
                                   workers=worker_names(row["name"], row["workers"])))
        running = {j.worker for j in self.store.with_status(JobStatus.RUNNING) if j.worker in self._slots}
        for name in running:
            self._slots[name].reattach = True
        self._grace_until = time.monotonic() + self.lease
        if running:
            log.info("%d job(s) ran on agents when the daemon stopped; their agents have %gs to report them",
                     len(running), self.lease)
        self._serve()

    def _serve(self) -> None:
        context = None
        if self.settings.tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            try:
                context.load_cert_chain(self.settings.tls.cert, self.settings.tls.key)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"agents.tls: cannot load {self.settings.tls.cert}: {exc}") from None
        try:
            self._server = make_server(self.settings.host, self.settings.port, self._app, threaded=True,
                                       request_handler=_QuietHandler, ssl_context=context)
        except OSError as exc:
            raise ConfigError(f"cannot serve the agents API on {self.settings.listen}: {exc.strerror or exc}") from None
        # threaded=True made a ThreadingMixIn server: its request threads must not keep the daemon from exiting
        self._server.daemon_threads = True  # type: ignore[attr-defined]
        host, port = self._server.socket.getsockname()[:2]
        scheme = "https" if context is not None else "http"
        self.url = f"{scheme}://{'[' + host + ']' if ':' in host else host}:{port}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="agents-api", daemon=True)
        self._thread.start()
        self.store.set_meta("agents", self.url)
        self.store.set_meta("agents_lease", f"{self.lease:g}")
        log.info("agents API on %s (lease %gs)", self.url, self.lease)

    def stop(self) -> None:
        self._stopping.set()
        with self._cond:
            self._cond.notify_all()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.store.set_meta("agents", "")

    def workers(self) -> list[WorkerHandle]:
        with self._cond:
            return [self._slots[n].handle for a in sorted(self._agents) for n in self._agents[a].workers]

    def _connected(self, agent: _Agent, now: float) -> bool:
        return agent.session is not None and agent.contact is not None and now - agent.contact <= self.lease

    def ensure(self, name: str, *, timeout: float | None = None) -> Incarnation | None:
        """The slot once its agent is in contact (or, just after a start, while its agent may still report the
        job the slot ran); blocks while the agent is away: its slot takes no job then."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._stopping.is_set():
                slot = self._slots.get(name)
                if slot is None:
                    return None
                now = time.monotonic()
                agent = self._agents[slot.agent]
                if self._connected(agent, now) or (slot.reattach and now < self._grace_until):
                    health = Health(pid=0, protocol=PROTOCOL, name=name, version=f"agent {agent.name}")
                    # one incarnation for the slot's whole life: a lost agent shows as a lost lease (UnknownJob)
                    return Incarnation(health=health, id=f"agent:{agent.name}")
                if deadline is not None and now >= deadline:
                    return None
                self._cond.wait(1.0 if deadline is None else max(0.01, min(1.0, deadline - now)))
        return None

    def keeps_running(self, name: str) -> bool:
        """A leased job runs on while the daemon restarts (its agent reports it); one only offered has not
        started anywhere, and is queued again at once."""
        with self._cond:
            slot = self._slots.get(name)
            return slot is not None and slot.leased

    def detail(self, name: str, health: Incarnation) -> str:
        with self._cond:
            slot = self._slots.get(name)
            agent = self._agents.get(slot.agent) if slot else None
            return f"agent {agent.name} on {agent.host}" if agent else "agent"

    def describe(self) -> str:
        with self._cond:
            return f"agents ({len(self._agents)} known, {sum(len(a.workers) for a in self._agents.values())} workers)"

    # --- the mailbox: what the balancer's Transport calls become --------------------------------

    def offer(self, name: str, spec: JobSpec, wait: float) -> Report:
        with self._cond:
            slot = self._slots[name]
            slot.clear()
            slot.key, slot.offer = spec.key, spec
            slot.offered_at, slot.started_at = time.monotonic(), time.time()
            self._cond.notify_all()
            # not waited for here: the balancer takes any error of start() for a failed request and asks the pool
            # whether the worker is still there, which for a lost agent would wait for it to come back. Its
            # long-poll of status() follows, and a lease that ends there is a lost worker, as it should be.
            return Report(key=spec.key, state=JobState.RUNNING, started_at=slot.started_at)

    def status(self, name: str, key: str, wait: float) -> Report:
        deadline = time.monotonic() + wait
        with self._cond:
            slot = self._slots[name]
            while True:
                if self._stopping.is_set():
                    raise TransportError(f"the agents API of worker {name} is shutting down")
                now = time.monotonic()
                wake = deadline
                if slot.key == key:
                    if slot.report is not None and slot.report.done:
                        return slot.report
                    if slot.leased and now > slot.expires:
                        slot.clear()
                        # the slot now waits for its agent in ensure(): not busy with the job any more
                        self.store.set_worker(name, WorkerState.IDLE, detail=f"agent {slot.agent} lost its lease")
                        raise UnknownJob(f"agent {slot.agent} did not renew its lease within {self.lease:g}s")
                    if not slot.leased and now > slot.offered_at + self.lease:
                        slot.clear()
                        raise UnknownJob(f"agent {slot.agent} did not take the job within {self.lease:g}s")
                    wake = min(deadline, slot.expires if slot.leased else slot.offered_at + self.lease)
                elif slot.reattach and now < self._grace_until:
                    wake = min(deadline, self._grace_until)
                else:
                    slot.reattach = False
                    raise UnknownJob(f"agent {slot.agent} does not run job {key} (it did not report it in time)")
                if now >= deadline:
                    return Report(key=key, state=JobState.RUNNING, started_at=slot.started_at)
                self._cond.wait(max(0.005, wake - now + 0.005))

    def cancel(self, name: str, key: str) -> None:
        with self._cond:
            slot = self._slots[name]
            if slot.key != key:
                raise UnknownJob(f"agent worker {name} does not know job {key}")
            if slot.leased:
                slot.cancel = True  # the agent learns it at its next renewal
            elif slot.report is None:
                now = time.time()
                slot.offer = None
                slot.report = Report(key=key, state=JobState.RUNNING, started_at=now).ended(
                    Outcome.CANCELLED, finished_at=now)
            self._cond.notify_all()

    def forget(self, name: str, key: str) -> None:
        with self._cond:
            slot = self._slots[name]
            if slot.key == key and not slot.leased:
                slot.clear()

    # --- agents ---------------------------------------------------------------------------------

    def _add_agent(self, agent: _Agent) -> None:
        """(under self._cond, or before any thread) Its slots, made where missing."""
        self._agents[agent.name] = agent
        for name in agent.workers:
            if name not in self._slots:
                folder = self.config.workers_dir / name
                handle = WorkerHandle(name=name, transport=Mailbox(self, name), jobs_dir=folder / "jobs",
                                      inputs_dir=folder / "inputs")
                make_folders(name, handle.jobs_dir, handle.inputs_dir)
                self._slots[name] = _Slot(name=name, agent=agent.name, handle=handle)

    def _register(self, body: dict[str, Any], peer: str) -> tuple[int, dict[str, Any]]:
        name, host = body.get("name"), body.get("host")
        count, pool, running = body.get("workers"), body.get("pool", "local"), body.get("running", [])
        if not isinstance(name, str) or not AGENT_NAME.fullmatch(name):
            return 400, {"error": "name: lower-case letters, digits, '.', '_' and '-', at most 63"}
        if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= 256:
            return 400, {"error": "workers: a whole number from 1 to 256"}
        if not isinstance(host, str) or not isinstance(pool, str) or len(host) > 255 or len(pool) > 32:
            return 400, {"error": "host and pool: short strings"}
        if body.get("protocol") != PROTOCOL:
            return 409, {"error": f"this daemon speaks protocol {PROTOCOL}, the agent {body.get('protocol')}: "
                                  "run the same dropq version on both"}
        if not isinstance(running, list) or len(running) > 256:
            return 400, {"error": "running: a list of at most 256 jobs"}
        accepted: list[str] = []
        with self._cond:
            old = self._agents.get(name)
            if old is not None and old.session is not None:
                self._sessions.pop(old.session, None)
            agent = _Agent(name=name, host=host, pool=pool, workers=worker_names(name, count),
                           session=secrets.token_urlsafe(24), contact=time.monotonic())
            self._add_agent(agent)
            assert agent.session is not None
            self._sessions[agent.session] = name
            for item in running:
                if isinstance(item, dict) and self._adopt(agent, item.get("worker"), item.get("key")):
                    accepted.append(str(item["key"]))
            self._cond.notify_all()
        self.store.set_agent(name, host=host, workers=count, pool=pool)
        log.info("agent %s registered from %s (host %s, %d %s worker(s)%s)", name, peer, host, count, pool,
                 f"; collecting {len(accepted)} running job(s)" if accepted else "")
        self._changed()
        return 200, {"session": agent.session, "lease_seconds": self.lease, "workers": agent.workers,
                     "accepted": accepted}

    def _adopt(self, agent: _Agent, worker: Any, key: Any) -> bool:
        """(under self._cond) Whether the agent, registering, still runs the attempt `key` on `worker` that
        this daemon holds for it: the lease goes on (after a restart of the daemon, or a blip)."""
        slot = self._slots.get(worker) if isinstance(worker, str) else None
        if slot is None or slot.agent != agent.name or not isinstance(key, str):
            return False
        if slot.key == key and slot.leased:
            slot.expires = time.monotonic() + self.lease
            slot.session = agent.session
            return True
        if slot.key is not None or not slot.reattach:
            return False
        job = next((j for j in self.store.with_status(JobStatus.RUNNING) if j.worker == worker), None)
        if job is None or self._key_of(job) != key:
            return False
        slot.key, slot.leased, slot.started_at = key, True, time.time()
        slot.expires, slot.session = time.monotonic() + self.lease, agent.session
        slot.reattach = False
        return True

    def _touch(self, agent: _Agent) -> None:
        """(under self._cond) The agent was heard from now."""
        agent.contact = time.monotonic()
        now = time.time()
        if now - agent.written >= 1.0:
            agent.written = now
            self.store.agent_contact(agent.name, now)

    def _poll(self, agent: _Agent, worker: str, wait: float) -> tuple[int, dict[str, Any] | None]:
        deadline = time.monotonic() + min(max(wait, 0.0), POLL_MAX, self.lease / 2)
        with self._cond:
            slot = self._slots.get(worker)
            if slot is None or slot.agent != agent.name or worker not in agent.workers:
                return 404, {"error": "not one of this agent's workers"}
            while not self._stopping.is_set() and agent.session in self._sessions:
                self._touch(agent)
                if slot.offer is not None and not slot.leased:
                    spec, slot.offer = slot.offer, None
                    slot.leased, slot.expires = True, time.monotonic() + self.lease
                    slot.session = agent.session
                    self._cond.notify_all()
                    return 200, {"spec": spec.to_json(), "lease_seconds": self.lease,
                                 "programs": self._programs_digest()}
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            return 204, None

    def _programs_digest(self) -> str:
        """(under self._cond) The programs folder's digest: computed again when a program was added, removed or
        replaced (the folder's mtime changes), else at most once a second (a file edited in place)."""
        now = time.monotonic()
        try:
            info = os.stat(self.config.programs)
            folder = (info.st_ino, info.st_mtime_ns)
        except OSError:
            folder = (0, 0)
        if now - self._digest_at > 1.0 or folder != self._digest_of:
            self._digest, self._digest_at = programs_digest(self.config.programs), now
            self._digest_of = folder
        return self._digest

    def _programs(self) -> Response:
        with self._cond:
            digest = self._programs_digest()
        folder = self.config.programs
        response = _tar_response([(e.name, Path(e.path)) for e in sorted(os.scandir(folder), key=lambda e: e.name)
                                  if not e.name.startswith(".")])
        response.headers["X-Dropq-Programs"] = digest
        return response

    def _leased(self, agent: _Agent, worker: str, key: str) -> _Slot | None:
        """(under self._cond) The slot whose live lease on `key` this agent holds; None when there is none
        (ended, taken back, or another agent's)."""
        slot = self._slots.get(worker)
        if slot is None or slot.agent != agent.name or slot.key != key or not slot.leased:
            return None
        if slot.session != agent.session:
            return None  # leased by an earlier session of this name, which has not registered again with it
        if time.monotonic() > slot.expires:
            return None  # ended, even if the balancer has not looked yet
        return slot

    def _renew(self, agent: _Agent, worker: str, key: str) -> tuple[int, dict[str, Any]]:
        with self._cond:
            self._touch(agent)
            slot = self._leased(agent, worker, key)
            if slot is None:
                return 409, {"error": "the lease has ended: the job was given to another worker"}
            slot.expires = time.monotonic() + self.lease
            return 200, {"cancel": slot.cancel}

    def _inputs(self, agent: _Agent, worker: str, key: str) -> Response:
        with self._cond:
            self._touch(agent)
            slot = self._leased(agent, worker, key)
            if slot is None:
                return _json(409, {"error": "the lease has ended"})
            folder = slot.handle.inputs_dir / key
        return _tar_response([(e.name, Path(e.path)) for e in sorted(os.scandir(folder), key=lambda e: e.name)]
                             if folder.is_dir() else [])

    def _result(self, agent: _Agent, worker: str, key: str, request: Request) -> tuple[int, dict[str, Any]]:
        with self._cond:
            self._touch(agent)
            slot = self._leased(agent, worker, key)
            if slot is None:
                return 409, {"error": "the lease has ended: the result is not wanted"}
            jobs_dir = slot.handle.jobs_dir
        limit = self.settings.max_upload_bytes
        try:
            body = receive(request.stream, length=request.content_length, sha256=request.headers.get(SHA256),
                           limit=limit)
        except BadArchive as exc:
            return 400, {"error": str(exc)}
        landing = Path(tempfile.mkdtemp(prefix=f".up-{key}-", dir=jobs_dir))
        try:
            with body:
                unpack(body, landing, limit=limit, tops=RESULT_TOPS)
            with self._cond:
                slot = self._leased(agent, worker, key)
                if slot is None:
                    return 409, {"error": "the lease ended while the result came: it is not wanted"}
                staging = Staging(jobs_dir, key)
                staging.remove()  # a result sent again replaces the first
                for piece, target in (("output", staging.output), ("stdout", staging.stdout),
                                      ("stderr", staging.stderr)):
                    if os.path.lexists(landing / piece):
                        os.rename(landing / piece, target)
                if not staging.output.exists():
                    staging.output.mkdir()
                slot.uploads += 1
                self._touch(agent)
            if request.headers.get(REPORT):
                # the final report with the files, in one request: one round trip less on every job
                try:
                    report = json.loads(request.headers[REPORT])
                except ValueError:
                    return 400, {"error": f"{REPORT}: not JSON"}
                return self._done(agent, worker, key, {"report": report})
            return 200, {}
        except BadArchive as exc:
            log.warning("agent %s sent a bad result for job %s: %s", agent.name, key, exc)
            return 400, {"error": str(exc)}
        finally:
            shutil.rmtree(landing, ignore_errors=True)

    def _done(self, agent: _Agent, worker: str, key: str, body: Any) -> tuple[int, dict[str, Any]]:
        try:
            report = Report.from_json(body.get("report") if isinstance(body, dict) else None)
        except ProtocolError as exc:
            return 400, {"error": f"report: {exc}"}
        if report.key != key or not report.done:
            return 400, {"error": "report: not the final report of this job"}
        with self._cond:
            self._touch(agent)
            slot = self._leased(agent, worker, key)
            if slot is None:
                return 409, {"error": "the lease has ended: the result is not wanted"}
            if not slot.uploads and report.outcome is not Outcome.STOPPED:
                return 409, {"error": "send the job's files before its report"}
            slot.report, slot.leased = report, False  # the lease ends here: whatever comes later is refused
            self._cond.notify_all()
        return 200, {}

    # --- the HTTP API -----------------------------------------------------------------------------

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        request = Request(environ)
        try:
            # a kept-alive connection may bring a request after stop(): the agent is told to come back later
            response = _json(503, {"error": "the daemon is stopping"}) if self._stopping.is_set() \
                else self._dispatch(request)
        except Exception:
            log.exception("agents API: %s %s failed", request.method, request.path)
            response = _json(500, {"error": "internal error"})
        stream = request.stream
        if request.content_length and not getattr(stream, "is_exhausted", True):
            # a body left unread (a refused request) would be read as the next request on a kept-alive connection
            response.headers["Connection"] = "close"
        return response(environ, start_response)

    def _dispatch(self, request: Request) -> Response:
        given = request.headers.get("Authorization", "")
        if not given.startswith("Bearer ") or not hmac.compare_digest(given[7:].encode(), self._token.encode()):
            return _json(401, {"error": "unauthorized"})
        parts = request.path.strip("/").split("/")
        if parts == ["v1", "register"] and request.method == "POST":
            body = _read_json(request)
            if body is None:
                return _json(400, {"error": "a JSON object of at most 64 KiB"})
            return _json(*self._register(body, request.remote_addr or "?"))
        with self._cond:
            name = self._sessions.get(request.headers.get(SESSION, ""))
            agent = self._agents.get(name) if name else None
        if agent is None:
            return _json(410, {"error": "unknown session: register again"})
        worker = request.headers.get(WORKER, "")
        if parts == ["v1", "poll"] and request.method == "POST":
            body = _read_json(request)
            if body is None:
                return _json(400, {"error": "a JSON object of at most 64 KiB"})
            wait = body.get("wait", 0)
            status, answer = self._poll(agent, worker, float(wait) if isinstance(wait, int | float) else 0.0)
            return Response(status=204) if answer is None else _json(status, answer)
        if parts == ["v1", "programs"] and request.method == "GET":
            return self._programs()
        if len(parts) != 4 or parts[:2] != ["v1", "jobs"]:
            return _json(404, {"error": "no such endpoint"})
        return self._job_request(request, agent, worker, parts)

    def _job_request(self, request: Request, agent: _Agent, worker: str, parts: list[str]) -> Response:
        """/v1/jobs/<key>/<action>: what an agent does with a job it leased."""
        try:
            key = check_key(parts[2])
        except ProtocolError:
            return _json(404, {"error": "no such job"})
        action = (request.method, parts[3])
        if action == ("POST", "renew"):
            return _json(*self._renew(agent, worker, key))
        if action == ("GET", "inputs"):
            return self._inputs(agent, worker, key)
        if action == ("PUT", "result"):
            return _json(*self._result(agent, worker, key, request))
        if action == ("POST", "done"):
            body = _read_json(request)
            if body is None:
                return _json(400, {"error": "a JSON object of at most 64 KiB"})
            return _json(*self._done(agent, worker, key, body))
        return _json(404, {"error": "no such endpoint"})

    # --- what `dropq workers`, /metrics and the dashboard show -----------------------------------

    def agents_now(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        with self._cond:
            return [{"name": a.name, "host": a.host, "workers": list(a.workers),
                     "state": "connected" if self._connected(a, now) else "lost"} for a in self._agents.values()]


class Mailbox(Transport):
    """The transport of an agent's slot: the balancer's requests become the slot's mailbox in the pool. It
    subclasses Transport (whose socket it never opens) so that WorkerHandle and the balancer stay as they are."""

    def __init__(self, pool: AgentPool, name: str) -> None:
        super().__init__(socket_path=f"agent:{name}")
        self._pool = pool
        self._name = name

    def __repr__(self) -> str:
        return f"Mailbox({self._name})"

    def health(self, *, timeout: float = 5.0) -> Health:
        incarnation = self._pool.ensure(self._name, timeout=timeout)
        if incarnation is None:
            raise TransportError(f"the agent of worker {self._name} is not in contact")
        return incarnation.health

    def start(self, spec: JobSpec, *, wait: float = 0.0) -> Report:
        return self._pool.offer(self._name, spec, wait)

    def status(self, key: str, *, wait: float = 0.0) -> Report:
        return self._pool.status(self._name, key, wait)

    def cancel(self, key: str) -> None:
        self._pool.cancel(self._name, key)

    def forget(self, key: str) -> None:
        self._pool.forget(self._name, key)

    def request(self, method: str, path: str, body: Any = None, *, timeout: float | None = None) -> tuple[int, Any]:
        raise PoolError(f"worker {self._name} runs on an agent: it has no socket to send {method} {path} to")


class _QuietHandler(WSGIRequestHandler):
    """No access log: agents poll all the time; what matters is logged by the pool. HTTP/1.1, so that an agent
    keeps its connection (and its TLS session) from one request to the next instead of a new one each time."""

    protocol_version = "HTTP/1.1"

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        return None


def _json(status: int, body: dict[str, Any]) -> Response:
    return Response(json.dumps(body), status=status, mimetype="application/json")


def _read_json(request: Request) -> dict[str, Any] | None:
    """The request's JSON object, or None (too large, not JSON, not an object)."""
    length = request.content_length
    if length is None or length > MAX_JSON:
        return None
    try:
        body = json.loads(request.stream.read(length))
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def _tar_response(entries: list[tuple[str, Path]]) -> Response:
    """`entries` packed into a spooled tar, sent with its length and sha256 (inputs and programs alike)."""
    spool = tempfile.TemporaryFile()
    try:
        digest, _ = pack(entries, spool)
        size = spool.tell()
        spool.seek(0)
    except BaseException:
        spool.close()
        raise
    response = Response(_chunks(spool), mimetype="application/x-tar", direct_passthrough=True)
    response.headers["Content-Length"] = str(size)
    response.headers[SHA256] = digest
    return response


def _chunks(spool: IO[bytes]) -> Iterator[bytes]:
    """The file's bytes, then the file closed (the server ends the generator when the client goes away)."""
    with spool:
        while chunk := spool.read(1 << 20):
            yield chunk
