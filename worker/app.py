"""The worker's HTTP API (Flask). The daemon is its only client.

    GET    /health            Health: pid, name, version, protocol, the running job's key or null
    POST   /jobs?wait=S       start a JobSpec and wait up to S seconds (default 0) for it to end: 200 with
                              its Report if it ended, else 202; 409 when busy, 400 for a bad description
    GET    /jobs/<key>?wait=S the job's Report, waiting up to S seconds for it to finish (long-poll)
    DELETE /jobs/<key>        cancel a running job; forget a finished one; a key not seen yet is
                              refused should it come (404 now, and its start ends at once as cancelled)

Starting and waiting in one request is what the daemon does: one HTTP exchange per job, not two. The
messages are in `protocol`; a /jobs request that names another protocol version in its
`Dropq-Protocol` header (or none) is refused with 426 and a message saying what to do.
"""

from __future__ import annotations

import hmac
import os
from typing import Any

from flask import Flask, abort, jsonify, request

from . import __version__
from .job import Settings
from .protocol import HEADER, MISMATCH_STATUS, PROTOCOL, Health, JobSpec, ProtocolError, mismatch
from .runner import Busy, Runner

#: the longest a long-poll may wait; the daemon asks again after that
MAX_WAIT = 60.0


def create_app(settings: Settings | None = None, *, token: str | None = None,
               runner: Runner | None = None, name: str | None = None) -> Flask:
    app = Flask(__name__)
    if runner is None:
        if settings is None:
            raise ValueError("create_app needs settings or a runner")
        runner = Runner(settings)
    app.extensions["dropq_runner"] = runner
    if token:
        _require_token(app, token)
    worker_name = name or os.environ.get("HOSTNAME") or str(os.getpid())
    _require_protocol(app, worker_name)
    _routes(app, runner, worker_name)
    return app


def _require_token(app: Flask, token: str) -> None:
    expected = f"Bearer {token}".encode()

    @app.before_request
    def _authenticate() -> Any:
        given = request.headers.get("Authorization", "").encode()
        # constant time: a wrong token must not be guessable byte by byte from response timing
        if not hmac.compare_digest(given, expected):
            return jsonify(error="a valid bearer token is required"), 401
        return None


def _require_protocol(app: Flask, worker_name: str) -> None:
    """Refuse job requests from a daemon of another protocol version: it would read this worker's
    answers, or find a job's files, differently. /health stays open, so that a daemon can learn the
    version and say what to do itself."""

    @app.before_request
    def _check_protocol() -> Any:
        if request.path == "/health":
            return None
        given = request.headers.get(HEADER, "")
        theirs = int(given) if given.isascii() and given.isdigit() else 2  # daemons before 3 sent none
        if theirs == PROTOCOL:
            return None
        message = mismatch(worker_name, worker_protocol=PROTOCOL, daemon_protocol=theirs)
        # the version this worker speaks goes in our own header: WSGI may not send Upgrade (hop-by-hop)
        return jsonify(error=message, protocol=PROTOCOL), MISMATCH_STATUS, {HEADER: str(PROTOCOL)}


def _wait() -> float:
    """The request's ?wait= in seconds, within [0, MAX_WAIT]."""
    return min(max(request.args.get("wait", 0.0, type=float), 0.0), MAX_WAIT)


def _routes(app: Flask, runner: Runner, worker_name: str) -> None:
    @app.get("/health")
    def health() -> Any:
        job = runner.current
        return jsonify(Health(pid=os.getpid(), protocol=PROTOCOL, name=worker_name, version=__version__,
                              job=job.spec.key if job else None).to_json())

    _job_routes(app, runner)

    @app.errorhandler(404)
    def not_found(_: Exception) -> Any:
        return jsonify(error="no such job on this worker"), 404


def _job_routes(app: Flask, runner: Runner) -> None:
    @app.post("/jobs")
    def start_job() -> Any:
        try:
            spec = JobSpec.from_json(request.get_json(force=True, silent=True))
            job = runner.start(spec)
        except ProtocolError as exc:  # malformed, or a path outside the worker's mounts (SpecError)
            return jsonify(error=str(exc)), 400
        except Busy as exc:
            return jsonify(error=f"busy with job {exc}"), 409
        if wait := _wait():
            job.done.wait(wait)
        return jsonify(job.report.to_json()), 200 if job.done.is_set() else 202

    @app.get("/jobs/<key>")
    def job_status(key: str) -> Any:
        job = runner.get(key)
        if job is None:
            abort(404)
        if wait := _wait():
            job.done.wait(wait)
        return jsonify(job.report.to_json())

    @app.delete("/jobs/<key>")
    def cancel_job(key: str) -> Any:
        job = runner.cancel(key)
        if job is None:
            abort(404)
        if not job.done.is_set():
            return jsonify(job.report.to_json()), 202
        runner.forget(key)
        return jsonify(job.report.to_json())

