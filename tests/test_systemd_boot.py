"""The unit `dropq service install` writes, under a real systemd (PID 1 in a container), for the layouts
people use: a README-style install (checkout in /opt, workspace in /srv), a workspace that does not exist
yet, an editable install and workspace under /home run as that user, and a workspace under /tmp.

One container serves every case (booting one takes seconds, installing dropq into it longer); each case
has a unit and a workspace of its own. Marked docker: it skips without an engine, and fails instead under
DROPQ_REQUIRE_DOCKER=1, as CI runs it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import yaml
from systemd_box import LABEL, Box, BoxError, ensure_image, wheelhouse

from conftest import ROOT, _skip_or_fail
from helpers import engine

pytestmark = [pytest.mark.docker, pytest.mark.timeout(900)]

CONFIG = {"workers": {"pool": "local", "count": 1}, "http": {"port": 0}, "intake": {"rescan": 2},
          "disk": {"min_free": "1m"}}


@pytest.fixture(scope="module")
def box() -> Iterator[Box]:
    client = engine(timeout=120)
    if client is None:
        _skip_or_fail("no Docker engine answers")
    try:
        image = ensure_image(client)
    except BoxError as exc:
        _skip_or_fail(str(exc))
    machine = Box(client, image, wheels=wheelhouse(ROOT))
    try:
        # the README's install: a checkout in /opt/dropq, its own virtualenv, an editable install
        machine.copy_checkout(ROOT, "/opt/dropq")
        machine.sh("python3 -m venv /opt/dropq/.venv && "
                   "/opt/dropq/.venv/bin/pip install -q --no-index --find-links /wheels -e /opt/dropq")
        yield machine
    finally:
        machine.remove()
        for leftover in client.containers.list(all=True, filters={"label": f"{LABEL}=systemd",
                                                                  "name": machine.container.name}):
            leftover.remove(force=True)
        client.close()


def _config(box: Box, folder: str, *, owner: str | None = None, **extra: object) -> None:
    box.put(folder, {"config.yaml": yaml.safe_dump({**CONFIG, **extra}).encode()})
    if owner:
        box.sh(f"chown -R {owner}: {folder}")


def _drop(box: Box, inbox: str, name: str, *, args: list[str], user: str | None = None) -> None:
    text = yaml.safe_dump({"program": "echo", "args": args})
    box.sh(f"cat > {inbox}/.{name}.tmp <<'EOF'\n{text}EOF\nmv {inbox}/.{name}.tmp {inbox}/{name}.yaml", user=user)


def _result(box: Box, outbox: str, job: str, *, timeout: float = 60.0) -> dict[str, object]:
    path = f"{outbox}/{job}/result.yaml"
    text = box.wait_for(f"cat {path} 2>/dev/null", lambda out: "status:" in out, timeout=timeout)
    return dict(yaml.safe_load(text))


def _prop(box: Box, unit: str, name: str) -> str:
    return box.sh(f"systemctl show {unit} -p {name} --value").strip()


def test_a_readme_install_runs_jobs_survives_the_watchdog_and_stops_cleanly(box: Box) -> None:
    box.sh("mkdir -p /srv/dropq && cp -r /opt/dropq/programs /srv/dropq/programs")
    _config(box, "/srv/dropq")
    said = box.sh("/opt/dropq/.venv/bin/dropq --config /srv/dropq/config.yaml service install --now")
    assert "started dropq.service" in said, said
    assert _prop(box, "dropq", "ActiveState") == "active"
    unit = box.sh("cat /etc/systemd/system/dropq.service")
    assert "ReadWritePaths=/srv/dropq\n" in unit, unit

    _drop(box, "/srv/dropq/inbox", "j1", args=["hello", "from", "systemd"])
    result = _result(box, "/srv/dropq/outbox", "j1")
    assert result["status"] == "succeeded", result
    assert box.sh("cat /srv/dropq/outbox/j1/stdout.txt").startswith("hello from systemd")
    journal = box.sh("journalctl -u dropq --no-pager -o cat")
    assert "job j1: claimed j1.yaml" in journal, journal

    # a stuck daemon (SIGSTOP) stops feeding the watchdog: systemd kills and restarts it; a job dropped
    # meanwhile is claimed by the new daemon. A drop-in shortens the watchdog so the test takes seconds.
    box.put("/etc/systemd/system/dropq.service.d", {"watchdog.conf": b"[Service]\nWatchdogSec=4\n"})
    box.sh("systemctl daemon-reload && systemctl restart dropq")
    pid = _prop(box, "dropq", "MainPID")
    restarts = int(_prop(box, "dropq", "NRestarts"))
    box.sh("systemctl kill --kill-who=main --signal=SIGSTOP dropq")
    _drop(box, "/srv/dropq/inbox", "j2", args=["after", "the", "watchdog"])
    box.wait_for("systemctl show dropq -p NRestarts --value", lambda out: int(out.strip() or 0) > restarts,
                 timeout=60)
    result = _result(box, "/srv/dropq/outbox", "j2")
    assert result["status"] == "succeeded", result
    box.wait_for("systemctl show dropq -p ActiveState --value", lambda out: out.strip() == "active")
    assert _prop(box, "dropq", "MainPID") not in ("0", pid)
    assert "Watchdog timeout" in box.sh("journalctl -u dropq --no-pager -o cat")

    box.sh("systemctl stop dropq")
    assert _prop(box, "dropq", "ActiveState") == "inactive"
    assert _prop(box, "dropq", "Result") == "success"
    assert "stopped" in box.sh("journalctl -u dropq --no-pager -o cat -n 5")

    # the 0.1.0 unit gave inbox, outbox and state a bind mount each: the daemon now refuses that at
    # start, with one line, and the unit fails instead of restarting for ever (RestartPreventExitStatus)
    box.put("/etc/systemd/system/dropq.service.d", {"split.conf": (
        b"[Service]\nReadWritePaths=\nReadWritePaths=/srv/dropq/inbox /srv/dropq/outbox /srv/dropq/state\n")})
    box.sh("systemctl daemon-reload")
    code, _ = box.run("systemctl start dropq")
    assert code != 0
    assert _prop(box, "dropq", "ActiveState") == "failed"
    assert _prop(box, "dropq", "NRestarts") == "0"
    journal = box.sh("journalctl -u dropq --no-pager -o cat -n 20")
    assert "are on different mounts" in journal and "ReadWritePaths" in journal, journal
    box.sh("rm -r /etc/systemd/system/dropq.service.d && systemctl daemon-reload && systemctl reset-failed dropq")


def test_a_workspace_that_does_not_exist_yet(box: Box) -> None:
    _config(box, "/srv/fresh", programs="/opt/dropq/programs")
    said = box.sh("/opt/dropq/.venv/bin/dropq --config /srv/fresh/config.yaml service install --now "
                  "--name dropq-fresh")
    assert "made /srv/fresh/inbox" in said, said
    assert _prop(box, "dropq-fresh", "ActiveState") == "active"
    _drop(box, "/srv/fresh/inbox", "first", args=["fresh"])
    assert _result(box, "/srv/fresh/outbox", "first")["status"] == "succeeded"
    box.sh("systemctl disable --now dropq-fresh")


def test_an_editable_install_and_workspace_under_home_run_as_that_user(box: Box) -> None:
    box.sh("id alice >/dev/null 2>&1 || useradd -m alice")
    box.copy_checkout(ROOT, "/home/alice/dropq")
    box.sh("chown -R alice: /home/alice/dropq")
    box.sh("cd /home/alice/dropq && python3 -m venv .venv && "
           ".venv/bin/pip install -q --no-index --find-links /wheels -e .", user="alice")
    _config(box, "/home/alice/work", owner="alice", programs="/home/alice/dropq/programs")
    said = box.sh("/home/alice/dropq/.venv/bin/dropq --config /home/alice/work/config.yaml service install "
                  "--now --user alice --name dropq-home")
    assert "started dropq-home.service" in said, said
    unit = box.sh("cat /etc/systemd/system/dropq-home.service")
    assert "ProtectHome=tmpfs" in unit and "BindReadOnlyPaths=/home/alice/dropq" in unit, unit
    _drop(box, "/home/alice/work/inbox", "mine", args=["as", "alice"], user="alice")
    result = _result(box, "/home/alice/work/outbox", "mine")
    assert result["status"] == "succeeded", result
    owner = box.sh("stat -c %U /home/alice/work/outbox/mine/result.yaml").strip()
    assert owner == "alice"
    box.sh("systemctl disable --now dropq-home")


def test_a_non_editable_install_with_a_workspace_under_tmp(box: Box) -> None:
    # a plain (non-editable) install into a virtualenv of its own: the unit needs only that venv
    box.sh("python3 -m venv /opt/plain && /opt/plain/bin/pip install -q --no-index --find-links /wheels /opt/dropq")
    assert "site-packages" in box.sh("/opt/plain/bin/python -c 'import dropq; print(dropq.__file__)'")
    _config(box, "/tmp/dqws", programs="/opt/dropq/programs")
    said = box.sh("/opt/plain/bin/dropq --config /tmp/dqws/config.yaml service install --now "
                  "--name dropq-tmp")
    assert "warning: the workspace /tmp/dqws is under a temporary folder" in said, said
    unit = box.sh("cat /etc/systemd/system/dropq-tmp.service")
    assert "PrivateTmp=yes" not in unit and "ExecStart=/opt/plain/bin/dropq " in unit, unit
    _drop(box, "/tmp/dqws/inbox", "t1", args=["in", "tmp"])
    assert _result(box, "/tmp/dqws/outbox", "t1")["status"] == "succeeded"
    box.sh("systemctl disable --now dropq-tmp")


def test_install_refuses_a_user_that_does_not_exist(box: Box) -> None:
    _config(box, "/srv/nouser", programs="/opt/dropq/programs")
    code, said = box.run("/opt/dropq/.venv/bin/dropq --config /srv/nouser/config.yaml service install "
                         "--user nobody-here --name dropq-nouser")
    assert code != 0 and "there is no user 'nobody-here'" in said, said
    assert box.run("test -e /etc/systemd/system/dropq-nouser.service")[0] != 0
