"""Building the worker image: the ordinary Dockerfile path, and a path that makes the base image from
Debian packages, for hosts that reach a Debian mirror but no container registry.

From Debian, the base is debootstrap (minbase, with python3, python3-flask and python3-waitress) into a
temporary folder, imported with `docker import`; then the same Dockerfile is built on it, with no
network. Both steps are skipped when their result already exists; the worker image carries a label
with a digest of the worker's source, so it is rebuilt exactly when the source changed.

The source is the installed `dropq_worker` package (its modules, and its Dockerfile as package data),
so a wheel installed anywhere builds the same image as the checkout; the build context holds exactly
the files the digest covers.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import dropq_worker
from dropq.errors import DropqError, EngineUnavailable
from dropq.pools.engine import engine_client

log = logging.getLogger("dropq.image")

BASE_IMAGE = "dropq-worker-base:bookworm"
BASE_PACKAGES = ("python3", "python3-flask", "python3-waitress")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
SOURCE_LABEL = "io.dropq.source"
#: the files of the worker package that are not modules (package data in pyproject.toml)
DATA_FILES = ("Dockerfile", ".dockerignore")


class ImageError(DropqError):
    """The worker image could not be built."""


def worker_dir() -> Path:
    """The folder of the installed worker package, which the image is built from."""
    return Path(dropq_worker.__file__).resolve().parent


def source_files(folder: Path | None = None) -> list[Path]:
    """What goes into the image: the worker's modules, its Dockerfile and .dockerignore (package data),
    relative to `folder`.

    Fails loudly when one is missing (a dropq installed without its package data), rather than build
    an image from nothing and label it with the digest of nothing."""
    folder = worker_dir() if folder is None else folder
    modules = [p.relative_to(folder) for p in folder.rglob("*.py") if "__pycache__" not in p.parts]
    missing = [name for name in (*DATA_FILES, "__init__.py") if not (folder / name).is_file()]
    if missing:
        raise ImageError(f"the worker's sources are incomplete in {folder} (no {', '.join(missing)}): "
                         "reinstall dropq from a wheel or a checkout that has them")
    return sorted([*map(Path, DATA_FILES), *modules])


def source_digest(folder: Path | None = None) -> str:
    """A digest of everything that goes into the image (so an edit to the worker means a rebuild)."""
    folder = worker_dir() if folder is None else folder
    digest = hashlib.sha256()
    for rel in source_files(folder):
        digest.update(str(rel).encode() + b"\0" + (folder / rel).read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _context(into: Path) -> Path:
    """A build context with exactly the files the digest covers (no bytecode, nothing else nearby)."""
    folder = worker_dir()
    for rel in source_files(folder):
        (into / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(folder / rel, into / rel)
    return into


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


def build(tag: str, *, from_debian: bool, mirror: str = DEFAULT_MIRROR, force: bool = False,
          base_tag: str = BASE_IMAGE) -> str:
    """Build the worker image as `tag` unless it is already current. Returns what was done.

    With `from_debian`, the base image `base_tag` is made first (when missing, or with `force`) from the
    Debian packages at `mirror`; the worker image is then built on it without network."""
    client = _client()
    digest = source_digest()
    if not force and image_is_current(client, tag):
        return f"{tag} is current (worker source {digest}); nothing to do"
    base = None
    if from_debian:
        base = base_tag
        if force or not _exists(client, base):
            build_debian_base(client, base, mirror=mirror)
    buildargs = {"BASE": base} if base else {}
    previous = _image_id(client, tag)
    log.info("building %s from %s", tag, worker_dir() / "Dockerfile")
    with tempfile.TemporaryDirectory(prefix="dropq-context-") as tmp:
        try:
            client.images.build(path=str(_context(Path(tmp))), tag=tag, buildargs=buildargs, rm=True, pull=False,
                                labels={SOURCE_LABEL: digest}, network_mode="none" if from_debian else None)
        except Exception as exc:  # noqa: BLE001 - BuildError and APIError carry the build's own message
            raise ImageError(f"building {tag} failed: {exc}") from None
    done = f"built {tag} (worker source {digest}){' on ' + base if base else ''}"
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


def build_debian_base(client: Any, tag: str, *, mirror: str) -> None:
    """Make the base image `tag` from Debian packages: needs root, debootstrap, and the Debian mirror."""
    debootstrap = shutil.which("debootstrap")
    if debootstrap is None:
        raise ImageError("building from Debian packages needs debootstrap (apt-get install debootstrap) and root")
    with tempfile.TemporaryDirectory(prefix="dropq-rootfs-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        log.info("debootstrap from %s: a minimal Debian bookworm with %s (about a minute)", mirror,
                 ", ".join(BASE_PACKAGES))
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
