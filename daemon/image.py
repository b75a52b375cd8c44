"""Building the worker image: the ordinary Dockerfile path, and an offline path for hosts without a
container registry.

Offline, the base is made from Debian packages: debootstrap (minbase, with python3, python3-flask and
python3-waitress) into a temporary folder, imported with `docker import`, then the same Dockerfile is
built on it. Both steps are skipped when their result already exists; the worker image carries a
label with a digest of the worker's source, so it is rebuilt exactly when the source changed.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from .engine import engine_client
from .errors import DropqError, EngineUnavailable

log = logging.getLogger("dropq.image")

WORKER_DIR = Path(__file__).resolve().parent.parent / "worker"
BASE_IMAGE = "dropq-worker-base:bookworm"
BASE_PACKAGES = ("python3", "python3-flask", "python3-waitress")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
SOURCE_LABEL = "io.dropq.source"


class ImageError(DropqError):
    """The worker image could not be built."""


def source_digest(folder: Path = WORKER_DIR) -> str:
    """A digest of everything that goes into the image (so an edit to the worker means a rebuild)."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
            digest.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _client() -> Any:
    try:
        return engine_client(timeout=600)
    except EngineUnavailable as exc:
        raise ImageError(str(exc)) from None


def image_is_current(client: Any, tag: str) -> bool:
    import docker.errors

    try:
        image = client.images.get(tag)
    except docker.errors.ImageNotFound:
        return False
    return bool((image.labels or {}).get(SOURCE_LABEL) == source_digest())


def build(tag: str, *, offline: bool, mirror: str = DEFAULT_MIRROR, force: bool = False) -> str:
    """Build the worker image as `tag` unless it is already current. Returns what was done."""
    client = _client()
    if not force and image_is_current(client, tag):
        return f"{tag} is current (worker source {source_digest()}); nothing to do"
    base = None
    if offline:
        base = BASE_IMAGE
        if force or not _exists(client, base):
            build_offline_base(client, base, mirror=mirror)
    buildargs = {"BASE": base} if base else {}
    previous = _image_id(client, tag)
    log.info("building %s from %s", tag, WORKER_DIR / "Dockerfile")
    try:
        client.images.build(path=str(WORKER_DIR), tag=tag, buildargs=buildargs, rm=True, pull=False,
                            labels={SOURCE_LABEL: source_digest()}, network_mode="none" if offline else None)
    except Exception as exc:  # noqa: BLE001 - BuildError and APIError carry the build's own message
        raise ImageError(f"building {tag} failed: {exc}") from None
    done = f"built {tag} (worker source {source_digest()}){' on ' + base if base else ''}"
    if previous is not None and previous != _image_id(client, tag) and _remove_untagged(client, previous):
        done += f"; removed the image it replaced ({previous.removeprefix('sha256:')[:12]})"
    return done


def _image_id(client: Any, tag: str) -> str | None:
    import docker.errors

    try:
        return str(client.images.get(tag).id)
    except docker.errors.ImageNotFound:
        return None


def _remove_untagged(client: Any, image_id: str) -> bool:
    """Remove an image a rebuild left without a tag, so that upgrades do not pile up old worker images.
    One still tagged otherwise, or used by a container (a worker still running it), is kept."""
    import docker.errors

    try:
        if client.images.get(image_id).tags:
            return False
        client.images.remove(image_id, noprune=False)  # refused while a container uses it
    except docker.errors.APIError:
        return False
    return True


def _exists(client: Any, tag: str) -> bool:
    import docker.errors

    try:
        client.images.get(tag)
    except docker.errors.ImageNotFound:
        return False
    return True


def build_offline_base(client: Any, tag: str, *, mirror: str) -> None:
    debootstrap = shutil.which("debootstrap")
    if debootstrap is None:
        raise ImageError("the offline build needs debootstrap (apt-get install debootstrap) and root")
    with tempfile.TemporaryDirectory(prefix="dropq-rootfs-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        log.info("debootstrap: a minimal Debian bookworm with %s (about a minute)", ", ".join(BASE_PACKAGES))
        cmd = [debootstrap, "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", "bookworm",
               str(rootfs), mirror]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            tail = "\n".join((done.stdout + done.stderr).splitlines()[-15:])
            raise ImageError(f"debootstrap failed ({done.returncode}):\n{tail}")
        # apt's caches and lists are not needed in a worker image
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            shutil.rmtree(rootfs / junk, ignore_errors=True)
        archive = Path(tmp) / "rootfs.tar"
        subprocess.run(["tar", "-C", str(rootfs), "-cf", str(archive), "."], check=True)
        repository, _, version = tag.partition(":")
        log.info("importing the root filesystem as %s", tag)
        client.api.import_image(src=str(archive), repository=repository, tag=version or "latest")
