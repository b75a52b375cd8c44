"""Folders as tar streams between the daemon and its agents: a job's inputs go out, its result comes back.

Both ends distrust what they read: a tar from the network may name `../x`, an absolute path, a symlink, a
device or the same file twice, or be larger than announced. `receive` stores the body in a temporary
file while hashing it (bounded), checks the sha256 the sender announced, and `unpack` then writes only
regular files and folders, under the target folder, each made new (O_EXCL, no symlink followed).
"""

from __future__ import annotations

import hashlib
import os
import stat
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath
from typing import IO, BinaryIO

from dropq.errors import BadArchive

#: at most this many entries in one tar: a million empty files would cost the daemon inodes, not bytes
MAX_MEMBERS = 100_000
CHUNK = 1 << 20


def pack(entries: Iterable[tuple[str, Path]], out: IO[bytes]) -> tuple[str, list[str]]:
    """Write a tar of `entries` (name in the tar, path here: a file or a folder, taken whole) to `out`.
    Only regular files and folders are packed; the names of anything else (a symlink the program made)
    are returned, for the caller to say that they were left out. Returns (sha256 of the tar, left out)."""
    hashing = _Hashing(out)
    left_out: list[str] = []
    with tarfile.open(fileobj=hashing, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
        for arcname, path in entries:
            for name, item in _walk(arcname, path, left_out):
                info = tar.gettarinfo(str(item), arcname=name)
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                if info.isreg():
                    with open(item, "rb") as fh:
                        tar.addfile(info, fh)
                else:
                    tar.addfile(info)
    return hashing.digest.hexdigest(), left_out


def _walk(arcname: str, path: Path, left_out: list[str]) -> Iterator[tuple[str, Path]]:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISREG(mode):
        yield arcname, path
    elif stat.S_ISDIR(mode):
        yield arcname, path
        for entry in sorted(os.scandir(path), key=lambda e: e.name):
            yield from _walk(f"{arcname}/{entry.name}", Path(entry.path), left_out)
    else:
        left_out.append(arcname)


class _Hashing:
    """A write-only file that hashes what passes through it."""

    def __init__(self, out: IO[bytes]) -> None:
        self.out = out
        self.digest = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        return self.out.write(data)

    def flush(self) -> None:
        self.out.flush()


def receive(stream: BinaryIO, *, length: int | None, sha256: str | None, limit: int) -> IO[bytes]:
    """Read a tar body of `length` bytes (at most `limit`) into a temporary file, checking that its sha256
    is `sha256`; the file, at its start (the caller closes it). BadArchive otherwise."""
    if length is None:
        raise BadArchive("a tar body needs a Content-Length")
    if length > limit:
        raise BadArchive(f"the tar is {length} bytes, more than the {limit} allowed")
    if not sha256 or len(sha256) != 64:
        raise BadArchive("the tar's sha256 is missing")
    spool = tempfile.TemporaryFile()
    try:
        digest = hashlib.sha256()
        left = length
        while left > 0:
            chunk = stream.read(min(CHUNK, left))
            if not chunk:
                raise BadArchive(f"the tar ended {left} bytes early")
            digest.update(chunk)
            spool.write(chunk)
            left -= len(chunk)
        if digest.hexdigest() != sha256.lower():
            raise BadArchive("the tar's sha256 does not match: it was damaged on the way")
        spool.seek(0)
    except BaseException:
        spool.close()
        raise
    return spool


def unpack(source: IO[bytes], target: Path, *, limit: int, tops: frozenset[str] | None = None) -> int:
    """Unpack the tar in `source` into the (new, empty) folder `target`; the bytes written. Refuses (BadArchive)
    an absolute name, `..`, anything but a regular file or a folder, a name twice, more than MAX_MEMBERS entries,
    more than `limit` bytes in all, or (with `tops`) a first path part not in `tops`."""
    written = members = 0
    try:
        with tarfile.open(fileobj=source, mode="r|") as tar:  # type: ignore[call-overload]
            for member in tar:
                members += 1
                if members > MAX_MEMBERS:
                    raise BadArchive(f"the tar has more than {MAX_MEMBERS} entries")
                parts = _parts(member.name)
                if tops is not None and parts[0] not in tops:
                    raise BadArchive(f"the tar has {member.name!r}, which is not one of {sorted(tops)}")
                path = target.joinpath(*parts)
                if member.isdir():
                    _mkdirs(target, parts)
                    continue
                if not member.isreg():
                    raise BadArchive(f"the tar's entry {member.name!r} is not a regular file or a folder")
                written += member.size
                if written > limit:
                    raise BadArchive(f"the tar holds more than the {limit} bytes allowed")
                _mkdirs(target, parts[:-1])
                data = tar.extractfile(member)
                assert data is not None  # a regular file
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                             0o755 if member.mode & 0o100 else 0o644)
                with os.fdopen(fd, "wb") as out:
                    while chunk := data.read(CHUNK):
                        out.write(chunk)
    except FileExistsError as exc:
        raise BadArchive(f"the tar names {exc.filename} twice") from None
    except (tarfile.TarError, EOFError) as exc:
        raise BadArchive(f"not a readable tar: {exc}") from None
    return written


def _parts(name: str) -> tuple[str, ...]:
    pure = PurePosixPath(name)
    parts = tuple(p for p in pure.parts if p not in ("", "."))
    if pure.is_absolute() or not parts or ".." in parts or any("\0" in p for p in parts):
        raise BadArchive(f"the tar's entry {name!r} points outside its folder")
    return parts


def _mkdirs(target: Path, parts: tuple[str, ...]) -> None:
    """Make target/parts..., each level a real folder (never through a symlink: none can be made here)."""
    path = target
    for part in parts:
        path = path / part
        try:
            os.mkdir(path, 0o755)
        except FileExistsError:
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                raise BadArchive(f"the tar makes {part!r} both a file and a folder") from None


def programs_digest(folder: Path) -> str:
    """What changes when a program in `folder` does: names, sizes and modification times."""
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            try:
                info = os.lstat(path)
            except FileNotFoundError:
                continue
            rel = os.path.relpath(path, folder)
            digest.update(f"{rel}\0{info.st_size}\0{info.st_mtime_ns}\0{info.st_mode}\n".encode())
    return digest.hexdigest()
