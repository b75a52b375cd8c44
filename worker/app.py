"""The worker's HTTP API (Flask). The daemon is its only client.

    GET    /health           {"ok": true, "pid": ..., "job": id or null}
    POST   /jobs?wait=S      start a job and wait up to S seconds (default 0) for it to end: 200 with
                             its result if it ended, else 202; 409 when busy, 400 for a bad description
    GET    /jobs/<id>?wait=S the job's state, waiting up to S seconds for it to finish (long-poll)
    DELETE /jobs/<id>        cancel a running job; forget a finished one; an id not seen yet is
                             refused should it come (404 now, and its start ends at once as cancelled)

Starting and waiting in one request is what the daemon does: one HTTP exchange per job, not two.
"""

from __future__ import annotations

import hmac
import os
from typing import Any

from flask import Flask, abort, jsonify, request

from . import PROTOCOL, __version__
from .runner import Busy, JobSpec, Runner, Settings, SpecError

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
    _routes(app, runner, name or os.environ.get("HOSTNAME") or str(os.getpid()))
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


def _wait() -> float:
    """The request's ?wait= in seconds, within [0, MAX_WAIT]."""
    return min(max(request.args.get("wait", 0.0, type=float), 0.0), MAX_WAIT)


def _routes(app: Flask, runner: Runner, worker_name: str) -> None:
    @app.get("/health")
    def health() -> Any:
        job = runner.current
        return jsonify(ok=True, pid=os.getpid(), name=worker_name, version=__version__, protocol=PROTOCOL,
                       job=job.spec.id if job else None)

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
        except SpecError as exc:
            return jsonify(error=str(exc)), 400
        except Busy as exc:
            return jsonify(error=f"busy with job {exc}"), 409
        if wait := _wait():
            job.done.wait(wait)
        return jsonify(job.status()), 200 if job.done.is_set() else 202

    @app.get("/jobs/<job_id>")
    def job_status(job_id: str) -> Any:
        job = runner.get(job_id)
        if job is None:
            abort(404)
        if wait := _wait():
            job.done.wait(wait)
        return jsonify(job.status())

    @app.delete("/jobs/<job_id>")
    def cancel_job(job_id: str) -> Any:
        job = runner.cancel(job_id)
        if job is None:
            abort(404)
        if not job.done.is_set():
            return jsonify(job.status()), 202
        runner.forget(job_id)
        return jsonify(job.status())

