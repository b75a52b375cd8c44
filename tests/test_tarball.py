"""The tar streams between the daemon and its agents: what `unpack` refuses, and that what `pack` makes
comes back whole (fast unit tests; tests/test_agents.py sends them through a real daemon)."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path

import pytest

from dropq.errors import BadArchive
from dropq.pools.tarball import pack, programs_digest, receive, unpack


def _tar(*members: tarfile.TarInfo, data: bytes = b"x") -> io.BytesIO:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for info in members:
            if info.isreg():
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    out.seek(0)
    return out


def _info(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    return info


def test_what_pack_makes_unpacks_whole(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "output" / "deep").mkdir(parents=True)
    (src / "output" / "deep" / "a.txt").write_text("a")
    (src / "output" / "run.sh").write_text("#!/bin/sh\n")
    os.chmod(src / "output" / "run.sh", 0o755)
    (src / "stdout").write_text("out")
    os.symlink("/etc/passwd", src / "output" / "link")
    spool = io.BytesIO()
    digest, left_out = pack([("output", src / "output"), ("stdout", src / "stdout"), ("stderr", src / "none")], spool)
    assert left_out == ["output/link"], "a symlink is not sent, and the sender is told"
    assert digest == hashlib.sha256(spool.getvalue()).hexdigest()
    spool.seek(0)
    body = receive(spool, length=len(spool.getvalue()), sha256=digest, limit=1 << 20)
    target = tmp_path / "target"
    target.mkdir()
    with body:
        assert unpack(body, target, limit=1 << 20, tops=frozenset({"output", "stdout"})) == len("a") + 10 + 3
    assert (target / "output" / "deep" / "a.txt").read_text() == "a"
    assert os.stat(target / "output" / "run.sh").st_mode & 0o100
    assert not (target / "output" / "link").exists()


@pytest.mark.parametrize("members", [
    [_info("../escape")], [_info("/abs/escape")], [_info("a/../../escape")],
    [_info("link", tarfile.SYMTYPE, "/etc")], [_info("hard", tarfile.LNKTYPE, "/etc/passwd")],
    [_info("dev", tarfile.CHRTYPE)], [_info("fifo", tarfile.FIFOTYPE)],
    [_info("twice"), _info("twice")], [_info("both"), _info("both/x")],
])
def test_unpack_refuses_what_could_reach_outside_or_is_not_a_plain_file(tmp_path: Path,
                                                                          members: list[tarfile.TarInfo]) -> None:
    target = tmp_path / "in" / "target"
    target.mkdir(parents=True)
    with pytest.raises(BadArchive):
        unpack(_tar(*members), target, limit=1 << 20)
    assert not (tmp_path / "escape").exists() and not (tmp_path / "in" / "escape").exists()


def test_unpack_stops_at_its_size_limit_and_its_tops(tmp_path: Path) -> None:
    with pytest.raises(BadArchive, match="more than"):
        unpack(_tar(_info("big"), data=b"y" * 2000), tmp_path, limit=1000)
    with pytest.raises(BadArchive, match="not one of"):
        unpack(_tar(_info("elsewhere")), tmp_path, limit=1000, tops=frozenset({"output"}))


def test_receive_checks_length_limit_and_checksum() -> None:
    data = b"z" * 100
    good = hashlib.sha256(data).hexdigest()
    with pytest.raises(BadArchive, match="Content-Length"):
        receive(io.BytesIO(data), length=None, sha256=good, limit=1000)
    with pytest.raises(BadArchive, match="more than"):
        receive(io.BytesIO(data), length=100, sha256=good, limit=10)
    with pytest.raises(BadArchive, match="does not match"):
        receive(io.BytesIO(data), length=100, sha256="0" * 64, limit=1000)
    with pytest.raises(BadArchive, match="early"):
        receive(io.BytesIO(data[:50]), length=100, sha256=good, limit=1000)
    with receive(io.BytesIO(data), length=100, sha256=good, limit=1000) as body:
        assert body.read() == data


def test_the_programs_digest_changes_with_a_program(tmp_path: Path) -> None:
    (tmp_path / "p.py").write_text("print(1)\n")
    first = programs_digest(tmp_path)
    assert programs_digest(tmp_path) == first
    (tmp_path / "p.py").write_text("print(22)\n")
    assert programs_digest(tmp_path) != first
