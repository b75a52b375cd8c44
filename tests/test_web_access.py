"""Who may read the dashboard and the API on a shared host: http.token_file (a bearer token, and a login
form that gives a session cookie) and http.socket (a Unix socket of one group), on a real daemon."""

from __future__ import annotations

import grp
import http.client
import os
import socket
import stat
from pathlib import Path
from typing import Any

import pytest
import requests

from conftest import DaemonProcess, Workspace
from dropq.config import Config
from dropq.errors import ConfigError
from dropq.ops.access import COOKIE, SESSION_SECONDS, Gate
from helpers import dropq

TOKEN = "0123456789abcdef0123456789abcdef"


def _with_token(workspace: Workspace, token: str = TOKEN) -> Path:
    path = workspace.root / "http.token"
    path.write_text(token + "\n")
    path.chmod(0o600)
    workspace.configure(http={"token_file": "http.token"})  # relative to config.yaml
    return path


def _get(daemon: DaemonProcess, path: str, **kwargs: Any) -> requests.Response:
    return requests.get(daemon.url.rstrip("/") + path, timeout=10, allow_redirects=False, **kwargs)


def test_without_the_token_the_api_and_metrics_are_refused_and_the_page_sends_to_login(
        workspace: Workspace, daemon: DaemonProcess) -> None:
    _with_token(workspace)
    daemon.start()
    for path in ("/api/summary", "/api/jobs", "/api/jobs/anything", "/api/workers", "/api/throughput", "/metrics"):
        refused = _get(daemon, path)
        assert refused.status_code == 401, path
        assert refused.headers["WWW-Authenticate"] == 'Bearer realm="dropq"'
        assert "login" in refused.json()["error"]
    page = _get(daemon, "/")
    assert page.status_code == 303 and page.headers["Location"] == "/login"
    assert _get(daemon, "/healthz").status_code == 200  # the liveness probe stays open: it says only "ok"
    # a wrong token, another scheme, the token without a scheme: all refused
    for header in (f"Bearer {TOKEN[:-1]}x", f"Basic {TOKEN}", TOKEN, "Bearer "):
        assert _get(daemon, "/api/summary", headers={"Authorization": header}).status_code == 401, header

    bearer = {"Authorization": f"Bearer {TOKEN}"}
    assert _get(daemon, "/api/summary", headers=bearer).json()["counts"]["succeeded"] == 0
    metrics = _get(daemon, "/metrics", headers=bearer)
    assert metrics.status_code == 200 and "dropq_queue_depth" in metrics.text
    assert _get(daemon, "/", headers=bearer).status_code == 200
    # the Host check still comes first: a rebinding page gets nowhere, token or not
    assert _get(daemon, "/api/summary", headers={**bearer, "Host": "attacker.example"}).status_code == 403


def test_the_login_form_gives_a_cookie_that_works_and_refuses_a_wrong_token(
        workspace: Workspace, daemon: DaemonProcess) -> None:
    _with_token(workspace)
    daemon.start()
    form = _get(daemon, "/login")
    assert form.status_code == 200 and 'name="token"' in form.text and 'method="post"' in form.text
    assert "form-action 'self'" in form.headers["Content-Security-Policy"]
    assert "<script" not in form.text  # the form needs no script

    url = daemon.url.rstrip("/")
    wrong = requests.post(url + "/login", data={"token": "not-the-token-at-all"}, timeout=10, allow_redirects=False)
    assert wrong.status_code == 401 and "not the token" in wrong.text and COOKIE not in wrong.cookies

    browser = requests.Session()
    ok = browser.post(url + "/login", data={"token": TOKEN}, timeout=10, allow_redirects=False)
    assert ok.status_code == 303 and ok.headers["Location"] == "/"
    set_cookie = ok.headers["Set-Cookie"]
    assert "HttpOnly" in set_cookie and "SameSite=Strict" in set_cookie and "Path=/" in set_cookie
    value = browser.cookies[COOKIE]
    assert TOKEN not in value  # the cookie stands for the token; it does not carry it
    assert browser.get(url + "/api/summary", timeout=10).status_code == 200
    page = browser.get(url + "/", timeout=10, allow_redirects=False)
    assert page.status_code == 200 and "<title>dropq</title>" in page.text
    assert browser.get(url + "/metrics", timeout=10).status_code == 200

    expires, _, mac = value.partition(".")
    forged = [f"{expires}.{mac[:-1]}{'0' if mac[-1] != '0' else '1'}",  # a MAC not made by the server
              f"{int(expires) + 3600}.{mac}",  # a later expiry under the old MAC
              TOKEN, "", "x." + mac]
    for cookie in forged:
        answer = requests.get(url + "/api/summary", cookies={COOKIE: cookie}, timeout=10)
        assert answer.status_code == 401, cookie


def test_a_new_token_ends_the_sessions_of_the_old_one(workspace: Workspace, daemon: DaemonProcess) -> None:
    token_file = _with_token(workspace)
    daemon.start()
    browser = requests.Session()
    url = daemon.url.rstrip("/")
    browser.post(url + "/login", data={"token": TOKEN}, timeout=10, allow_redirects=False)
    assert browser.get(url + "/api/summary", timeout=10).status_code == 200
    assert daemon.stop() == 0
    token_file.write_text("fedcba9876543210fedcba9876543210")
    daemon.start()
    url = daemon.url.rstrip("/")  # a new free port: the cookie is for the host, whatever the port
    assert browser.get(url + "/api/summary", timeout=10).status_code == 401


@pytest.mark.parametrize("content", [None, "", "  \n", "short"])
def test_a_missing_empty_or_short_token_file_stops_the_daemon_with_one_line(
        workspace: Workspace, content: str | None) -> None:
    if content is None:
        workspace.configure(http={"token_file": "http.token"})
    else:
        _with_token(workspace, content)
    done = dropq(workspace.config, "run", timeout=60)
    assert done.returncode == 3, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("dropq:")]
    assert len(lines) == 1 and "http.token_file" in lines[0] and "Traceback" not in done.stderr
    assert "openssl rand" in lines[0] or "16 characters" in lines[0]


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path) -> None:
        super().__init__("localhost", timeout=10)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(str(self._path))


def _over_socket(path: Path, url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    conn = _UnixConnection(path)
    try:
        conn.request("GET", url, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _another_group() -> int:
    """A group the socket can be given that is not the test's own (so the chown is seen): any group as
    root, one of ours otherwise; our own only when we belong to no other."""
    mine = os.getegid()
    choices = [g.gr_gid for g in grp.getgrall()] if os.geteuid() == 0 else os.getgroups()
    return next((g for g in sorted(choices) if g != mine), mine)


def test_a_unix_socket_daemon_answers_there_only_to_its_group(workspace: Workspace, daemon: DaemonProcess) -> None:
    sock = workspace.root / "run" / "http.sock"  # its folder is made at start
    gid = _another_group()
    workspace.configure(http={"socket": "run/http.sock", "socket_group": grp.getgrgid(gid).gr_name})
    daemon.start()
    info = os.stat(sock)
    assert stat.S_ISSOCK(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o660 and info.st_gid == gid
    status, body = _over_socket(sock, "/api/summary")
    assert status == 200 and b'"counts"' in body
    assert _over_socket(sock, "/metrics")[0] == 200
    assert _over_socket(sock, "/api/summary", {"Host": "attacker.example"})[0] == 403
    # the CLI reads the store, not the HTTP side; status says where the dashboard is
    shown = dropq(workspace.config, "status")
    assert shown.returncode == 0 and f"dashboard: unix:{sock}" in shown.stdout
    # nothing on TCP: the only address published is the socket's
    assert daemon.url == f"unix:{sock}"

    # a daemon killed leaves its socket behind; the next one replaces it
    daemon.kill()
    assert sock.exists()
    daemon.start()
    assert _over_socket(sock, "/healthz")[0] == 200
    assert daemon.stop() == 0
    assert not sock.exists()  # a clean stop removes it


def test_a_unix_socket_with_a_token_needs_the_token_too(workspace: Workspace, daemon: DaemonProcess) -> None:
    _with_token(workspace)
    workspace.configure(http={"socket": "http.sock"})
    daemon.start()
    sock = workspace.root / "http.sock"
    assert os.stat(sock).st_gid == os.getegid()  # no socket_group: the daemon's own group
    assert _over_socket(sock, "/api/jobs")[0] == 401
    assert _over_socket(sock, "/api/jobs", {"Authorization": f"Bearer {TOKEN}"})[0] == 200
    assert "can be read by every user" not in daemon.log_text()


def test_a_token_file_every_user_can_read_is_warned_about(workspace: Workspace, daemon: DaemonProcess) -> None:
    _with_token(workspace).chmod(0o644)
    daemon.start()
    assert "http.token_file" in daemon.log_text() and "can be read by every user of this host" in daemon.log_text()


def test_a_socket_path_taken_by_a_file_or_a_live_server_stops_the_daemon(workspace: Workspace) -> None:
    taken = workspace.root / "http.sock"
    taken.write_text("not a socket")
    workspace.configure(http={"socket": "http.sock"})
    done = dropq(workspace.config, "run", timeout=60)
    assert done.returncode == 3 and "is not a socket" in done.stderr, done.stderr
    taken.unlink()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as live:
        live.bind(str(taken))
        live.listen(1)
        done = dropq(workspace.config, "run", timeout=60)
    assert done.returncode == 3 and "another server answers" in done.stderr, done.stderr


def test_an_unknown_socket_group_stops_the_daemon(workspace: Workspace) -> None:
    workspace.configure(http={"socket": "http.sock", "socket_group": "no-such-group-dq"})
    done = dropq(workspace.config, "run", timeout=60)
    assert done.returncode == 3 and "no group 'no-such-group-dq'" in done.stderr, done.stderr


def test_socket_group_without_a_socket_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="http.socket_group needs http.socket"):
        Config.from_mapping({"http": {"socket_group": "adm"}}, base=tmp_path)


def test_a_session_cookie_expires_and_is_bound_to_its_token() -> None:
    secret = os.urandom(32)
    made = Gate(TOKEN, secret=secret, now=1000.0).cookie()
    assert Gate(TOKEN, secret=secret, now=1000.0 + SESSION_SECONDS - 1).cookie_valid(made)
    assert not Gate(TOKEN, secret=secret, now=1000.0 + SESSION_SECONDS).cookie_valid(made)
    assert not Gate(TOKEN + "x", secret=secret, now=1000.0).cookie_valid(made)
    assert not Gate(TOKEN, secret=os.urandom(32), now=1000.0).cookie_valid(made)
