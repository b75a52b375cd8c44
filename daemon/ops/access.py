"""Who may read the dashboard, the JSON API and /metrics: everyone who can connect, or (http.token_file)
only those who show the token.

The API shows every job's output, so on a shared host a local user must not read it by connecting to
127.0.0.1. With a token file, a request needs `Authorization: Bearer <token>` (scripts, Prometheus) or
the session cookie the login form at /login gives (the page). The cookie is not the token: it is an
expiry time and an HMAC of it under a key derived from the state directory's secret and the token, so
it cannot be forged without that secret, stops working when it expires or the token changes, and never
lets a stolen cookie reveal the token. Comparisons run in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
import time
from pathlib import Path

from flask import Flask, Response, jsonify, redirect, request
from werkzeug.wrappers import Response as AnyResponse

from dropq.errors import ConfigError

#: the session cookie's name
COOKIE = "dropq_session"
#: seconds a login lasts
SESSION_SECONDS = 12 * 3600
#: the shortest token accepted: a token a local user could guess by asking the API would make this moot
MIN_TOKEN = 16
#: paths answered without the token: the liveness probe (it says nothing but "ok") and the login form
OPEN_PATHS = {"/healthz", "/login"}
LOGIN_PAGE = Path(__file__).with_name("dashboard") / "login.html"
LOGIN_POLICY = ("default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; base-uri 'none'; "
                "frame-ancestors 'none'")
WRONG = '<p class="wrong">That is not the token.</p>'


def read_token(path: Path, *, key: str = "http.token_file") -> str:
    """The token in `path` (surrounding whitespace removed); ConfigError when it is missing, unreadable,
    empty or too short, so the daemon stops at start instead of serving without a login."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{key} {path} does not exist; write a token into it "
                          f"(e.g. `openssl rand -hex 32 > {path}`) or remove {key}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {key} {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{key} {path} is not UTF-8 text") from None
    token = text.strip()
    if not token:
        raise ConfigError(f"{key} {path} is empty; write a token into it "
                          f"(e.g. `openssl rand -hex 32 > {path}`)")
    if len(token) < MIN_TOKEN or any(c.isspace() for c in token):
        raise ConfigError(f"the token in {key} {path} must be one word of {MIN_TOKEN} characters "
                          "or more (e.g. `openssl rand -hex 32`)")
    return token


def token_readable_by_others(path: Path) -> bool:
    """Whether users other than the file's owner and group can read the token file."""
    return bool(os.stat(path).st_mode & stat.S_IROTH)


class Gate:
    """The token, and the cookies that stand for it."""

    def __init__(self, token: str, *, secret: bytes, now: float | None = None) -> None:
        self._token = token.encode()
        # the key depends on the token: a new token ends every session made under the old one
        self._key = hmac.new(secret, b"dropq http session\0" + hashlib.sha256(self._token).digest(),
                             hashlib.sha256).digest()
        self._now = now

    def _time(self) -> float:
        return time.time() if self._now is None else self._now

    def token_matches(self, given: str) -> bool:
        return hmac.compare_digest(given.encode(), self._token)

    def cookie(self) -> str:
        """A new session cookie's value: its expiry time and their MAC."""
        expires = str(int(self._time()) + SESSION_SECONDS)
        return f"{expires}.{self._mac(expires)}"

    def cookie_valid(self, value: str) -> bool:
        expires, _, mac = value.partition(".")
        if not expires.isdigit() or len(expires) > 12:
            return False
        # the MAC first, in constant time; then the expiry (a valid MAC means the server wrote it)
        return hmac.compare_digest(mac.encode(), self._mac(expires).encode()) and int(expires) > self._time()

    def _mac(self, expires: str) -> str:
        return hmac.new(self._key, expires.encode(), hashlib.sha256).hexdigest()

    def allows(self) -> bool:
        """Whether the request being served shows the token, or a valid session cookie."""
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and given and self.token_matches(given.strip()):
            return True
        session = request.cookies.get(COOKIE, "")
        return bool(session) and self.cookie_valid(session)


def guard(app: Flask, gate: Gate) -> None:
    """Refuse every request without the token (but OPEN_PATHS), and serve the login form at /login."""
    app.config["MAX_CONTENT_LENGTH"] = 16 * 1024  # a login form is a few bytes; nothing else takes a body

    @app.before_request
    def _check_token() -> AnyResponse | None:
        if request.path in OPEN_PATHS or gate.allows():
            return None
        if request.path == "/":  # a person at the page: to the form
            return redirect("/login", code=303)
        response = jsonify(error="this dropq needs a login: send Authorization: Bearer <token> "
                                 "(the token is in the file http.token_file names), or log in at /login")
        response.status_code = 401
        response.headers["WWW-Authenticate"] = 'Bearer realm="dropq"'
        return response

    def login() -> AnyResponse:
        if request.method == "GET":
            return _login_page("", 200)
        given = request.form.get("token", "")
        if not given or not gate.token_matches(given.strip()):
            return _login_page(WRONG, 401)
        response = redirect("/", code=303)
        response.set_cookie(COOKIE, gate.cookie(), max_age=SESSION_SECONDS, path="/", httponly=True,
                            samesite="Strict")
        return response

    app.add_url_rule("/login", "login", login, methods=["GET", "POST"])


def _login_page(message: str, status: int) -> Response:
    page = LOGIN_PAGE.read_text(encoding="utf-8").replace("<!--message-->", message)
    response = Response(page, status=status, mimetype="text/html")
    response.headers["Content-Security-Policy"] = LOGIN_POLICY
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Cache-Control"] = "no-store"
    return response
