"""A container booted with systemd as PID 1, for testing the installed unit under a real systemd.

The image is made from Debian packages (debootstrap, then `docker import`: no registry is reachable) and
kept between runs, rebuilt when the package list changes. Units that would touch the shared kernel
(sysctl, module loading, binfmt, udev) are masked in it. The container has no network; dropq is
installed into it from a wheelhouse downloaded on the host (a container cannot reach the package index
without the host's CA bundle), the way a user installs a checkout: a virtualenv and `pip install -e`.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

from helpers import exclusive

PACKAGES = ("systemd", "systemd-sysv", "dbus", "python3", "python3-venv", "procps")
MASKED = ("systemd-sysctl.service", "systemd-modules-load.service", "systemd-udevd.service",
          "systemd-udev-trigger.service", "systemd-remount-fs.service", "systemd-binfmt.service",
          "proc-sys-fs-binfmt_misc.automount", "proc-sys-fs-binfmt_misc.mount", "sys-kernel-config.mount",
          "sys-kernel-debug.mount", "sys-kernel-tracing.mount", "sys-fs-fuse-connections.mount",
          "dev-hugepages.mount", "dev-mqueue.mount", "getty@tty1.service", "console-getty.service",
          "systemd-firstboot.service", "systemd-hwdb-update.service", "systemd-random-seed.service",
          "systemd-timesyncd.service", "apt-daily.timer", "apt-daily-upgrade.timer", "e2scrub_reap.service",
          "systemd-pstore.service", "systemd-tmpfiles-clean.timer")
IMAGE = "dropq-systemd-test"
LABEL = "io.dropq.test"
MIRROR = "http://deb.debian.org/debian"


class BoxError(Exception):
    """The systemd test container could not be made (no debootstrap, no root, no mirror)."""


def image_tag() -> str:
    digest = hashlib.sha256("\0".join(PACKAGES + MASKED).encode()).hexdigest()[:12]
    return f"{IMAGE}:{digest}"


def ensure_image(client: Any) -> str:
    """The image, built when missing (about a minute), by one test process at a time."""
    with exclusive("systemd-image"):
        return _ensure_image(client)


def _ensure_image(client: Any) -> str:
    import docker.errors

    tag = image_tag()
    try:
        client.images.get(tag)
        return tag
    except docker.errors.ImageNotFound:
        pass
    debootstrap = shutil.which("debootstrap")
    if debootstrap is None or os.geteuid() != 0:
        raise BoxError("building the systemd test image needs root and debootstrap")
    with tempfile.TemporaryDirectory(prefix="dq-sdimg-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        done = subprocess.run([debootstrap, "--variant=minbase", f"--include={','.join(PACKAGES)}", "bookworm",
                               str(rootfs), MIRROR], capture_output=True, text=True)
        if done.returncode != 0:
            raise BoxError("debootstrap failed: " + "\n".join((done.stdout + done.stderr).splitlines()[-10:]))
        for unit in MASKED:
            link = rootfs / "etc/systemd/system" / unit
            link.unlink(missing_ok=True)
            link.symlink_to("/dev/null")
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            shutil.rmtree(rootfs / junk, ignore_errors=True)
        (rootfs / "etc/hostname").write_text("dq-systemd\n")
        archive = Path(tmp) / "rootfs.tar"
        subprocess.run(["tar", "-C", str(rootfs), "-cf", str(archive), "."], check=True)
        repository, _, version = tag.partition(":")
        client.api.import_image(src=str(archive), repository=repository, tag=version)
    return tag


def wheelhouse(root: Path) -> Path:
    """dropq's dependencies (and the build backend an editable install needs) as wheels, cached by the
    project's metadata, so that the container installs offline."""
    with exclusive("systemd-wheelhouse"):
        return _wheelhouse(root)


def _wheelhouse(root: Path) -> Path:
    pyproject = (root / "pyproject.toml").read_bytes()
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dropq-tests"
    folder = cache / f"wheelhouse-{hashlib.sha256(pyproject).hexdigest()[:12]}"
    if (folder / ".complete").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    # the container's Python is Debian bookworm's 3.11, as this interpreter must be for the wheels to fit
    for what in ([str(root)], ["setuptools>=68", "wheel"]):
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--dest", str(folder), *what],
                       check=True, capture_output=True, timeout=600)
    for built in folder.glob("dropq-*"):
        built.unlink()  # the project itself is installed from its checkout, not from here
    (folder / ".complete").touch()
    return folder


class Box:
    """One running systemd container; commands run in it with `sh`."""

    def __init__(self, client: Any, image: str, *, wheels: Path) -> None:
        name = f"dq-systemd-{os.getpid()}-{int(time.monotonic() * 1000) % 100000}"
        self.container = client.containers.run(
            image, ["/sbin/init"], name=name, detach=True, labels={LABEL: "systemd"},
            # what systemd needs as PID 1 in a container (--privileged is refused here); no network
            cap_add=["SYS_ADMIN", "SYS_PTRACE"], security_opt=["seccomp=unconfined"], cgroupns="host",
            network_mode="none", environment={"container": "docker"},
            tmpfs={"/run": "", "/run/lock": ""},
            volumes={"/sys/fs/cgroup": {"bind": "/sys/fs/cgroup", "mode": "rw"},
                     str(wheels): {"bind": "/wheels", "mode": "ro"}},
        )
        self.wait_for("systemctl is-system-running --wait >/dev/null 2>&1; systemctl is-system-running",
                      lambda out: out.strip() in ("running", "degraded"), timeout=60)

    def sh(self, script: str, *, check: bool = True, user: str | None = None) -> str:
        code, out = self.container.exec_run(["sh", "-c", script], user=user or "")
        text = out.decode(errors="replace")
        if check and code != 0:
            raise AssertionError(f"exit {code} from {script!r}:\n{text}")
        return text

    def run(self, script: str, *, user: str | None = None) -> tuple[int, str]:
        code, out = self.container.exec_run(["sh", "-c", script], user=user or "")
        return code, out.decode(errors="replace")

    def put(self, path: str, files: dict[str, bytes]) -> None:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for rel, data in files.items():
                info = tarfile.TarInfo(rel)
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))
        self.sh(f"mkdir -p {path}")
        self.container.put_archive(path, buf.getvalue())

    def copy_checkout(self, root: Path, dest: str) -> None:
        """The project's files as a clone has them (no virtualenv, caches or build output)."""
        listed = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others",
                                 "--exclude-standard"], capture_output=True, check=True).stdout
        names = [n for n in listed.decode().split("\0") if n and (root / n).is_file()]
        self.put(dest, {n: (root / n).read_bytes() for n in names})

    def wait_for(self, script: str, ok: Any, *, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        out = ""
        while time.monotonic() < deadline:
            _, out = self.run(script)
            if ok(out):
                return out
            time.sleep(0.2)
        raise AssertionError(f"timed out after {timeout}s waiting on {script!r}; last said:\n{out}")

    def remove(self) -> None:
        self.container.remove(force=True)
