"""Files dropped the ways real clients drop them, against a real daemon: rsync --inplace, cp -p and
unzip (which set times and mode by path after their close), Qt's QSaveFile (an unnamed O_TMPFILE
linked to its name), names that are not UTF-8 or are odd in other ways (fuzzed as bytes), short
names like 7.yml, and a claim that fails for real (the spool folder on another mount: EXDEV).

The tools are real. A test that needs one skips where it is missing, but fails under CI
(DROPQ_REQUIRE_TOOLS=1, set by .ci/run, which installs them)."""

from __future__ import annotations

import os
import re
import shutil
import socket
import sqlite3
import subprocess
import time
from collections.abc import Callable

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from conftest import DaemonProcess, Workspace
from dropq.escape import printable
from helpers import dropq


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        if os.environ.get("DROPQ_REQUIRE_TOOLS") == "1":
            pytest.fail(f"DROPQ_REQUIRE_TOOLS=1 but {tool} is not installed", pytrace=False)
        pytest.skip(f"{tool} is not installed")
    return path


def echo(token: str) -> str:
    return yaml.safe_dump({"program": "echo.py", "args": [token]})


def stdout_tokens(ws: Workspace) -> dict[str, str]:
    """outbox folder -> the token its job printed"""
    return {name: (ws.outbox / name / "stdout.txt").read_text().split("\n")[0]
            for name, r in ws.results().items() if r["status"] == "succeeded"}


def meta(ws: Workspace, key: str) -> str | None:
    db = sqlite3.connect(f"file:{ws.state / 'dropq.sqlite3'}?mode=ro", uri=True)
    try:
        row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    finally:
        db.close()
    return None if row is None else str(row[0])


def wait_for(what: str, check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} did not happen within {timeout} s")


# --- clients that touch the file by path after its close ---------------------------------------------

def test_rsync_inplace_exits_0_every_time_and_each_manifest_runs_once(workspace: Workspace,
                                                                      daemon: DaemonProcess) -> None:
    rsync = need("rsync")
    daemon.start()
    src = workspace.root / "src"
    src.mkdir()
    codes = []
    for i in range(20):
        (src / f"r{i}.yaml").write_text(echo(f"rsync-{i}"))
        # -a: after the close, rsync sets the times by path, then the mode; a claim at the close made it
        # exit 23 about every other file
        done = subprocess.run([rsync, "-a", "--inplace", str(src / f"r{i}.yaml"), str(workspace.inbox) + "/"],
                              capture_output=True, text=True, timeout=60)
        codes.append((done.returncode, done.stderr.strip()))
    assert codes == [(0, "")] * 20
    workspace.wait_results(20, timeout=60)
    assert stdout_tokens(workspace) == {f"r{i}": f"rsync-{i}" for i in range(20)}


def test_rsync_inplace_of_inputs_with_their_manifests_exits_0(workspace: Workspace, daemon: DaemonProcess) -> None:
    rsync = need("rsync")
    daemon.start()
    src = workspace.root / "src"
    src.mkdir()
    for i in range(8):
        (src / f"d{i}.txt").write_text(f"words of {i}\n")
        (src / f"w{i}.yaml").write_text(yaml.safe_dump({"program": "wordcount.py", "input": f"d{i}.txt"}))
        # the manifest first, then its data (within intake.input_grace): the job is waiting for the data,
        # which must not be taken at its close either. Each file with its own rsync, as a script would.
        for name in (f"w{i}.yaml", f"d{i}.txt"):
            done = subprocess.run([rsync, "-a", "--inplace", str(src / name), str(workspace.inbox) + "/"],
                                  capture_output=True, text=True, timeout=60)
            assert (done.returncode, done.stderr) == (0, ""), name
    results = workspace.wait_results(8, timeout=60)
    assert {name: r["status"] for name, r in results.items()} == {f"w{i}": "succeeded" for i in range(8)}
    assert all((workspace.outbox / f"w{i}" / "inputs" / f"d{i}.txt").exists() for i in range(8))


def test_cp_p_and_unzip_exit_0_and_each_manifest_runs_once(workspace: Workspace, daemon: DaemonProcess) -> None:
    cp, zip_, unzip = need("cp"), need("zip"), need("unzip")
    daemon.start()
    src = workspace.root / "src"
    src.mkdir()
    for i in range(5):
        (src / f"c{i}.yaml").write_text(echo(f"cp-{i}"))
        (src / f"z{i}.yaml").write_text(echo(f"zip-{i}"))
    subprocess.run([zip_, "-qj", str(workspace.root / "jobs.zip"), *(str(src / f"z{i}.yaml") for i in range(5))],
                   check=True)
    for i in range(5):
        done = subprocess.run([cp, "-p", str(src / f"c{i}.yaml"), str(workspace.inbox)], capture_output=True,
                              text=True, timeout=60)
        assert (done.returncode, done.stderr) == (0, "")
    # unzip writes, closes, then sets the times by path
    done = subprocess.run([unzip, "-q", str(workspace.root / "jobs.zip"), "-d", str(workspace.inbox)],
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stderr) == (0, "")
    workspace.wait_results(10, timeout=60)
    assert stdout_tokens(workspace) == {**{f"c{i}": f"cp-{i}" for i in range(5)},
                                        **{f"z{i}": f"zip-{i}" for i in range(5)}}


# --- QSaveFile ----------------------------------------------------------------------------------------

def test_a_file_saved_like_qsavefile_is_claimed_at_once(workspace: Workspace, daemon: DaemonProcess) -> None:
    daemon.start()
    # Kate, KWrite, Qt Creator: an unnamed file in the target's folder, written, then linked to its name
    fd = os.open(workspace.inbox, os.O_TMPFILE | os.O_WRONLY, 0o644)
    dir_fd = os.open(workspace.inbox, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.write(fd, echo("saved by qt").encode())
        # linkat(AT_FDCWD, "/proc/self/fd/N", ..., AT_SYMLINK_FOLLOW): os.link follows the magic link
        # only when it is given a directory fd
        os.link(f"/proc/self/fd/{fd}", workspace.inbox / "qt.yaml", src_dir_fd=dir_fd, follow_symlinks=True)
        started = time.monotonic()
    finally:
        os.close(dir_fd)
        os.close(fd)
    # the abandoned-mark sweep would take it only after ~90 s
    results = workspace.wait_results(1, timeout=15)
    assert results["qt"]["status"] == "succeeded", results
    assert time.monotonic() - started < 15
    assert (workspace.outbox / "qt" / "stdout.txt").read_text().startswith("saved by qt\n")
    log = daemon.log_text()
    assert "lost events" not in log and "marked as being written" not in log


# --- names ---------------------------------------------------------------------------------------------

def test_short_names_are_manifests_and_a_bare_suffix_is_a_dotfile(workspace: Workspace,
                                                                  daemon: DaemonProcess) -> None:
    daemon.start()
    workspace.drop("7.yml", echo("seven"))
    workspace.drop("x.yml", echo("x"))
    workspace.drop("y.yaml", echo("y"))
    (workspace.inbox / ".yml").write_text(echo("dotfile"))
    workspace.wait_results(3, timeout=30)
    assert stdout_tokens(workspace) == {"7": "seven", "x": "x", "y": "y"}
    time.sleep(1.5)  # a rescan passes (intake.rescan is 1 s in tests): the dotfile is still left alone
    assert os.listdir(workspace.inbox) == [".yml"]


def test_a_utf16_manifest_is_rejected_saying_manifests_are_utf8(workspace: Workspace,
                                                               daemon: DaemonProcess) -> None:
    daemon.start()
    (workspace.inbox / ".wide.part").write_bytes(echo("wide").encode("utf-16"))  # as Notepad may save it
    os.rename(workspace.inbox / ".wide.part", workspace.inbox / "wide.yaml")
    result = workspace.wait_results(1, timeout=30)["wide"]
    assert result["status"] == "rejected" and "not UTF-8" in result["error"], result


#: file names as bytes: anything but "/" and NUL, not a dotfile, ending in a manifest suffix, at most 255
NAMES = st.builds(
    lambda stem, suffix: stem + suffix,
    st.binary(min_size=1, max_size=250).filter(lambda b: b"/" not in b and b"\0" not in b and b[:1] != b"."),
    st.sampled_from([b".yaml", b".yml"]),
)


@pytest.mark.timeout(600)
def test_fuzzed_byte_names_each_end_in_exactly_one_outbox_folder(workspace: Workspace,
                                                                 daemon: DaemonProcess) -> None:
    daemon.start()
    inbox = os.fsencode(workspace.inbox)
    dropped: dict[str, bytes] = {}  # token -> the name it was dropped as

    @settings(max_examples=12, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(st.lists(NAMES, min_size=1, max_size=6, unique=True))
    @example([b"caf\xe9.yaml", b"two\nlines.yaml", b"with space.yml", b"-rf.yaml", b"--help.yml",
              b"x" * 250 + b".yaml", b"\xff" * 250 + b".yaml", b"a..yaml", b"-...yml", b"7.yml"])
    @example([b"caf\xe9.yaml", b"caf\xe8.yaml", b"caf\xef\xbf\xbd.yaml"])  # the same safe id three ways
    def drop_batch(names: list[bytes]) -> None:
        expected = len(dropped) + len(names)
        for name in names:
            token = f"tok-{len(dropped)}"
            dropped[token] = name
            # written in place through a bytes path, as a client on a Latin-1 share would
            fd = os.open(inbox + b"/" + name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            with os.fdopen(fd, "w") as fh:
                fh.write(echo(token))
        workspace.wait_results(expected, timeout=60)

    drop_batch()
    results = workspace.results()
    tokens = stdout_tokens(workspace)
    assert all(r["status"] == "succeeded" for r in results.values()), {k: r.get("error") for k, r in results.items()}
    # exactly one folder per manifest, and each folder is the job of the manifest it was dropped as
    assert sorted(tokens.values()) == sorted(dropped), "a manifest lost or run twice"
    for folder, token in tokens.items():
        name = dropped[token]
        assert results[folder]["manifest"] == printable(os.fsdecode(name))  # escaped as dropq shows names
        assert len(os.fsencode(folder)) <= 255 and "\n" not in folder
    assert os.listdir(inbox) == []


# --- a claim that fails for real -----------------------------------------------------------------------

@pytest.mark.skipif(os.geteuid() != 0, reason="a bind mount needs root")
def test_a_claim_failing_across_mounts_is_retried_with_back_off_and_blocks_no_other(
        workspace: Workspace, daemon: DaemonProcess) -> None:
    # spool/a-bad becomes another mount: renaming inbox/a-bad.yaml into it fails with EXDEV, as every
    # claim did under the 0.1 systemd unit (issue 18). It sorts first: the start-up rescan meets it first.
    bad = workspace.state / "spool" / "a-bad"
    elsewhere = workspace.root / "elsewhere"
    bad.mkdir(parents=True)
    elsewhere.mkdir()
    subprocess.run(["mount", "--bind", str(elsewhere), str(bad)], check=True)
    try:
        workspace.drop("a-bad.yaml", echo("bad"))
        for i in range(5):
            workspace.drop(f"b{i}.yaml", echo(f"b{i}"))
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
            notify.bind(str(workspace.root / "notify.sock"))
            notify.settimeout(30)
            daemon.start(env={"NOTIFY_SOCKET": str(workspace.root / "notify.sock")})
            workspace.wait_results(5, timeout=60)
            assert stdout_tokens(workspace) == {f"b{i}": f"b{i}" for i in range(5)}
            # systemd's status line says so too (the watchdog stays fed: the daemon still serves the others)
            said = ""
            while not said.startswith("degraded: cannot claim 1 manifest(s)"):
                fields = dict(line.split("=", 1) for line in notify.recv(4096).decode().splitlines())
                said = fields.get("STATUS", said)
        trouble = meta(workspace, "intake_trouble") or ""
        assert re.match(r"cannot claim 1 manifest\(s\): \[Errno 18\] Invalid cross-device link: .*a-bad\.yaml", trouble)
        # and the operator is told: `dropq status` has a line for it (systemd's STATUS= starts "degraded:")
        shown = dropq(workspace.config, "status")
        assert f"intake   {trouble} (retried with back-off" in shown.stdout, shown.stdout
        # retried with back-off (1, 2, 4 s...): a few attempts, one warning, no traceback
        wait_for("a third attempt", lambda: daemon.log_text().count("cannot claim a-bad.yaml (attempt") >= 2, 15)
        log = daemon.log_text()
        assert log.count("WARNING dropq.intake: cannot claim a-bad.yaml") == 1, log
        assert "Traceback" not in log
        assert (workspace.inbox / "a-bad.yaml").exists() and os.listdir(bad) == []
    finally:
        subprocess.run(["umount", str(bad)], check=True)
    # the cause is gone: the next try succeeds, and the trouble is cleared
    assert workspace.wait_results(6, timeout=60)["a-bad"]["status"] == "succeeded"
    wait_for("the trouble to clear", lambda: meta(workspace, "intake_trouble") == "", 10)
