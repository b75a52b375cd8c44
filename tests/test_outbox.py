"""Unit tests of the outbox commit: idempotent after a crash at any point, and never following links."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from dropq.paths import collect_tree
from dropq.publish.outbox import Outbox
from dropq.queue.jobs import JobStatus
from dropq.queue.store import JobRecord, Store
from dropq_worker.protocol import Staging


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[Store, Outbox, Path]]:
    store = Store(tmp_path / "db.sqlite3")
    outbox = Outbox(root=tmp_path / "outbox", spool=tmp_path / "spool", store=store)
    (tmp_path / "outbox").mkdir()
    yield store, outbox, tmp_path
    store.close()


def committing_job(store: Store, tmp: Path, job_id: str = "job") -> JobRecord:
    (tmp / "spool" / job_id).mkdir(parents=True)
    (tmp / "spool" / job_id / "manifest.yaml").write_text("program: echo\n")
    store.add(job_id, source=f"{job_id}.yaml")
    return store.transition(job_id, JobStatus.COMMITTING, outcome={"status": "succeeded", "exit_code": 0})


def test_a_commit_run_again_after_the_rename_makes_no_second_folder(setup: tuple[Store, Outbox, Path]) -> None:
    store, outbox, tmp = setup
    job = committing_job(store, tmp)
    outbox.commit(job, staging=None, name="job")  # the crash: published, but the store never heard
    assert store.get("job").status is JobStatus.COMMITTING
    (tmp / "spool" / "job").mkdir()  # the clean-up after the rename had not run either
    outbox.finish(store.get("job"))  # what recovery does at the next start
    assert sorted(os.listdir(tmp / "outbox")) == ["job"]
    assert not (tmp / "spool" / "job").exists()
    assert store.get("job").status is JobStatus.SUCCEEDED


def test_a_commit_interrupted_half_way_completes_on_the_next_run(setup: tuple[Store, Outbox, Path]) -> None:
    store, outbox, tmp = setup
    job = committing_job(store, tmp)
    half = tmp / "outbox" / ".job.tmp"
    half.mkdir()
    os.rename(tmp / "spool" / "job" / "manifest.yaml", half / "manifest.yaml")  # moved, then the crash
    outbox.finish(job)
    assert (tmp / "outbox" / "job" / "manifest.yaml").read_text() == "program: echo\n"
    assert yaml.safe_load((tmp / "outbox" / "job" / "result.yaml").read_text())["status"] == "succeeded"
    assert not half.exists()


def test_the_spool_folder_and_the_staged_files_become_the_job_folder_by_renames(
        setup: tuple[Store, Outbox, Path]) -> None:
    store, outbox, tmp = setup
    job = committing_job(store, tmp)
    staging = Staging(tmp / "jobs", "j1-1")
    staging.output.mkdir(parents=True)
    (staging.output / "made.txt").write_text("made\n")
    staging.stdout.write_text("out\n")
    staging.stderr.write_text("err\n")
    moved = {name: os.stat(path).st_ino for name, path in (
        ("manifest.yaml", tmp / "spool" / "job" / "manifest.yaml"), ("output/made.txt", staging.output / "made.txt"),
        ("stdout.txt", staging.stdout), ("stderr.txt", staging.stderr))}
    outbox.finish(job, staging=staging)
    folder = tmp / "outbox" / "job"
    assert sorted(os.listdir(folder)) == ["inputs", "manifest.yaml", "output", "result.yaml", "stderr.txt",
                                          "stdout.txt"]
    assert {name: os.stat(folder / name).st_ino for name in moved} == moved, "moved, not copied"
    assert not (tmp / "spool" / "job").exists() and os.listdir(tmp / "jobs") == [], "nothing left behind"


def test_a_folder_someone_else_made_with_the_jobs_name_is_left_alone(setup: tuple[Store, Outbox, Path]) -> None:
    store, outbox, tmp = setup
    (tmp / "outbox" / "job").mkdir()
    (tmp / "outbox" / "job" / "theirs.txt").write_text("not ours")
    outbox.finish(committing_job(store, tmp))
    assert (tmp / "outbox" / "job" / "theirs.txt").read_text() == "not ours"
    assert yaml.safe_load((tmp / "outbox" / "job-2" / "result.yaml").read_text())["id"] == "job-2"


def test_collecting_output_drops_links_fifos_and_hardlinks_without_following_them(tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("host secret")
    out = tmp_path / "staging"
    (out / "sub").mkdir(parents=True)
    (out / "real.txt").write_text("kept")
    (out / "sub" / "deep.txt").write_text("kept too")
    os.symlink(outside, out / "link.txt")
    os.symlink("/", out / "sub" / "root")
    os.link(outside, out / "hard.txt")
    os.mkfifo(out / "fifo")
    dropped = collect_tree(out, tmp_path / "collected")
    assert dropped == ["fifo", "hard.txt", "link.txt", "sub/root"]
    assert sorted(p.name for p in (tmp_path / "collected").rglob("*")) == ["deep.txt", "real.txt", "sub"]
    assert outside.read_text() == "host secret"


#: a manifest named with a byte that is not UTF-8 (kept by Python as a lone surrogate), a retitle and a newline
HOSTILE_ID = "raw\udcff\x1b]0;pwned\x07two\nlines\u202e"


def test_result_yaml_of_a_job_with_a_hostile_name_is_written_and_reads_as_plain_text(
        setup: tuple[Store, Outbox, Path]) -> None:
    store, outbox, tmp = setup
    plain = committing_job(store, tmp, "plain")
    # The store cannot hold such an id (SQLite refuses surrogates), so the record is made here: what the
    # outbox must survive is whatever names reach it, and errors that echo a manifest's key.
    job = dataclasses.replace(plain, id=HOSTILE_ID, source=HOSTILE_ID + ".yaml", outcome={
        "status": "rejected", "error": "unknown key 'k\x1b[2J\udcfe'", "dropped": ["out/\udcfelink (a symlink)"]})
    (tmp / "spool" / HOSTILE_ID).mkdir(parents=True)
    folder = outbox.commit(job, staging=None, name=HOSTILE_ID)
    raw = (folder / "result.yaml").read_bytes()
    text = raw.decode("utf-8")  # strict: no undecodable byte in the file
    assert not [c for c in text if (ord(c) < 32 and c != "\n") or 0x7f <= ord(c) <= 0x9f or c == "\u202e"], text
    doc = yaml.safe_load(text)
    assert doc["id"] == "raw\\xff\\x1b]0;pwned\\x07two\\nlines\\u202e"
    assert doc["manifest"] == doc["id"] + ".yaml"
    assert doc["error"] == "unknown key 'k\\x1b[2J\\xfe'"
    assert doc["dropped"] == ["out/\\xfelink (a symlink)"]
    assert doc["key"] == outbox.key(job) and outbox.committed_here(job, HOSTILE_ID)
