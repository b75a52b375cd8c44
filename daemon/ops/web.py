"""The daemon's HTTP side: a JSON API, the dashboard that reads it, and Prometheus /metrics.

Read-only by design: everything here reads the store through its own read-only connection (WAL lets it
read while the daemon writes), so a busy dashboard never holds up a job. Changing anything stays with the
inbox (drop a manifest, drop ID.cancel), which has its own permissions. Served by waitress on loopback.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flask import Flask, Response, abort, jsonify, request, send_from_directory
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from waitress.server import create_server

from dropq.config import Config
from dropq.errors import ConfigError, StoreError
from dropq.ops.metrics import Metrics
from dropq.publish.outbox import iso
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


def create_app(config: Config, store: Store, metrics: Metrics | None = None) -> Flask:
    app = Flask("dropq", static_folder=None)
    app.json.sort_keys = False  # type: ignore[attr-defined]
    api = _Api(config, store, metrics)
    allowed_hosts = _allowed_hosts(config.http.host)

    @app.before_request
    def _check_host() -> None:
        # A page on another site can make a browser send requests to 127.0.0.1 through a DNS name of
        # its own (DNS rebinding); such requests carry that name in Host, so they are refused here.
        if allowed_hosts is not None and _hostname(request.host) not in allowed_hosts:
            abort(403, description="this address is not one dropq serves; use 127.0.0.1 or localhost")

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
            workers=self.store.workers(),
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
        return jsonify(workers=self.store.workers())

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


def _allowed_hosts(bind: str) -> set[str] | None:
    """Host names the API answers to, or None for any (bound to every address: the operator chose)."""
    try:
        if ipaddress.ip_address(bind).is_unspecified:
            return None
    except ValueError:
        pass
    return LOOPBACK_NAMES | {bind}


class WebServer:
    """waitress serving the app on a thread of the daemon."""

    def __init__(self, config: Config, metrics: Metrics) -> None:
        self.config = config
        # a connection of its own: readers never wait for the daemon's writers in WAL mode
        self.store = Store(config.database, readonly=True)
        self.app = create_app(config, self.store, metrics)
        try:
            self.server = create_server(self.app, host=config.http.host, port=config.http.port,
                                        threads=config.http.threads, ident="dropq", clear_untrusted_proxy_headers=True)
        except OSError as exc:
            self.store.close()
            raise ConfigError(f"cannot serve the dashboard on {config.http.host}:{config.http.port}: {exc.strerror}; "
                              "set http.port to a free port (0 picks one) or http.enabled: false") from None
        host, port = self.server.effective_host, self.server.effective_port  # type: ignore[union-attr]
        self.url = f"http://{'[' + str(host) + ']' if ':' in str(host) else host}:{port}/"
        self._thread = threading.Thread(target=self.server.run, name="http", daemon=True)

    def start(self) -> None:
        self._thread.start()
        log.info("dashboard and API on %s (metrics at %smetrics)", self.url, self.url)

    def stop(self) -> None:
        from waitress import wasyncore

        self.server.task_dispatcher.shutdown()  # type: ignore[union-attr]
        wasyncore.close_all(self.server._map)  # type: ignore[union-attr]  # ends run()'s loop
        self._thread.join(timeout=5)
        self.store.close()
