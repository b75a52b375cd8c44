"""Each user's results kept to them (issue 17): with the daemon running as root (as CI does), a job's outbox
folder and every file in it belong to whoever dropped its manifest, mode 0700 (results.mode); a cancel file
is obeyed only from the job's owner or root; the CLI says plainly when a job's results are another's.

Two users are played by uids outside workers.job_uids' ranges: the test makes their files and chowns them,
as a user dropping into a shared inbox would have made them. A real daemon, real local workers."""

from __future__ import annotations

import errno
import functools
import json
import os
import shutil
import stat
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import DaemonProcess, Workspace
from dropq.config import Config
from dropq.errors import ConfigError
from dropq.publish.owners import Owner, Ownership
from dropq_worker.trees import walk
from helpers import dropq, wait_for_status, wait_until

ALICE = 1_600_000_900
BOB = 1_600_000_901

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="giving files to other users needs root (CI runs as root)")


def drop_as(ws: Workspace, uid: int, name: str, manifest: dict[str, Any] | str) -> Path:
    """Drop a manifest as user `uid` would: their file, written under a dotted name, renamed in."""
    tmp = ws.inbox / f".{name}.tmp"
    tmp.write_text(manifest if isinstance(manifest, str) else yaml.safe_dump(manifest))
    os.chown(tmp, uid, uid)
    os.rename(tmp, ws.inbox / name)
    return ws.inbox / name


def put_as(ws: Workspace, uid: int, name: str, data: str) -> Path:
    tmp = ws.inbox / f".{name}.part"
    tmp.write_text(data)
    os.chown(tmp, uid, uid)
    os.rename(tmp, ws.inbox / name)
    return ws.inbox / name


def owners_in(folder: Path) -> dict[str, tuple[int, int]]:
    """Every entry of `folder` (itself as '.') with its (uid, gid), by lstat."""
    found = {".": (os.lstat(folder).st_uid, os.lstat(folder).st_gid)}
    for path, st, _depth in walk(folder):
        found[str(path.relative_to(folder))] = (st.st_uid, st.st_gid)
    return found


def _run_as(uid: int, command: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=60, user=uid, group=uid, extra_groups=[],
                          cwd="/")


@functools.cache
def _interpreter_for(uid: int) -> str:
    """A Python of this minor version that `uid` may run: the tests' own, unless it lives where other users
    cannot go (a venv made from a pyenv under /root), then the system's."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    for candidate in (sys.executable, shutil.which(f"python{version}"), f"/usr/bin/python{version}",
                      f"/usr/local/bin/python{version}"):
        if candidate is None:
            continue
        try:
            said = _run_as(uid, [candidate, "-c", "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')"])
        except OSError:
            continue
        if said.returncode == 0 and said.stdout.strip() == version:
            return candidate
    pytest.skip(f"no Python {version} that uid {uid} may run (the tests' own lives where other users cannot go)")


def as_user(uid: int, config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The real `dropq` entry point, run as `uid` (no supplementary groups), as that user would run it, with
    the packages of the tests' environment."""
    site = sysconfig.get_paths()["purelib"]
    launch = (f"import runpy, site, sys; site.addsitedir({site!r}); sys.argv[0] = 'dropq'; "
              "runpy.run_module('dropq', run_name='__main__', alter_sys=True)")
    return _run_as(uid, [_interpreter_for(uid), "-c", launch, "--config", str(config), *args])


@as_root
def test_each_users_job_folder_and_files_are_theirs_with_mode_0700(workspace: Workspace,
                                                                    daemon: DaemonProcess) -> None:
    # jobs under uids of their own, as on a shared host: they need an interpreter outside root's home
    python = next((p for p in ("/usr/bin/python3", "/usr/local/bin/python3") if os.path.exists(p)), None)
    if python is None:
        pytest.skip("no interpreter outside root's home for jobs of other uids")
    workspace.root.chmod(0o755)
    workspace.configure(workers={"python": python})
    (workspace.programs / "whoami.py").write_text("import os\nprint(os.getuid())\n")
    daemon.start()
    assert "is given to whoever dropped its manifest, mode 0700" in daemon.log_text()
    put_as(workspace, ALICE, "alice-data.txt", "one two two\n")
    drop_as(workspace, ALICE, "a.yaml", {"program": "makefiles", "args": ["2"]})
    drop_as(workspace, ALICE, "a2.yaml", {"program": "wordcount", "input": "alice-data.txt"})
    drop_as(workspace, BOB, "b.yaml", {"program": "wordcount", "input": "bob-data.txt"})
    put_as(workspace, BOB, "bob-data.txt", "three\n")
    assert wait_for_status(workspace.config, "a", "succeeded") == "succeeded"
    assert wait_for_status(workspace.config, "a2", "succeeded") == "succeeded"
    assert wait_for_status(workspace.config, "b", "succeeded") == "succeeded"
    for job_id, uid in (("a", ALICE), ("a2", ALICE), ("b", BOB)):
        folder = workspace.outbox / job_id
        assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
        found = owners_in(folder)
        assert {"result.yaml", "manifest.yaml", "stdout.txt", "stderr.txt", "output", "inputs"} <= set(found)
        assert {path: owner for path, owner in found.items() if owner != (uid, uid)} == {}
    assert {"output/part-1.txt", "output/part-2.txt", "output/summary/index.txt"} <= set(
        owners_in(workspace.outbox / "a"))
    assert "inputs/alice-data.txt" in owners_in(workspace.outbox / "a2")
    assert "inputs/bob-data.txt" in owners_in(workspace.outbox / "b")
    assert (workspace.outbox / "a" / "stdout.txt").read_text().startswith("wrote 2 files")
    # the job itself runs under its sandbox uid (workers.job_uids), not as the user who dropped it
    drop_as(workspace, ALICE, "who.yaml", {"program": "whoami"})
    assert wait_for_status(workspace.config, "who", "succeeded") == "succeeded"
    first = int(yaml.safe_load(workspace.config.read_text())["workers"].get("job_uids", 1_600_000_000))
    assert first <= int((workspace.outbox / "who" / "stdout.txt").read_text()) < first + 8 * 2


@as_root
def test_the_owner_survives_a_restart_and_the_mode_is_configurable(workspace: Workspace,
                                                                   daemon: DaemonProcess) -> None:
    workspace.configure(results={"mode": "0750"})
    daemon.start()
    drop_as(workspace, ALICE, "slow.yaml", {"program": "sleep", "args": ["3"]})
    wait_for_status(workspace.config, "slow", "running")
    daemon.kill()
    assert not os.path.lexists(workspace.outbox / "slow"), "killed while the job ran, before its publishing"
    # the owner was recorded at the claim only: after the restart it comes from the store
    daemon.start()
    assert wait_for_status(workspace.config, "slow", "succeeded") == "succeeded"
    folder = workspace.outbox / "slow"
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o750
    assert set(owners_in(folder).values()) == {(ALICE, ALICE)}


@as_root
def test_a_cancel_file_of_another_user_is_refused_and_the_job_completes(workspace: Workspace,
                                                                          daemon: DaemonProcess) -> None:
    daemon.start()
    drop_as(workspace, ALICE, "long.yaml", {"program": "sleep", "args": ["2"]})
    wait_for_status(workspace.config, "long", "running")
    cancel = put_as(workspace, BOB, "long.cancel", "")
    wait_until(lambda: not os.path.lexists(cancel), what="the refused cancel file to be removed")
    assert wait_for_status(workspace.config, "long", "succeeded", "cancelled") == "succeeded"
    assert f"cancel refused (long.cancel): the cancel file belongs to uid {BOB}" in daemon.log_text()
    # and `dropq cancel` run as Bob says so at once instead of dropping a file the daemon would refuse
    drop_as(workspace, ALICE, "longer.yaml", {"program": "sleep", "args": ["30"]})
    wait_for_status(workspace.config, "longer", "running")
    workspace.root.chmod(0o755)  # the users' CLI reads config.yaml and the job database
    refused = as_user(BOB, workspace.config, "cancel", "longer")
    assert refused.returncode == 7, refused.stderr
    assert f"job longer was dropped by uid {ALICE}; you are uid {BOB}" in refused.stderr
    assert not os.path.lexists(workspace.inbox / "longer.cancel")
    assert dropq(workspace.config, "cancel", "longer").returncode == 0  # root may
    assert wait_for_status(workspace.config, "longer", "cancelled") == "cancelled"


@as_root
def test_a_cancel_file_of_the_jobs_owner_cancels_it(workspace: Workspace, daemon: DaemonProcess) -> None:
    daemon.start()
    drop_as(workspace, ALICE, "long.yaml", {"program": "sleep", "args": ["60"]})
    wait_for_status(workspace.config, "long", "running")
    put_as(workspace, ALICE, "long.cancel", "")
    assert wait_for_status(workspace.config, "long", "cancelled") == "cancelled"
    assert set(owners_in(workspace.outbox / "long").values()) == {(ALICE, ALICE)}


@as_root
def test_show_logs_and_retry_work_for_the_owner_and_say_why_for_anyone_else(workspace: Workspace,
                                                                               daemon: DaemonProcess) -> None:
    daemon.start()
    put_as(workspace, ALICE, "words.txt", "call me ishmael, call me\n")
    drop_as(workspace, ALICE, "moby.yaml", {"program": "wordcount", "input": "words.txt"})
    assert wait_for_status(workspace.config, "moby", "succeeded") == "succeeded"
    workspace.root.chmod(0o755)
    workspace.inbox.chmod(0o1777)  # a shared inbox: anyone may drop, nobody may take another's file

    shown = as_user(ALICE, workspace.config, "show", "moby")
    assert shown.returncode == 0, shown.stderr
    assert "status: succeeded" in shown.stdout
    logs = as_user(ALICE, workspace.config, "logs", "moby")
    assert logs.returncode == 0, logs.stderr
    assert "2 call" in logs.stdout

    for command in (("show", "moby"), ("logs", "moby"), ("retry", "moby")):
        refused = as_user(BOB, workspace.config, *command)
        assert refused.returncode == 7, (command, refused.stdout, refused.stderr)
        assert f"belong to uid {ALICE}; you are uid {BOB}" in refused.stderr, refused.stderr
        assert "Permission denied" not in refused.stderr
    # the job's record is no secret: Bob may see that it exists, how it ended and whose it is
    record = as_user(BOB, workspace.config, "show", "moby", "--json")
    assert record.returncode == 0, record.stderr
    assert json.loads(record.stdout)["owner"] == {"uid": ALICE, "gid": ALICE}

    retried = as_user(ALICE, workspace.config, "retry", "moby", "--wait")
    assert retried.returncode == 0, retried.stderr
    assert set(owners_in(workspace.outbox / "moby-retry").values()) == {(ALICE, ALICE)}


@as_root
def test_a_job_may_not_read_another_users_outbox_folder(workspace: Workspace, daemon: DaemonProcess) -> None:
    daemon.start()
    drop_as(workspace, ALICE, "prep.yaml", {"program": "makefiles", "args": ["1"]})
    assert wait_for_status(workspace.config, "prep", "succeeded") == "succeeded"
    drop_as(workspace, BOB, "steal.yaml", {"program": "concat", "input": "outbox:prep/output/part-1.txt"})
    drop_as(workspace, ALICE, "mine.yaml", {"program": "concat", "input": "outbox:prep/output/part-1.txt"})
    assert wait_for_status(workspace.config, "steal", "rejected", "succeeded") == "rejected"
    assert wait_for_status(workspace.config, "mine", "succeeded", "rejected") == "succeeded"
    error = workspace.result("steal")["error"]
    assert f"job prep's results belong to uid {ALICE}" in error
    assert "this is part 1" not in (workspace.outbox / "steal" / "stdout.txt").read_text()
    assert "this is part 1 of 1" in (workspace.outbox / "mine" / "stdout.txt").read_text()


# --- the rules, without a daemon ---------------------------------------------------------------------------


@as_root
def test_give_leaves_a_file_with_another_hard_link_as_it_was(tmp_path: Path) -> None:
    folder = tmp_path / "job"
    (folder / "inputs").mkdir(parents=True)
    outside = tmp_path / "someone-elses"
    outside.write_text("not the job's")
    os.link(outside, folder / "inputs" / "linked")
    (folder / "inputs" / "own").write_text("the job's")
    os.chmod(folder / "inputs" / "own", 0o4755)
    kept = Ownership(active=True, mode=0o700).give(folder, Owner(ALICE, BOB))
    assert kept == ["inputs/linked"]
    assert (os.lstat(outside).st_uid, os.lstat(outside).st_gid) == (0, 0)
    own = os.lstat(folder / "inputs" / "own")
    assert (own.st_uid, own.st_gid, stat.S_IMODE(own.st_mode)) == (ALICE, BOB, 0o755)
    assert (os.lstat(folder).st_uid, stat.S_IMODE(os.lstat(folder).st_mode)) == (ALICE, 0o700)


def test_a_daemon_not_running_as_root_changes_nothing(tmp_path: Path) -> None:
    config = Config.from_mapping({}, base=tmp_path)
    ownership = Ownership.from_config(config, euid=1000)
    assert not ownership.active
    (tmp_path / "job").mkdir(mode=0o755)
    before = os.lstat(tmp_path / "job")
    assert ownership.give(tmp_path / "job", Owner(ALICE, ALICE)) == []
    after = os.lstat(tmp_path / "job")
    assert (after.st_uid, after.st_mode) == (before.st_uid, before.st_mode)
    assert ownership.cancel_refused(BOB, Owner(ALICE, ALICE)) is None
    assert ownership.input_refused(BOB, Owner(ALICE, ALICE)) is None
    assert ownership.read_refused(Owner(BOB, BOB), Owner(ALICE, ALICE), upstream_id="a") is None
    assert Ownership.from_config(config, euid=0).cancel_refused(BOB, Owner(ALICE, ALICE)) is not None
    assert Ownership.from_config(config, euid=0).cancel_refused(0, Owner(ALICE, ALICE)) is None


@pytest.mark.parametrize(("written", "bits"), [("'0700'", 0o700), ("0750", 0o750), ("'755'", 0o755)])
def test_results_mode_is_octal_as_written(tmp_path: Path, written: str, bits: int) -> None:
    (tmp_path / "config.yaml").write_text(f"results:\n  mode: {written}\n")
    assert Config.load(tmp_path / "config.yaml").results.mode_bits == bits
    assert Config.from_mapping({}, base=tmp_path).results.mode_bits == 0o700


@pytest.mark.parametrize(("written", "says"), [("700", "written in octal with a leading 0"),
                                                ("'0600'", "read and enter it"), ("'rwx'", "octal permission bits"),
                                                ("'0789'", "octal permission bits")])
def test_a_results_mode_that_is_not_octal_bits_is_refused_naming_the_key(tmp_path: Path, written: str,
                                                                          says: str) -> None:
    (tmp_path / "config.yaml").write_text(f"results:\n  mode: {written}\n")
    with pytest.raises(ConfigError, match="results.mode") as caught:
        Config.load(tmp_path / "config.yaml")
    assert says in str(caught.value)


@as_root
def test_a_job_may_not_take_another_users_file_from_the_inbox(workspace: Workspace, daemon: DaemonProcess) -> None:
    daemon.start()
    data = put_as(workspace, ALICE, "secret.txt", "alice's words\n")
    drop_as(workspace, BOB, "grab.yaml", {"program": "wordcount", "input": "secret.txt"})
    assert wait_for_status(workspace.config, "grab", "rejected", "succeeded") == "rejected"
    assert f"the file belongs to uid {ALICE}, but the manifest was dropped by uid {BOB}" in workspace.result(
        "grab")["error"]
    assert os.path.lexists(data), "the refused input is left in the inbox for its owner"
    drop_as(workspace, ALICE, "mine.yaml", {"program": "wordcount", "input": "secret.txt"})
    assert wait_for_status(workspace.config, "mine", "succeeded", "rejected") == "succeeded"
    assert "alice's" in (workspace.outbox / "mine" / "stdout.txt").read_text()


def test_a_filesystem_where_root_may_not_chown_leaves_the_folder_the_daemons_with_the_mode(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # NFS with root_squash answers EPERM: played by an lchown that refuses, since no test filesystem does
    def refuse(path: Any, uid: int, gid: int) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted", str(path))

    folder = tmp_path / "job"
    (folder / "output").mkdir(parents=True, mode=0o755)
    folder.chmod(0o755)
    monkeypatch.setattr(os, "lchown", refuse)
    assert Ownership(active=True, mode=0o700).give(folder, Owner(ALICE, ALICE)) == ["."]
    assert stat.S_IMODE(os.lstat(folder).st_mode) == 0o700
    assert os.lstat(folder).st_uid == os.geteuid()
