"""Building the agent image: the whole of dropq (daemon, agent and worker) in a virtualenv in an image, for
`dropq agent` under Docker Swarm (deploy/swarm/stack.yml) and for the daemon beside it.

Like the worker image (dropq.pools.image) it needs no container registry: with `from_debian` it is built
on the Debian base made by debootstrap, and the build itself runs with no network. Everything it
installs is fetched first, on the host, by the host's own pip (so the host's index, proxy and CA settings
apply): a wheel of every dependency at exactly the version installed here, for the image's Python. The
dropq wheel itself is packed from the installed dropq, so a checkout and a wheel install build the same
image. In the image, pip (run from its own wheel) installs them all offline into /opt/dropq, and
`pip check` proves the set complete.

The image carries a label with a digest of the packed wheel and the pinned dependencies, so it is rebuilt
exactly when either changed.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import logging
import platform
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import dropq
import dropq_worker
from dropq.pools.image import (
    BASE_IMAGE,
    DEFAULT_MIRROR,
    SOURCE_LABEL,
    ImageError,
    _client,
    _exists,
    _image_id,
    _remove_untagged,
    build_debian_base,
)

log = logging.getLogger("dropq.image")

AGENT_IMAGE = "dropq-agent:latest"
#: the Python of both bases (Debian bookworm's python3, and python:3.11-slim): the wheels are fetched for it
IMAGE_PYTHON = (3, 11)
#: a fixed time for the packed wheel's entries, so that the same source packs to the same bytes
_EPOCH = (2020, 1, 1, 0, 0, 0)

DOCKERFILE = """\
# The dropq agent image (dropq image build --agent): the whole dropq in /opt/dropq, installed offline from
# the wheels in this context (fetched by the host's pip). Runs `dropq agent` (and can run `dropq run`).
ARG BASE=python:3.11-slim
FROM ${BASE}
COPY pip/ /tmp/pip/
COPY wheels/ /tmp/wheels/
# --without-pip: Debian's python3 has venv but not ensurepip; pip runs from its own wheel instead. One stage
# (the wheels stay in a layer): the classic builder would leave a multi-stage build's first stage untagged.
RUN set -e; pip=$(echo /tmp/pip/pip-*.whl)/pip; python3 -m venv --without-pip /opt/dropq; \
    /opt/dropq/bin/python "$pip" install --no-index --no-deps --no-cache-dir --no-compile /tmp/wheels/*.whl; \
    /opt/dropq/bin/python "$pip" check; \
    /opt/dropq/bin/dropq --help >/dev/null; \
    rm -rf /tmp/pip /tmp/wheels
ENV PATH=/opt/dropq/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
LABEL io.dropq.role="agent-image"
# root: with --pool docker the agent drives the host's engine through its socket (root-equivalent anyway)
USER 0:0
ENTRYPOINT ["dropq"]
CMD ["agent", "--help"]
"""


def _package_files() -> list[tuple[str, Path]]:
    """(name in the wheel, file) for every file of the installed dropq and dropq_worker packages."""
    files = []
    for module, name in ((dropq, "dropq"), (dropq_worker, "dropq_worker")):
        folder = Path(module.__file__ or "").resolve().parent
        for path in sorted(folder.rglob("*")):
            rel = path.relative_to(folder)
            if path.is_file() and "__pycache__" not in rel.parts and path.suffix != ".pyc":
                files.append((f"{name}/{rel.as_posix()}", path))
    return files


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def installed_dropq() -> importlib.metadata.Distribution:
    """The installed dropq's metadata (a .dist-info): not the dropq.egg-info that `pip install -e` leaves in a
    checkout, which importlib finds first when Python runs from there."""
    for dist in importlib.metadata.distributions(name="dropq"):
        if dist.read_text("METADATA") is not None:
            return dist
    raise ImageError("dropq is not installed (no dropq-*.dist-info on sys.path): install it with pip first")


def pack_wheel(into: Path) -> Path:
    """A wheel of the installed dropq (its files and metadata as installed), in `into`.

    Packed from the installation rather than built from a source tree: an installed wheel has no source
    tree, and an editable checkout's files are these very files."""
    dist = installed_dropq()
    version = dist.version
    info = f"dropq-{version}.dist-info"
    # its headers only (name, version, Requires-Dist, ...): the body is the README, which is no part of what runs,
    # and which an editable install keeps as it was when installed
    metadata = (dist.read_text("METADATA") or "").split("\n\n", 1)[0] + "\n"
    entries: list[tuple[str, bytes]] = [(arc, path.read_bytes()) for arc, path in _package_files()]
    entries.append((f"{info}/METADATA", metadata.encode()))
    entries.append((f"{info}/entry_points.txt", (dist.read_text("entry_points.txt") or "").encode()))
    entries.append((f"{info}/WHEEL", b"Wheel-Version: 1.0\nGenerator: dropq\nRoot-Is-Purelib: true\n"
                                     b"Tag: py3-none-any\n"))
    record = "".join(f"{arc},{_record_hash(data)},{len(data)}\n" for arc, data in entries) + f"{info}/RECORD,,\n"
    entries.append((f"{info}/RECORD", record.encode()))
    wheel = into / f"dropq-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", compression=zipfile.ZIP_DEFLATED) as out:
        for arc, data in entries:
            entry = zipfile.ZipInfo(arc, date_time=_EPOCH)
            entry.external_attr = 0o644 << 16
            entry.compress_type = zipfile.ZIP_DEFLATED
            out.writestr(entry, data)
    return wheel


def pinned_dependencies() -> list[str]:
    """Every distribution dropq needs at run time, transitively, as name==version at the versions installed
    here (the ones this host runs and tested), sorted."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins: dict[str, str] = {}
    todo: list[tuple[str, frozenset[str]]] = [("dropq", frozenset())]
    while todo:
        name, extras = todo.pop()
        try:
            requires = (installed_dropq().requires if name == "dropq" else importlib.metadata.requires(name)) or []
        except importlib.metadata.PackageNotFoundError:
            raise ImageError(f"{name}, which dropq needs, is not installed here: install dropq with its "
                             "dependencies first") from None
        for text in requires:
            req = Requirement(text)
            wanted = [{"extra": e} for e in extras] or [{"extra": ""}]
            if req.marker is not None and not any(req.marker.evaluate(env) for env in wanted):
                continue
            key = canonicalize_name(req.name)
            if key in pins:
                continue
            try:
                pins[key] = importlib.metadata.version(req.name)
            except importlib.metadata.PackageNotFoundError:
                raise ImageError(f"{req.name}, which dropq needs, is not installed here: install dropq with its "
                                 "dependencies first") from None
            todo.append((req.name, frozenset(req.extras)))
    return sorted(f"{name}=={version}" for name, version in pins.items())


def _platforms() -> list[str]:
    """The platform tags of wheels that run on the image (glibc 2.36 in bookworm; older manylinux too)."""
    arch = platform.machine()
    return [*(f"manylinux_2_{minor}_{arch}" for minor in range(36, 16, -1)), f"manylinux2014_{arch}",
            f"manylinux2010_{arch}", f"manylinux1_{arch}", f"linux_{arch}"]


def _pip_download(requirements: list[str], into: Path) -> None:
    major, minor = IMAGE_PYTHON
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           "--python-version", f"{major}.{minor}", "--implementation", "cp", "--abi", f"cp{major}{minor}",
           *(option for tag in _platforms() for option in ("--platform", tag)), "--dest", str(into), *requirements]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        lines = [line for line in (done.stdout + done.stderr).splitlines() if "WARNING: Location" not in line]
        if any("No module named pip" in line for line in lines):
            raise ImageError(f"the agent image's wheels are fetched with pip, and {sys.executable} has none: "
                             "run dropq from a virtualenv (which has its own pip)")
        raise ImageError("fetching the agent image's wheels failed (pip download, with this host's pip "
                         "settings):\n" + "\n".join(lines[-10:]))


def agent_digest(wheel: Path, pins: list[str]) -> str:
    """A digest of what goes into the image: the packed dropq wheel's files and the pinned dependencies."""
    digest = hashlib.sha256(DOCKERFILE.encode() + b"\0")
    with zipfile.ZipFile(wheel) as packed:
        for entry in sorted(packed.namelist()):
            digest.update(entry.encode() + b"\0" + packed.read(entry) + b"\0")
    digest.update("\n".join(pins).encode())
    return digest.hexdigest()[:16]


def current_digest() -> str:
    """The digest an agent image built now from this installation would carry."""
    with tempfile.TemporaryDirectory(prefix="dropq-agent-wheel-") as tmp:
        return agent_digest(pack_wheel(Path(tmp)), pinned_dependencies())


def agent_image_is_current(client: Any, tag: str) -> bool:
    return _labelled(client, tag, current_digest())


def build_agent(tag: str = AGENT_IMAGE, *, from_debian: bool, mirror: str = DEFAULT_MIRROR, force: bool = False,
                base_tag: str = BASE_IMAGE) -> str:
    """Build the agent image as `tag` unless it is already current. Returns what was done.

    With `from_debian`, on the base image `base_tag` (made from Debian packages at `mirror` when missing),
    and with no network in the build; otherwise on python:3.11-slim from a registry."""
    client = _client()
    with tempfile.TemporaryDirectory(prefix="dropq-agent-context-") as tmp:
        context = Path(tmp)
        (context / "wheels").mkdir()
        (context / "pip").mkdir()
        pins = pinned_dependencies()
        wheel = pack_wheel(context / "wheels")
        digest = agent_digest(wheel, pins)
        if not force and _labelled(client, tag, digest):
            return f"{tag} is current (agent source {digest}); nothing to do"
        base = None
        if from_debian:
            base = base_tag
            if force or not _exists(client, base):
                build_debian_base(client, base, mirror=mirror)
        log.info("fetching %d wheels for the agent image with this host's pip", len(pins) + 1)
        _pip_download(pins, context / "wheels")
        _pip_download([f"pip=={importlib.metadata.version('pip')}"], context / "pip")
        (context / "Dockerfile").write_text(DOCKERFILE)
        previous = _image_id(client, tag)
        log.info("building %s%s", tag, f" on {base}" if base else "")
        try:
            client.images.build(path=str(context), tag=tag, buildargs={"BASE": base} if base else {}, rm=True,
                                forcerm=True, pull=False, labels={SOURCE_LABEL: digest},
                                network_mode="none" if from_debian else None)
        except Exception as exc:  # noqa: BLE001 - BuildError and APIError carry the build's own message
            raise ImageError(f"building {tag} failed: {exc}{_build_log_tail(exc)}") from None
    done = f"built {tag} (agent source {digest}){' on ' + base if base else ''}"
    if previous is not None and previous != _image_id(client, tag) and _remove_untagged(client, previous):
        done += f"; removed the image it replaced ({previous.removeprefix('sha256:')[:12]})"
    return done


def _labelled(client: Any, tag: str, digest: str) -> bool:
    import docker.errors

    try:
        image = client.images.get(tag)
    except docker.errors.ImageNotFound:
        return False
    return bool((image.labels or {}).get(SOURCE_LABEL) == digest)


def _build_log_tail(exc: Exception) -> str:
    """The last lines the failed build printed (pip's own error), which the exception's message lacks."""
    lines = [str(chunk.get("stream", "")).rstrip() for chunk in getattr(exc, "build_log", None) or []
             if isinstance(chunk, dict)]
    lines = [line.replace("\x1b[91m", "").replace("\x1b[0m", "") for line in lines if line.strip()]
    return ("\n" + "\n".join(lines[-12:])) if lines else ""
