"""The daemon's HTTP side: a JSON API, the dashboard that reads it, and Prometheus /metrics.

Read-only by design: everything here reads the store through its own read-only connection (WAL lets it
read while the daemon writes), so a busy dashboard never holds up a job. Changing anything stays with the
inbox (drop a manifest, drop ID.cancel), which has its own permissions. Served on loopback by werkzeug's
threaded WSGI server (it comes with Flask, and it has a public stop: `shutdown()`), bounded below.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from flask import Flask, Response, abort, jsonify, request, send_from_directory
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from werkzeug.serving import ThreadedWSGIServer, WSGIRequestHandler

from dropq.config import Config, HttpConfig
from dropq.errors import ConfigError, StoreError
from dropq.ops import fleet
from dropq.ops.access import Gate, guard, read_token, token_readable_by_others
from dropq.ops.metrics import Metrics
from dropq.ops.unix_socket import listen_unix, remove_socket
from dropq.publish.outbox import iso, key_secret
from dropq.publish.streams import head_and_tail, stream_path
from dropq.queue.jobs import FINAL, JobStatus
from dropq.queue.store import JobRecord, Store

log = logging.getLogger("dropq.web")

DASHBOARD = Path(__file__).with_name("dashboard")
MAX_PAGE = 500
STREAM_BYTES = 4096
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}


def content_security_policy(page: str) -> str:
    """The dashboard's Content-Security-Policy: its one inline script (allowed by its hash), the API on
    this origin, and nothing else. The script puts every value into the page as text; should that ever
    slip, markup from a job's name still runs nothing: no inline handler, no other script, no request
    elsewhere."""
    script = page[page.index("<script>") + len("<script>"):page.rindex("</script>")]
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    return (f"default-src 'none'; script-src 'sha256-{digest}'; style-src 'unsafe-inline'; connect-src 'self'; "
            "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def job_summary(job: JobRecord, now: float | None = None) -> dict[str, Any]:
    doc = job.summary()
    doc["exit_code"] = (job.outcome or {}).get("exit_code")
    if job.status in FINAL:
        doc["folder"] = job.folder
        if job.run_seconds is not None:
            doc["run_seconds"] = round(job.run_seconds, 3)
    elif job.status is JobStatus.RUNNING and job.started_at and now is not None:
        doc["elapsed_seconds"] = round(now - job.started_at, 3)
    return doc


def create_app(config: Config, store: Store, metrics: Metrics | None = None, *, gate: Gate | None = None) -> Flask:
    """The app; with a `gate` (http.token_file), every request but /healthz and /login needs the token."""
    app = Flask("dropq", static_folder=None)
    app.json.sort_keys = False  # type: ignore[attr-defined]
    api = _Api(config, store, metrics)
    allowed_hosts = _allowed_hosts(config.http)

    @app.before_request
    def _check_host() -> None:
        # A page on another site can make a browser send requests to 127.0.0.1 through a DNS name of
        # its own (DNS rebinding); such requests carry that name in Host, so they are refused here.
        # Registered before the token's check: a rebinding page never even reaches the login form.
        if allowed_hosts is not None and _hostname(request.host) not in allowed_hosts:
            abort(403, description="this address is not one dropq serves; use 127.0.0.1 or localhost")

    if gate is not None:
        guard(app, gate)

    routes: list[tuple[str, Callable[..., Response]]] = [
        ("/", api.dashboard), ("/healthz", api.healthz), ("/api/summary", api.summary),
        ("/api/jobs", api.jobs), ("/api/jobs/<job_id>", api.job), ("/api/workers", api.workers),
        ("/api/throughput", api.throughput), ("/metrics", api.prometheus)]
    for rule, view in routes:
        app.add_url_rule(rule, view.__name__, view, methods=["GET"])

    @app.errorhandler(StoreError)
    def _store_error(exc: StoreError) -> tuple[Response, int]:
        return jsonify(error=str(exc)), 503

    @app.errorhandler(400)
    @app.errorhandler(403)
    @app.errorhandler(404)
    @app.errorhandler(413)
    def _http_error(exc: Any) -> tuple[Response, int]:
        return jsonify(error=exc.description), exc.code

    return app


class _Api:
    def __init__(self, config: Config, store: Store, metrics: Metrics | None) -> None:
        self.config = config
        self.store = store
        self.metrics = metrics
        self.policy = content_security_policy((DASHBOARD / "index.html").read_text(encoding="utf-8"))

    def dashboard(self) -> Response:
        response = send_from_directory(DASHBOARD, "index.html", max_age=0)
        response.headers["Content-Security-Policy"] = self.policy
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    def healthz(self) -> Response:
        return jsonify(ok=True)

    def summary(self) -> Response:
        now = time.time()
        counts = self.store.counts()
        meta = self.store.meta()
        running = self.store.with_status(JobStatus.RUNNING, JobStatus.COMMITTING, limit=MAX_PAGE)
        return jsonify(
            now=now,
            daemon={"pid": meta.get("pid") or None, "pool": meta.get("pool"), "started_at": _float(meta, "started_at")},
            counts={s.value: counts.get(s.value, 0) for s in JobStatus},
            queue_depth=counts.get(JobStatus.QUEUED.value, 0),
            running=[job_summary(j, now) for j in running],
            waiting_for_environments=self.store.waiting_for(),
            disk_low=meta.get("disk_low") or None,
            workers=fleet.workers(self.store, now=now),
            agents=fleet.agents(self.store, now=now),
            watcher={"kind": meta.get("watcher"), "rescans": int(_float(meta, "watcher_rescans") or 0),
                     "missed": int(_float(meta, "watcher_missed") or 0),
                     "last_rescan": _float(meta, "watcher_last_rescan")},
        )

    def jobs(self) -> Response:
        statuses = _statuses(request.args.get("status", ""))
        limit = _int_arg("limit", 50, 1, MAX_PAGE)
        offset = _int_arg("offset", 0, 0, 10**12)
        now = time.time()
        page, total = self.store.page(statuses, limit=limit, offset=offset)
        return jsonify(jobs=[job_summary(j, now) for j in page], total=total, limit=limit, offset=offset)

    def job(self, job_id: str) -> Response:
        found = self.store.find(job_id)
        if found is None:
            abort(404, description=f"no job with id {job_id!r}")
        limit = _int_arg("bytes", STREAM_BYTES, 0, 1024 * 1024)
        doc = job_summary(found, time.time())
        doc["waiting"] = self.store.waiting_reason(found)
        doc["result"] = found.outcome if found.status in FINAL else None
        doc["stdout"] = head_and_tail(stream_path(self.config, found, "stdout"), limit)
        doc["stderr"] = head_and_tail(stream_path(self.config, found, "stderr"), limit)
        return jsonify(doc)

    def workers(self) -> Response:
        return jsonify(workers=fleet.workers(self.store), agents=fleet.agents(self.store))

    def throughput(self) -> Response:
        minutes = _int_arg("minutes", 60, 1, 24 * 60)
        first = int(time.time() // 60) - minutes + 1
        buckets: dict[int, dict[str, int]] = {m: {} for m in range(first, first + minutes)}
        for minute, status, n in self.store.finished_per_minute(since=first * 60.0):
            if minute in buckets:
                buckets[minute][status] = n
        return jsonify(minutes=[{"start": iso(m * 60.0), "t": m * 60, **by_status}
                                for m, by_status in sorted(buckets.items())])

    def prometheus(self) -> Response:
        if self.metrics is None:
            abort(404)
        return Response(generate_latest(self.metrics.registry), mimetype=CONTENT_TYPE_LATEST)


def _statuses(text: str) -> list[JobStatus]:
    out = []
    for name in filter(None, (part.strip() for part in text.split(","))):
        try:
            out.append(JobStatus(name))
        except ValueError:
            abort(400, description=f"unknown status {name[:40]!r}; known: {', '.join(s.value for s in JobStatus)}")
    return out


def _int_arg(name: str, default: int, low: int, high: int) -> int:
    raw = request.args.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        abort(400, description=f"{name} must be a whole number")
    if not low <= value <= high:
        abort(400, description=f"{name} must be between {low} and {high}")
    return value


def _float(meta: dict[str, str], key: str) -> float | None:
    try:
        return float(meta[key])
    except (KeyError, ValueError):
        return None


def _hostname(host_header: str) -> str:
    if host_header.startswith("["):  # [::1]:8787
        return host_header[1:].partition("]")[0]
    return host_header.rpartition(":")[0] if host_header.count(":") == 1 else host_header


def _allowed_hosts(http: HttpConfig) -> set[str] | None:
    """Host names the API answers to, or None for any (bound to every address: the operator chose)."""
    if http.socket is not None:
        # no browser connects to a Unix socket, so no rebinding reaches it directly; but a proxy on
        # loopback in front of it could pass a rebinding page's Host along: answer loopback names only
        # (curl --unix-socket and nginx's unix: upstreams send "localhost")
        return set(LOOPBACK_NAMES)
    bind = http.host
    try:
        if ipaddress.ip_address(bind).is_unspecified:
            return None
    except ValueError:
        pass
    return LOOPBACK_NAMES | {bind}


#: connections served at once (one thread each); one more is answered 503 at once, so a crowd of slow
#: or stalled clients costs a bounded number of threads and never holds up the accept loop
MAX_CONNECTIONS = 64
#: seconds a client may take over each read or write before its connection is dropped
CLIENT_TIMEOUT = 10.0
#: seconds stop() waits for requests in flight before it closes the store under them
STOP_WAIT = 5.0
_BUSY = (b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
         b"Connection: close\r\nContent-Length: 57\r\n\r\n"
         b'{"error": "too many connections at once; try again soon"}')


class _Handler(WSGIRequestHandler):
    # one request per connection: its thread ends with the response, so no idle keep-alive connection
    # holds a thread (or a place under MAX_CONNECTIONS); a new connection on loopback costs next to nothing
    protocol_version = "HTTP/1.0"
    timeout = CLIENT_TIMEOUT  # socketserver applies it to the connection's socket

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """No access log: an open dashboard asks every few seconds (errors in the app are still logged)."""

    def log_error(self, format: str, *args: Any) -> None:
        # a client that timed out or sent garbage is not the daemon's error
        log.debug("http client %s: " + format, self.address_string(), *args)


class _Server(ThreadedWSGIServer):
    """werkzeug's thread-per-connection server, with at most `max_connections` at once, and a way to cut
    the connections still open when the daemon stops (a stalled client would hold its thread until its
    timeout)."""

    block_on_close = False  # stop() waits for requests in flight itself, for a bounded time

    def __init__(self, host: str, port: int, app: Any, *, fd: int, max_connections: int) -> None:
        self.max_connections = max_connections
        self._slots = threading.BoundedSemaphore(max_connections)
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        super().__init__(host, port, app, handler=_Handler, fd=fd)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            request.setblocking(False)  # the reply fits in the socket's buffer; never wait for this client
            try:
                request.send(_BUSY)
            except OSError as exc:
                log.debug("could not tell %s the server is busy: %s", client_address, exc)
            super().shutdown_request(request)
            return
        with self._lock:
            self._open.add(request)
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()  # no thread was started to release it (socketserver closes the request)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def shutdown_request(self, request: Any) -> None:
        # under the lock: cut_connections() must never shut down a socket closed under it
        with self._lock:
            self._open.discard(request)
            super().shutdown_request(request)

    def cut_connections(self) -> None:
        """Shut down every connection still open: a thread waiting on its client returns at once."""
        with self._lock:
            for conn in self._open:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError as exc:  # the client went already
                    log.debug("connection already gone at stop: %s", exc)

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no connection is being served (at most `timeout` seconds); whether none is."""
        deadline = time.monotonic() + timeout
        taken = 0
        try:
            while taken < self.max_connections:
                if not self._slots.acquire(timeout=max(0.0, deadline - time.monotonic())):
                    return False
                taken += 1
            return True
        finally:
            for _ in range(taken):
                self._slots.release()


def _at_most(n: int, app: Any) -> Any:
    """The WSGI app, running at most `n` requests at once (http.threads); the others wait their turn."""
    slots = threading.BoundedSemaphore(n)

    def limited(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        with slots:
            return app(environ, start_response)  # type: ignore[no-any-return]

    return limited


def _listen(host: str, port: int) -> socket.socket:
    """The listening socket. Bound here rather than by werkzeug, which prints to stderr and exits when the
    port is taken; an OSError here becomes the daemon's one-line ConfigError."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET  # as werkzeug picks it for an fd
    return socket.create_server((host, port), family=family)


class WebServer:
    """The app served on a thread of the daemon; stop() is the server's public shutdown()."""

    def __init__(self, config: Config, metrics: Metrics) -> None:
        self.config = config
        http = config.http
        # read before anything is bound: a missing token stops the daemon rather than serving without one
        gate = self._gate(config)
        #: the socket file this server made (removed by stop() if it is still this one)
        self._socket_inode: int | None = None
        # a connection of its own: readers never wait for the daemon's writers in WAL mode
        self.store = Store(config.database, readonly=True)
        self.app = create_app(config, self.store, metrics, gate=gate)
        try:
            listener, host = self._listen(http)
        except BaseException:
            self.store.close()
            raise
        with listener:  # the server works on its own duplicate of the descriptor
            self.server = _Server(host, http.port, _at_most(http.threads, self.app), fd=listener.fileno(),
                                  max_connections=MAX_CONNECTIONS)
        if http.socket is not None:
            self.url = f"unix:{http.socket}"
        else:
            host, port = self.server.socket.getsockname()[:2]  # the port picked when http.port is 0
            self.url = f"http://{'[' + str(host) + ']' if ':' in str(host) else host}:{port}/"
        self._thread = threading.Thread(target=self.server.serve_forever, name="http", daemon=True)

    @staticmethod
    def _gate(config: Config) -> Gate | None:
        path = config.http.token_file
        if path is None:
            return None
        token = read_token(path)
        if token_readable_by_others(path):
            log.warning("http.token_file %s can be read by every user of this host (chmod 600 it)", path)
        # the state directory's secret (0600): a cookie cannot be made without it, and survives a restart
        return Gate(token, secret=key_secret(config.state))

    def _listen(self, http: HttpConfig) -> tuple[socket.socket, str]:
        """The listening socket and the host werkzeug is told (unix://PATH for a Unix socket)."""
        if http.socket is not None:
            listener = listen_unix(http.socket, http.socket_group)
            self._socket_inode = os.stat(http.socket).st_ino
            return listener, f"unix://{http.socket}"
        try:
            return _listen(http.host, http.port), http.host
        except OSError as exc:
            raise ConfigError(f"cannot serve the dashboard on {http.host}:{http.port}: {exc.strerror}; "
                              "set http.port to a free port (0 picks one) or http.enabled: false") from None

    def start(self) -> None:
        self._thread.start()
        login = "; login with the token in " + str(self.config.http.token_file) if self.config.http.token_file else ""
        log.info("dashboard and API on %s (metrics at /metrics%s)", self.url, login)

    def stop(self) -> None:
        if self._thread.is_alive():
            self.server.shutdown()  # ends serve_forever() (it would wait forever were it never started)
        self.server.server_close()
        # a request being answered finishes (it reads the store, closed below); its answer goes nowhere
        self.server.cut_connections()
        if not self.server.wait_idle(STOP_WAIT):
            log.warning("a dashboard request was still running after %.0f s; stopping anyway", STOP_WAIT)
        self._thread.join(timeout=5)
        self.store.close()
        if self.config.http.socket is not None and self._socket_inode is not None:
            remove_socket(self.config.http.socket, self._socket_inode)
