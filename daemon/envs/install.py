"""Building one environment: a virtualenv made and filled by uv, on this host (the local pool) or in a
build container from the worker image (the docker pool).

Why uv, not pip: bench/envs.py times both on the same dependency lists (README, "Programs and their
dependencies"); uv makes the environment several times faster, and it needs no pip inside the
environment or the image: its one static-enough binary (from the `uv` wheel dropq depends on) is
mounted into the build container read-only.

The environment is made where the workers will see it (state/envs/<id>/ on the host, /dropq/envs/<id>/
in a container, which is the same folder mounted), since a virtualenv records its own path.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from dropq.config import Config
from dropq.envs.spec import EnvSpec
from dropq.errors import EnvBuildError, EnvError

log = logging.getLogger("dropq.envs")

#: where the environments folder is mounted in worker and build containers
IN_ENVS = "/dropq/envs"
_IN_CACHE, _IN_UV, _IN_CA, _IN_WHEELS = "/dropq/cache", "/dropq/bin/uv", "/dropq/ca.pem", "/dropq/wheels"
#: a build's own files inside its environment folder: the requirements it installed, what it got
META = ".dropq"
#: the environment variable that marks a host build's processes with the folder they build
BUILD_MARKER = "DROPQ_ENV_BUILD"
LABEL_ROLE, LABEL_STATE = "io.dropq.role", "io.dropq.state"


class BuildInterrupted(EnvError):
    """The build was stopped before its end (the daemon stops): not a failure of the environment."""


@dataclass(frozen=True)
class IndexSettings:
    index_url: str | None = None
    find_links: Path | None = None
    no_index: bool = False
    #: allow building source distributions (their code runs where the build runs)
    sdists: bool = True

    def key(self) -> dict[str, Any]:
        """What of the index settings goes into an environment's id."""
        return {"index_url": self.index_url, "find_links": str(self.find_links) if self.find_links else None,
                "no_index": self.no_index, "sdists": self.sdists}


def index_settings(config: Config) -> IndexSettings:
    e = config.environments
    return IndexSettings(index_url=e.index_url, find_links=e.find_links, no_index=e.no_index, sdists=e.local_sdists)


class Installer(Protocol):
    """Builds environments for one pool's interpreter."""

    #: where packages come from (part of an environment's id)
    index: IndexSettings

    def target(self) -> dict[str, str]:
        """The interpreter and platform environments are built for (part of their id): with "python", its
        version, which a program's requires-python is checked against."""
        ...

    def build(self, env: str, spec: EnvSpec, folder: Path, log_file: BinaryIO, *, timeout: float,
              cancel: threading.Event) -> None:
        """Make the virtualenv `folder` (its id `env`) hold `spec`'s dependencies; EnvBuildError when it
        cannot, BuildInterrupted when `cancel` is set meanwhile. What the installer says goes to `log_file`."""
        ...


def uv_binary() -> Path:
    """uv from the `uv` wheel installed with dropq."""
    try:
        from uv import find_uv_bin
    except ImportError:
        found = shutil.which("uv")
        if found is None:
            raise EnvBuildError("uv is not installed (pip install uv): dropq builds environments with it") from None
        return Path(found)
    return Path(find_uv_bin())


def requirements_text(spec: EnvSpec) -> str:
    return "".join(f"{dependency}\n" for dependency in spec.dependencies)


def install_options(index: IndexSettings, *, wheels: str | None) -> list[str]:
    options = ["--no-config"]
    if index.index_url:
        options += ["--index-url", index.index_url]
    if wheels:
        options += ["--find-links", wheels]
    if index.no_index:
        options.append("--no-index")
    if not index.sdists:
        options += ["--only-binary", ":all:"]
    return options


class HostInstaller:
    """The local pool's environments: made on this host, with the interpreter the workers use."""

    def __init__(self, python: str, *, index: IndexSettings, cache: Path) -> None:
        self.python = shutil.which(python) or python
        self.index = index
        self.cache = cache
        self._target: dict[str, str] | None = None

    def target(self) -> dict[str, str]:
        if self._target is None:
            probe = ("import json, platform, sys, sysconfig; print(json.dumps({'python': platform.python_version(), "
                     "'implementation': sys.implementation.name, 'platform': sysconfig.get_platform(), "
                     "'executable': __import__('os').path.realpath(sys.executable)}))")
            try:
                done = subprocess.run([self.python, "-c", probe], capture_output=True, text=True, timeout=30)
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise EnvBuildError(f"the interpreter {self.python} did not run: {exc}") from None
            if done.returncode != 0:
                raise EnvBuildError(f"the interpreter {self.python} failed: {done.stderr.strip()[-300:]}")
            self._target = {"pool": "local", **json.loads(done.stdout)}
        return self._target

    def build(self, env: str, spec: EnvSpec, folder: Path, log_file: BinaryIO, *, timeout: float,
              cancel: threading.Event) -> None:
        uv = str(uv_binary())
        step = _Steps(log_file, time.monotonic() + timeout, cancel, marker=str(folder))
        meta = folder / META
        python = folder / "bin" / "python"
        wheels = str(self.index.find_links) if self.index.find_links else None
        step.run([uv, "venv", "--no-config", "--no-python-downloads", "--python", self.python, str(folder)],
                 what="making the virtualenv")
        meta.mkdir(exist_ok=True)
        (meta / "requirements.txt").write_text(requirements_text(spec))
        step.run([uv, "pip", "install", "--python", str(python), "--cache-dir", str(self.cache),
                  *install_options(self.index, wheels=wheels), "-r", str(meta / "requirements.txt")],
                 what="installing")
        step.run([uv, "pip", "freeze", "--no-config", "--python", str(python)], what="listing what was installed",
                 stdout=meta / "packages.txt")


class ContainerInstaller:
    """The docker pool's environments: made in a build container from the worker image, so that code an
    sdist runs at install time runs there, never on the host. The container reaches the package index (the
    only step that may), with the host's CA bundle for a TLS-intercepting proxy; jobs never do."""

    def __init__(self, *, image: str, envs: Path, index: IndexSettings, cache: Path, state: Path,
                 user: str, memory: str = "2g") -> None:
        self.image = image
        self.envs = envs
        self.index = index
        self.cache = cache
        self.state = state
        self.user = user
        self.memory = memory
        self._target: dict[str, str] | None = None

    def _client(self) -> Any:
        from dropq.pools.engine import engine_client

        return engine_client()

    def target(self) -> dict[str, str]:
        if self._target is None:
            import docker.errors

            client = self._client()
            try:
                image = client.images.get(self.image)
                out = client.containers.run(
                    image.id, entrypoint=["python3", "-c", "import platform, sysconfig; "
                                          "print(platform.python_version(), sysconfig.get_platform())"],
                    remove=True, network_mode="none", user=self.user, read_only=True, cap_drop=["ALL"],
                    security_opt=["no-new-privileges"], labels=self._labels())
            except docker.errors.DockerException as exc:
                raise EnvBuildError(f"the worker image {self.image} could not be asked its Python version: "
                                    f"{exc}") from None
            version, platform_name = out.decode().split()
            self._target = {"pool": "docker", "image": image.id, "python": version, "platform": platform_name}
        return self._target

    def _labels(self) -> dict[str, str]:
        return {LABEL_ROLE: "env-build", LABEL_STATE: str(self.state)}

    def build(self, env: str, spec: EnvSpec, folder: Path, log_file: BinaryIO, *, timeout: float,
              cancel: threading.Event) -> None:
        import docker.errors
        from docker.types import Mount

        inside = f"{IN_ENVS}/{env}"
        meta = folder / META
        meta.mkdir(parents=True, exist_ok=True)
        (meta / "requirements.txt").write_text(requirements_text(spec))
        uid, gid = (int(part) for part in self.user.split(":"))
        if os.geteuid() == 0:  # the build runs as an unprivileged uid, which must write these
            for path in (folder, meta, self.cache):
                os.chown(path, uid, gid)
        mounts = [Mount(inside, str(folder), type="bind", read_only=False),
                  Mount(_IN_CACHE, str(self.cache), type="bind", read_only=False),
                  Mount(_IN_UV, str(uv_binary()), type="bind", read_only=True)]
        environment = {"HOME": "/tmp", "UV_CACHE_DIR": _IN_CACHE, "UV_PYTHON_DOWNLOADS": "never"}
        ca = _ca_bundle()
        if ca is not None:
            mounts.append(Mount(_IN_CA, str(ca), type="bind", read_only=True))
            environment["SSL_CERT_FILE"] = _IN_CA
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy"):
            if name in os.environ:
                environment[name] = os.environ[name]
        if self.index.find_links is not None:
            mounts.append(Mount(_IN_WHEELS, str(self.index.find_links), type="bind", read_only=True))
        options = " ".join(install_options(self.index, wheels=_IN_WHEELS if self.index.find_links else None))
        script = (f"set -e\n"
                  f"{_IN_UV} venv --no-config --allow-existing --python /usr/bin/python3 {inside}\n"
                  f"{_IN_UV} pip install --python {inside}/bin/python {options} -r {inside}/{META}/requirements.txt\n"
                  f"{_IN_UV} pip freeze --no-config --python {inside}/bin/python > {inside}/{META}/packages.txt\n")
        client = self._client()
        try:
            container = client.containers.run(
                self.image, entrypoint=["/bin/sh", "-c", script], detach=True, labels=self._labels(),
                user=self.user, read_only=True, tmpfs={"/tmp": "rw,nosuid,nodev,size=512m,mode=1777"},
                cap_drop=["ALL"], security_opt=["no-new-privileges"], pids_limit=512, mem_limit=self.memory,
                memswap_limit=self.memory, mounts=mounts, environment=environment,
                network_mode="none" if self.index.no_index else "bridge")
        except docker.errors.DockerException as exc:
            raise EnvBuildError(f"the build container could not be started from {self.image}: {exc}") from None
        try:
            status = _wait_container(container, time.monotonic() + timeout, cancel)
            log_file.write(container.logs(stdout=True, stderr=True))
            log_file.flush()
        finally:
            try:
                container.remove(force=True)
            except docker.errors.DockerException as exc:
                log.warning("environment %s: its build container %s could not be removed: %s", env,
                            container.short_id, exc)
        if status is None:
            raise EnvBuildError(f"the build took longer than {timeout:g} seconds (environments.build_timeout)")
        if status != 0:
            raise EnvBuildError(installer_reason(log_file))


def _wait_container(container: Any, deadline: float, cancel: threading.Event) -> int | None:
    """The build container's exit status, or None when it ran past `deadline` (it is then killed)."""
    import requests

    while True:
        try:
            result = container.wait(timeout=1)
        except (requests.exceptions.ReadTimeout, requests.exceptions.ConnectionError):
            if cancel.is_set() or time.monotonic() >= deadline:
                container.kill()
                if cancel.is_set():
                    raise BuildInterrupted("the daemon is stopping") from None
                return None
            continue
        return int(result.get("StatusCode", 1))


def _ca_bundle() -> Path | None:
    """The host's CA bundle, which trusts what the host's own clients trust (a corporate proxy's CA too)."""
    for candidate in (os.environ.get("SSL_CERT_FILE"), "/etc/ssl/certs/ca-certificates.crt",
                      "/etc/pki/tls/certs/ca-bundle.crt"):
        if candidate and Path(candidate).is_file():
            return Path(candidate).resolve()
    return None


class _Steps:
    """The steps of a host build, each a process in its own session, stopped at the deadline or on cancel."""

    def __init__(self, log_file: BinaryIO, deadline: float, cancel: threading.Event, *, marker: str) -> None:
        self.log_file = log_file
        self.deadline = deadline
        self.cancel = cancel
        #: in each step's environment, so that a daemon restarted after a crash finds the steps its
        #: predecessor left running (orphan_builds) and kills them before it builds again
        self.marker = marker

    def run(self, argv: list[str], *, what: str, stdout: Path | None = None) -> None:
        self.log_file.write(f"$ {' '.join(argv)}\n".encode())
        self.log_file.flush()
        out = open(stdout, "wb") if stdout is not None else None
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out or self.log_file, stderr=self.log_file,
                                    start_new_session=True, env={**os.environ, "UV_PYTHON_DOWNLOADS": "never",
                                                                 BUILD_MARKER: self.marker})
            code = self._wait(proc, what)
        finally:
            if out is not None:
                out.close()
        self.log_file.flush()
        if code != 0:
            raise EnvBuildError(installer_reason(self.log_file) if what == "installing" else
                                f"{what} failed (exit code {code}); see env-build.log")

    def _wait(self, proc: subprocess.Popen[bytes], what: str) -> int:
        while True:
            try:
                return proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                if self.cancel.is_set() or time.monotonic() >= self.deadline:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    if self.cancel.is_set():
                        raise BuildInterrupted("the daemon is stopping") from None
                    raise EnvBuildError(f"{what} took longer than a build may (environments.build_timeout)") from None


def installer_reason(log_file: BinaryIO) -> str:
    """The installer's reason for a failure, in one sentence, from the end of the build log."""
    try:
        log_file.flush()
        with open(log_file.name, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 16384))
            tail = fh.read().decode("utf-8", errors="replace")
    except (OSError, AttributeError, TypeError):
        return "the installer failed; see env-build.log"
    return reason_from_log(tail)


def reason_from_log(tail: str) -> str:
    """uv's error, made one sentence: "could not install foo==1.0: no version of foo==1.0 was found"."""
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    # uv reports "error: ..." or "× No solution found when resolving dependencies:" then "╰─▶ Because ..."
    for index, line in enumerate(lines):
        if line.startswith("╰─▶") or line.startswith("error:") or line.startswith("×"):
            detail = " ".join(part.lstrip("╰─▶×│ ").strip() for part in lines[index:index + 4])
            return _one_sentence(detail)
    return _one_sentence(lines[-1]) if lines else "the installer failed without a message; see env-build.log"


def _one_sentence(text: str, limit: int = 400) -> str:
    text = " ".join(text.split())
    text = text.removeprefix("error: ").removeprefix("No solution found when resolving dependencies: ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def orphan_builds(envs: Path, *, containers: bool) -> int:
    """Kill what a daemon that died left building under `envs`: host build steps (found by their marker
    in /proc/<pid>/environ, readable for our own processes) and build containers (by label). Returns how
    many were stopped."""
    stopped = 0
    prefix = f"{BUILD_MARKER}={envs}/".encode()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as fh:
                marked = any(var.startswith(prefix) for var in fh.read().split(b"\0"))
            if marked:
                os.killpg(os.getpgid(int(entry.name)), signal.SIGKILL)
                stopped += 1
        except (OSError, ProcessLookupError):
            continue  # gone, or not ours to read
    return stopped + (_orphan_containers(envs.parent) if containers else 0)


def _orphan_containers(state: Path) -> int:
    from dropq.errors import EngineUnavailable
    from dropq.pools.engine import engine_client, engine_socket

    if engine_socket() is None:
        return 0
    try:
        client = engine_client(timeout=10)
    except EngineUnavailable:
        return 0
    import docker.errors

    try:
        found = client.containers.list(all=True, filters={"label": [f"{LABEL_ROLE}=env-build",
                                                                     f"{LABEL_STATE}={state}"]})
        for container in found:
            container.remove(force=True)
        return len(found)
    except docker.errors.DockerException as exc:
        log.warning("could not remove the build containers a previous daemon left: %s", exc)
        return 0
    finally:
        client.close()
