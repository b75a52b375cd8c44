"""The dashboard in a real headless Chromium, driven over the DevTools protocol: a job dropped while the
page is open appears as running and then as finished, without the page being reloaded. The screenshot
is kept as a CI artifact (artifacts/dashboard.png, or $DROPQ_ARTIFACTS)."""

from __future__ import annotations

import base64
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from conftest import ROOT, DaemonProcess, Workspace

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--no-first-run", "--window-size=1400,1000", "--remote-debugging-address=127.0.0.1",
                  "--remote-debugging-port=0"]


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    if os.environ.get("DROPQ_REQUIRE_BROWSER") == "1":
        pytest.fail("DROPQ_REQUIRE_BROWSER=1 but no chromium is installed", pytrace=False)
    pytest.skip("no chromium is installed")


class Browser:
    """One page of a headless Chromium, spoken to through its DevTools WebSocket (on loopback)."""

    def __init__(self, url: str) -> None:
        import websocket  # websocket-client

        self.profile = Path(tempfile.mkdtemp(prefix="dq-chromium-"))
        self.proc = subprocess.Popen([_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}", url],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().strip()):
            assert time.monotonic() < deadline, "chromium did not open its DevTools port"
            assert self.proc.poll() is None, f"chromium exited with {self.proc.returncode}"
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        pages: list[dict[str, Any]] = []
        while not pages:
            targets = requests.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
            pages = [t for t in targets if t["type"] == "page"]
            assert time.monotonic() < deadline, "chromium opened no page"
        self.ws = websocket.create_connection(pages[0]["webSocketDebuggerUrl"], timeout=30, suppress_origin=True)
        self._ids = itertools.count(1)
        self.errors: list[str] = []
        self.call("Runtime.enable")

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        call_id = next(self._ids)
        self.ws.send(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("method") == "Runtime.exceptionThrown":
                self.errors.append(json.dumps(message["params"]["exceptionDetails"])[:500])
            if message.get("id") == call_id:
                assert "error" not in message, message["error"]
                return dict(message["result"])

    def eval(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            # the page may still be loading: an exception counts as "not yet"
            result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
            value = None if "exceptionDetails" in result else result["result"].get("value")
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"the page never showed: {expression}")

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        self.ws.close()
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture
def browser_on(daemon: DaemonProcess) -> Iterator[Any]:
    opened: list[Browser] = []

    def open_page(url: str) -> Browser:
        opened.append(Browser(url))
        return opened[-1]

    yield open_page
    for browser in opened:
        browser.close()


def test_a_job_dropped_while_the_page_is_open_appears_runs_and_finishes(
        workspace: Workspace, daemon: DaemonProcess, browser_on: Any) -> None:
    daemon.start()
    workspace.drop("first.yaml", {"program": "echo", "args": ["hello"]})
    workspace.drop("broken.yaml", {"program": "fail"})
    workspace.wait_results(2)
    page = browser_on(daemon.url)
    page.wait_for("document.querySelector('#recent tr[data-id=\"broken\"] .status')?.textContent === 'failed'")
    page.eval("window.__sameDocument = true")  # gone if the page were reloaded

    workspace.drop("slow.yaml", {"program": "ticker", "args": ["30", "0.1"]})
    elapsed = page.wait_for("document.querySelector('#running tr[data-id=\"slow\"] .elapsed')?.textContent")
    assert elapsed.endswith(("ms", " s")), elapsed
    assert page.eval("document.querySelector('#running-count').textContent") == "1"
    assert page.eval("[...document.querySelectorAll('#workers tbody .badge')].map(b => b.textContent).sort()"
                     ".join()") == "busy,idle"
    page.wait_for("document.querySelector('#recent tr[data-id=\"slow\"] .status')?.textContent === 'succeeded'")
    page.wait_for("document.querySelector('#running tbody td.empty') !== null")
    assert page.eval("window.__sameDocument") is True
    assert page.eval("performance.getEntriesByType('navigation').length") == 1

    # the counters, the chart and a job's output
    assert page.eval("document.querySelector('#succeeded-count').textContent") == "2"
    assert page.eval("document.querySelector('#failed-count').textContent") == "1"
    assert page.eval("document.querySelectorAll('#chart rect').length") >= 1
    page.eval("document.querySelector('#recent tr[data-id=\"slow\"]').click()")
    page.wait_for("document.querySelector('#detail-stdout').textContent.includes('tick 30 of 30')")
    page.eval("document.querySelector('#filter').value = 'failed';"
              "document.querySelector('#filter').dispatchEvent(new Event('change'))")
    page.wait_for("[...document.querySelectorAll('#recent tbody tr')].map(r => r.dataset.id).join() === 'broken'")
    assert page.errors == []
    page.screenshot(Path(os.environ.get("DROPQ_ARTIFACTS", ROOT / "artifacts")) / "dashboard.png")


def test_the_page_says_so_when_the_daemon_stops_answering(
        workspace: Workspace, daemon: DaemonProcess, browser_on: Any) -> None:
    daemon.start()
    page = browser_on(daemon.url)
    page.wait_for("document.querySelector('#updated').textContent.startsWith('live')")
    daemon.stop()
    page.wait_for("document.querySelector('#updated').textContent === 'daemon not answering'")
    assert page.eval("document.querySelector('#live-dot').classList.contains('down')") is True


def test_with_a_token_the_page_asks_for_it_and_then_works_on_its_cookie(
        workspace: Workspace, daemon: DaemonProcess, browser_on: Any) -> None:
    token = "b7d1c0ffee5e1f0bb7d1c0ffee5e1f0b"
    (workspace.root / "http.token").write_text(token)
    workspace.configure(http={"token_file": "http.token"})
    daemon.start()
    page = browser_on(daemon.url)
    page.wait_for("location.pathname === '/login' && document.querySelector('#token') !== null")
    submit = "document.querySelector('#token').value = {}; document.querySelector('form').submit()"
    page.eval(submit.format(json.dumps("not the token, sorry")))
    page.wait_for("document.querySelector('.wrong')?.textContent === 'That is not the token.'")
    assert page.eval("location.pathname") == "/login"
    page.eval(submit.format(json.dumps(token)))
    # the dashboard's own fetches carry the cookie: it goes live, showing the daemon's pid
    page.wait_for("location.pathname === '/' && document.querySelector('#updated').textContent.startsWith('live')")
    assert page.eval("document.querySelector('#daemon').textContent").startswith("pid ")
    assert page.eval("document.cookie") == ""  # HttpOnly: no script on the page can read the session
    # a session gone (expired, or a new token): the page's next fetch is refused, and it goes to the form
    page.call("Network.clearBrowserCookies")
    page.wait_for("location.pathname === '/login'")
    assert page.errors == []


#: a manifest's file name that is HTML: shown as these characters, never made into an element
HTML_NAME = '<img src=x onerror="window.pwned=1">'
#: an unknown key that is HTML, which the rejection's error (shown in the jobs table) echoes
HTML_KEY = "<img src=x onerror=window.pwned=2>"
#: what would put text into the page as HTML (or run it as script)
HTML_SINKS = re.compile(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|srcdoc|\beval\(|new Function")


def test_the_dashboard_script_has_no_html_sinks() -> None:
    """Every value from the API goes into the page with textContent (see el()): nothing parses it as HTML."""
    page = (ROOT / "daemon" / "ops" / "dashboard" / "index.html").read_text()
    script = page[page.index("<script>"):]
    assert not HTML_SINKS.findall(script)
    # and no handler made from a string: onclick and the like are assigned functions
    assert not re.findall(r"setAttribute\(\s*[\"']on", script)


def test_a_job_named_with_html_shows_literally(workspace: Workspace, daemon: DaemonProcess, browser_on: Any) -> None:
    daemon.start()
    workspace.drop(HTML_NAME + ".yaml", {"program": "echo", "args": ["hello"]})
    workspace.drop("htmlkey.yaml", {"program": "echo", HTML_KEY: 1})
    workspace.wait_results(2)
    page = browser_on(daemon.url)
    name = json.dumps(HTML_NAME)
    page.wait_for(f"[...document.querySelectorAll('#recent tbody tr')].some(r => r.dataset.id === {name})")
    assert page.eval(f"[...document.querySelectorAll('#recent tbody tr')].find(r => r.dataset.id === {name})"
                     ".cells[0].textContent") == HTML_NAME
    errors = page.eval("[...document.querySelectorAll('#recent td.err')].map(td => td.textContent).join('\\n')")
    assert HTML_KEY in errors
    page.eval(f"[...document.querySelectorAll('#recent tbody tr')].find(r => r.dataset.id === {name}).click()")
    page.wait_for(f"document.querySelector('#detail-id').textContent === {name}")
    # nothing the names carried became an element, and no handler ran
    assert page.eval("document.querySelectorAll('img').length") == 0
    assert page.eval("window.pwned === undefined") is True
    assert page.errors == []

    # Defence in depth: were markup ever put into the page, the Content-Security-Policy keeps its inline
    # handler from running. The image's error event is awaited, so the handler has had its turn.
    fired = page.call("Runtime.evaluate", awaitPromise=True, returnByValue=True, expression="""
        new Promise((resolve) => {
          document.body.insertAdjacentHTML('beforeend', '<img id=probe src=x onerror="window.pwned=3">');
          document.querySelector('#probe').addEventListener('error', () => resolve(window.pwned ?? 'none'));
        })""")
    assert fired["result"]["value"] == "none"
