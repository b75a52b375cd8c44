"""Hostile names and errors through the real `dropq` command line and a real daemon: manifests whose file
names carry terminal escapes (a retitle, a screen clear), a newline, a carriage return, a bidi override
and a byte that is not UTF-8, and one whose unknown key (echoed by the rejection) carries an escape.
No control character from the data may reach stdout or stderr raw; what is shown is the escaped form.

On a terminal, dropq writes escapes of its own (status --watch redraws in place, submit --wait rewrites
its line): those are allowed, and only those.
"""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
import sys
import time
from collections.abc import Callable

import yaml

from conftest import DaemonProcess, Workspace
from dropq.escape import printable
from dropq.intake.claims import safe_id
from helpers import record_attack

#: the stem of each hostile manifest name -> how the CLI must show it
HOSTILE = {
    "title\x1b]0;pwned\x07": "title\\x1b]0;pwned\\x07",
    "clear\x1b[2J": "clear\\x1b[2J",
    "two\nlines": "two\\nlines",
    "back\rover": "back\\rover",
    "rtl\u202egpj": "rtl\\u202egpj",
}
#: an unknown manifest key, which the rejection's error echoes
EVIL_KEY = "k\x1b]0;key\x07"
EVIL_KEY_SHOWN = "k\\x1b]0;key\\x07"
#: the escapes dropq itself writes on a terminal (console.Screen): home, clear to the end of the line,
#: clear below, clear the screen; and the carriage return of a line that rewrites itself
OWN_ESCAPES = re.compile(r"\x1b\[H|\x1b\[K|\x1b\[J|\x1b\[2J|\r")
#: what must never come from the data: ESC, BEL, CR, C1 controls and the bidi controls
RAW = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def dropq(ws: Workspace, *args: str | bytes, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "dropq", "--config", str(ws.config), *args],
                          capture_output=True, timeout=timeout)


def dropq_on_a_terminal(ws: Workspace, *args: str, timeout: float = 60) -> str:
    """Run dropq with stdout and stderr on a pseudo-terminal (so it draws as on a screen); all it wrote."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "dropq", "--config", str(ws.config), *args],
                            stdout=slave, stderr=slave, stdin=subprocess.DEVNULL)
    os.close(slave)
    out = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while True:
            assert time.monotonic() < deadline, f"dropq {args} did not end: {bytes(out)[-2000:]!r}"
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every writer of the terminal has closed it
                break
            if not chunk:
                break
            out += chunk
    finally:
        os.close(master)
        proc.wait(timeout)
    # a terminal's line discipline turns each \n into \r\n; strict UTF-8: no raw undecodable byte either
    return out.decode("utf-8").replace("\r\n", "\n")


def wait_until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(0.1)


def text_of(done: subprocess.CompletedProcess[bytes]) -> str:
    return done.stdout.decode("utf-8") + done.stderr.decode("utf-8")


def raw_controls(text: str) -> list[str]:
    """The control and bidi characters in `text` besides line breaks and dropq's own escapes."""
    return RAW.findall(OWN_ESCAPES.sub("", text))


def test_hostile_names_and_errors_never_reach_the_terminal_raw(workspace: Workspace, daemon: DaemonProcess) -> None:
    daemon.start()
    for stem in HOSTILE:
        workspace.drop(f"{stem}.yaml", {"program": "echo", "args": ["hello"]})
    workspace.drop("badkey.yaml", {"program": "echo", EVIL_KEY: 1})
    workspace.wait_results(len(HOSTILE) + 1)

    outputs: dict[str, str] = {}
    # a hostile job while it runs: `workers` and `status` show it as a worker's job; cancel names it
    # (the intake gives a name with controls a job id with U+FFFD in their place; the manifest's name,
    # shown escaped, stays in result.yaml)
    busy = safe_id("busy\x1b]0;pwned\x07")
    workspace.drop("busy\x1b]0;pwned\x07.yaml", {"program": "ticker", "args": ["600", "0.1"]})
    wait_until(lambda: busy in [w["job"] for w in json.loads(dropq(workspace, "workers", "--json").stdout)])
    for args in (["workers"], ["status"], ["show", busy], ["cancel", busy]):
        done = dropq(workspace, *args)
        assert done.returncode == 0, done.stderr
        outputs[" ".join(args) + " (running)"] = text_of(done)
    workspace.wait_results(len(HOSTILE) + 2)
    assert busy in outputs["workers (running)"] and busy in outputs[f"cancel {busy} (running)"]

    for args in (["status"], ["workers"], ["jobs"], ["jobs", "--status", "rejected"]):
        done = dropq(workspace, *args)
        assert done.returncode == 0, done.stderr
        outputs[" ".join(args)] = text_of(done)
    for stem in [*HOSTILE, "badkey"]:
        job_id = safe_id(stem)
        done = dropq(workspace, "show", job_id)
        assert done.returncode == 0, done.stderr
        outputs[f"show {stem!r}"] = text_of(done)
        as_json = dropq(workspace, "show", job_id, "--json")
        # --json stays exact: json escapes the controls itself, and the id reads back as it is
        assert json.loads(as_json.stdout)["id"] == job_id
        outputs[f"show --json {stem!r}"] = text_of(as_json)
    # an id that is not there: the error line on stderr echoes it
    outputs["show (missing)"] = text_of(dropq(workspace, "show", "gone\x1b]0;x\x07"))
    outputs["status --watch"] = dropq_on_a_terminal(workspace, "status", "--watch", "--until-idle",
                                                    "--interval", "0.2")
    manifest = workspace.root / "wait\x1b]0;pwned\x07.yaml"
    manifest.write_text(yaml.safe_dump({"program": "echo", "args": ["waited"]}))
    outputs["submit --wait"] = dropq_on_a_terminal(workspace, "submit", str(manifest), "--wait")

    escaped = {name: raw_controls(text) for name, text in outputs.items() if raw_controls(text)}
    record_attack("terminal escapes in names and errors", len(outputs), len(outputs) - len(escaped))
    assert not escaped, escaped

    listing = outputs["jobs"]
    for stem in HOSTILE:
        shown = printable(safe_id(stem))
        assert shown in listing and shown in outputs["status --watch"], shown
        assert HOSTILE[stem] in outputs[f"show {stem!r}"]  # the manifest's own name, escaped
    assert EVIL_KEY_SHOWN in outputs["jobs --status rejected"]
    assert EVIL_KEY_SHOWN in outputs["show 'badkey'"]
    # a newline in a name never starts a line of its own
    assert not [line for text in outputs.values() for line in text.splitlines() if line.startswith("lines")]
    assert "gone\\x1b]0;x\\x07" in outputs["show (missing)"]
    assert "wait\\x1b]0;pwned\\x07" in outputs["submit --wait"] and "succeeded" in outputs["submit --wait"]
    assert "title\\x1b]0;pwned\\x07" in outputs["show 'title\\x1b]0;pwned\\x07'"]


def drop_bytes(ws: Workspace, name: bytes, manifest: dict[str, object]) -> None:
    """Drop a manifest under a name given as bytes (one that need not be UTF-8), as an uploader could."""
    inbox = os.fsencode(str(ws.inbox))
    fd = os.open(inbox + b"/." + name + b".tmp", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, yaml.safe_dump(manifest).encode())
    finally:
        os.close(fd)
    os.rename(inbox + b"/." + name + b".tmp", inbox + b"/" + name)


def test_a_name_that_is_not_utf8_is_shown_escaped(workspace: Workspace, daemon: DaemonProcess) -> None:
    workspace.configure(intake={"rescan": 0.2})
    daemon.start()
    drop_bytes(workspace, b"raw\xff\x1b[2J.yaml", {"program": "echo", "args": ["hi"]})
    workspace.wait_results(1, timeout=10)
    outputs = {" ".join(args): dropq(workspace, *args) for args in (["status"], ["jobs"], ["jobs", "--json"])}
    for args, done in outputs.items():
        assert done.returncode == 0, (args, done.stderr)
        # strict UTF-8 (text_of): the undecodable byte never reaches the terminal as itself
        assert not raw_controls(text_of(done)), (args, text_of(done))
    (job_id,) = [j["id"] for j in json.loads(outputs["jobs --json"].stdout)]
    shown = dropq(workspace, "show", job_id)
    assert shown.returncode == 0 and not raw_controls(text_of(shown)), text_of(shown)
