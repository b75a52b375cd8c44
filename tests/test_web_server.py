"""The bounds of the daemon's HTTP server (dropq.ops.web): a real server on loopback, with a tiny app."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import pytest

from dropq.ops import web
from helpers import wait_until


def _hello(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "5")])
    return [b"hello"]


def _ask(port: int) -> bytes:
    """One whole exchange on a new connection: what the server sent before it closed."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    return answer


@pytest.fixture
def server() -> Iterator[web._Server]:
    with web._listen("127.0.0.1", 0) as listener:
        served = web._Server("127.0.0.1", 0, _hello, fd=listener.fileno(), max_connections=2)
    thread = threading.Thread(target=served.serve_forever, name="test-http", daemon=True)
    thread.start()
    yield served
    served.shutdown()
    served.server_close()
    served.cut_connections()
    assert served.wait_idle(10), "a connection thread outlived the server"
    thread.join(10)
    assert not thread.is_alive()


def test_past_its_connection_cap_the_server_answers_busy_at_once(server: web._Server) -> None:
    port = server.socket.getsockname()[1]
    assert _ask(port).startswith(b"HTTP/1.0 200")
    # two clients that send half a request and stall: each holds a connection thread
    held = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2)]
    try:
        for conn in held:
            conn.sendall(b"GET / HTTP/1.1\r\n")
        # the server accepts in order, so the third connection comes after both stalled ones took theirs
        busy = _ask(port)
        assert busy.startswith(b"HTTP/1.0 503") and b"too many connections" in busy
    finally:
        for conn in held:
            conn.close()
    # their threads end once their clients go, and the places are free again
    wait_until(lambda: _ask(port).startswith(b"HTTP/1.0 200"), what="a place freed by the stalled clients")


def test_stop_cuts_a_stalled_connection_instead_of_waiting_out_its_timeout(server: web._Server) -> None:
    port = server.socket.getsockname()[1]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as stalled:
        stalled.sendall(b"GET / HTTP/1.1\r\n")
        wait_until(lambda: not server.wait_idle(0), what="the server to take the stalled connection")
        server.cut_connections()
        assert stalled.recv(1024) == b""  # closed by the server, well before the client's 10 s
        assert server.wait_idle(web.CLIENT_TIMEOUT / 2), "the connection's thread did not end when cut"
