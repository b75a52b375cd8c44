"""Telling someone a job has finished: the webhook a manifest asks for (`notify: URL`), and the command the
operator configures (`notify.command`).

A webhook is a POST of the job's result (result.yaml's fields, with its id and folder) as JSON, signed
the way GitHub signs its webhooks: `X-Dropq-Signature-256: sha256=<HMAC-SHA256 of the body>`, with the
secret in notify.secret_file. The URL must start with one of notify.allowed, checked when the manifest is
claimed, so a manifest cannot make the daemon call an address the operator did not allow; redirects are
not followed, for the same reason. Deliveries are rows in the store, added when the job is published
and sent by a thread of their own: a slow or dead receiver never delays a commit or a dispatch, and a
delivery pending at a restart is sent after it. Each is tried up to notify.max_attempts times, 5 s
apart and doubling, at most 10 minutes apart. Notifications leave from the daemon; workers never need
a network for them.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import queue
import secrets
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import yaml

from dropq.config import Config
from dropq.errors import ManifestError
from dropq.escape import printable
from dropq.queue.store import JobRecord, Store

log = logging.getLogger("dropq.notify")

HEADER = "X-Dropq-Signature-256"
FIRST_RETRY, MAX_RETRY = 5.0, 600.0


def check_notify(url: str, allowed: list[str]) -> None:
    """Refuse a manifest's webhook that does not start with one of the operator's prefixes."""
    if not allowed:
        raise ManifestError("`notify` is not enabled on this daemon (its config's notify.allowed is empty)")
    if not any(url.startswith(prefix) for prefix in allowed):
        raise ManifestError(f"`notify` URL {printable(url)!r} does not start with one this daemon allows "
                            f"(notify.allowed: {', '.join(allowed)})")


def signature(secret: bytes, body: bytes) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def load_secret(config: Config) -> bytes:
    """notify.secret_file's contents, or state/notify.secret (made, mode 0600, when missing)."""
    path = config.notify.secret_file or config.state / "notify.secret"
    try:
        return path.read_bytes().strip()
    except FileNotFoundError:
        if config.notify.secret_file is not None:
            raise
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_hex(32) + "\n")
    return path.read_bytes().strip()


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """An allowed URL must not send the daemon on to one that is not."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class Notifications:
    def __init__(self, *, config: Config, store: Store, now: Callable[[], float] = time.time) -> None:
        self.config = config
        self.store = store
        self._now = now
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._commands: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._command_thread: threading.Thread | None = None
        self._opener = urllib.request.build_opener(_NoRedirects)
        self._secret: bytes | None = None

    def published(self, job: JobRecord) -> None:
        """From the committer, once per published job: cheap (a row, a wake-up); the sending is elsewhere."""
        if job.manifest:
            url = json.loads(job.manifest).get("notify")
            if url:
                self.store.add_delivery(job.id, url)
                self._wake.set()
        if self.config.notify.command:
            self._commands.put(str(self.config.outbox / job.folder))

    def start(self) -> None:
        if self.config.notify.allowed:
            self._secret = load_secret(self.config)
            self._thread = threading.Thread(target=self._loop, name="webhooks", daemon=True)
            self._thread.start()
        if self.config.notify.command:
            self._command_thread = threading.Thread(target=self._run_commands, name="notify-command", daemon=True)
            self._command_thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._commands.put(None)
        for thread in (self._thread, self._command_thread):
            if thread is not None:
                thread.join(self.config.notify.timeout + 5)

    # --- webhooks ------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            for delivery in self.store.due_deliveries():
                if self._stop.is_set():
                    return
                self._deliver(delivery)
            due = self.store.next_delivery_at()
            self._wake.wait(None if due is None else max(0.05, due - self._now()))
            self._wake.clear()

    def _deliver(self, delivery: dict[str, Any]) -> None:
        job_id, url, attempts = delivery["job"], delivery["url"], delivery["attempts"] + 1
        body = self._body(job_id)
        assert self._secret is not None
        request = urllib.request.Request(url, data=body, method="POST", headers={
            "Content-Type": "application/json", "User-Agent": "dropq", HEADER: signature(self._secret, body),
            "X-Dropq-Delivery": f"{job_id}/{attempts}"})
        try:
            with self._opener.open(request, timeout=self.config.notify.timeout) as answer:
                status = answer.status
        except urllib.error.HTTPError as exc:
            error = f"HTTP {exc.code} {exc.reason}"
        except (urllib.error.URLError, OSError, ValueError) as exc:
            error = str(getattr(exc, "reason", exc))
        else:
            if 200 <= status < 300:
                self.store.delivery_done(job_id, state="delivered", attempts=attempts, error=None)
                log.info("job %s: webhook delivered (HTTP %d)", job_id, status)
                return
            error = f"HTTP {status}"
        if attempts >= self.config.notify.max_attempts:
            self.store.delivery_done(job_id, state="failed", attempts=attempts, error=error)
            log.warning("job %s: webhook not delivered after %d attempts; last: %s", job_id, attempts, error)
            return
        delay = min(MAX_RETRY, FIRST_RETRY * 2 ** (attempts - 1))
        self.store.delivery_done(job_id, state="pending", attempts=attempts, error=error, next_at=self._now() + delay)
        log.info("job %s: webhook attempt %d failed (%s); next in %.0f s", job_id, attempts, error, delay)

    def _body(self, job_id: str) -> bytes:
        job = self.store.get(job_id)
        try:
            document = yaml.safe_load((self.config.outbox / job.folder / "result.yaml").read_text())
        except (OSError, yaml.YAMLError):
            document = None
        if not isinstance(document, dict):  # pruned, or edited: what the store knows
            document = {"id": job.folder, "status": job.status.value, "error": job.error}
        return json.dumps({"job": job.id, "folder": job.folder, **document}, default=str).encode()

    # --- the operator's command -----------------------------------------------------------------------

    def _run_commands(self) -> None:
        command = self.config.notify.command or []
        while (folder := self._commands.get()) is not None:
            try:
                done = subprocess.run([*command, folder], stdin=subprocess.DEVNULL, capture_output=True,
                                      timeout=self.config.notify.command_timeout, start_new_session=True)
            except subprocess.TimeoutExpired:
                log.warning("notify.command took longer than %g s on %s; it was stopped",
                            self.config.notify.command_timeout, printable(folder))
                continue
            except OSError as exc:
                log.warning("notify.command could not run: %s", exc)
                continue
            if done.returncode != 0:
                tail = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or [""]
                log.warning("notify.command exited with code %d on %s: %s", done.returncode, printable(folder),
                            printable(tail[0]))
