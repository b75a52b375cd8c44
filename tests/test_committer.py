"""Unit tests of the committer, the one path by which every finished job reaches the outbox: a real Store
on a temporary SQLite file, a real Outbox, real files. The daemon-level version (a rejection whose
publish fails makes the daemon unhealthy) is in test_systemd.py."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from dropq.errors import StoreError
from dropq.publish.committer import Committer
from dropq.publish.outbox import Outbox
from dropq.queue.jobs import JobStatus
from dropq.queue.store import Store


@pytest.fixture
def committer(tmp_path: Path) -> Iterator[Committer]:
    store = Store(tmp_path / "db.sqlite3")
    (tmp_path / "outbox").mkdir()
    c = Committer(outbox=Outbox(root=tmp_path / "outbox", spool=tmp_path / "spool", store=store))
    yield c
    c.stop()
    store.close()


def claimed(committer: Committer, job_id: str) -> None:
    """A job as the intake leaves it: claimed into the spool, waiting for its inputs."""
    spool = committer.outbox.spool / job_id
    spool.mkdir(parents=True)
    (spool / "manifest.yaml").write_text("program: echo\n")
    committer.store.add(job_id, source=f"{job_id}.yaml")


def ended(status: JobStatus, error: str | None) -> dict[str, object]:
    return {"status": status.value, "error": error, "exit_code": None, "finished_at": 1234.5}


def test_the_outcome_is_recorded_at_once_and_published_later(committer: Committer) -> None:
    claimed(committer, "bad")
    committer.finish("bad", ended(JobStatus.REJECTED, "unknown key 'x'"))
    job = committer.store.get("bad")
    # committing, and already showing what the published job will: a restart finishes the commit
    assert (job.status, job.error, job.finished_at) == (JobStatus.COMMITTING, "unknown key 'x'", 1234.5)
    assert not (committer.outbox.root / "bad").exists()
    committer.run_pending()
    job = committer.store.get("bad")
    assert (job.status, job.error, job.finished_at) == (JobStatus.REJECTED, "unknown key 'x'", 1234.5)
    result = yaml.safe_load((committer.outbox.root / "bad" / "result.yaml").read_text())
    assert (result["status"], result["error"]) == ("rejected", "unknown key 'x'")
    assert committer.trouble() is None


def test_stopping_publishes_every_job_finished_before(committer: Committer) -> None:
    committer.start()
    for n in range(20):
        claimed(committer, f"j{n}")
        committer.finish(f"j{n}", ended(JobStatus.CANCELLED, "the job was cancelled before it ran"))
    committer.stop()
    assert {committer.store.get(f"j{n}").status for n in range(20)} == {JobStatus.CANCELLED}
    assert sorted((committer.outbox.root).iterdir()) == sorted(committer.outbox.root / f"j{n}" for n in range(20))


@pytest.mark.parametrize(("status", "error"), [(JobStatus.REJECTED, "unknown key 'x'"),
                                               (JobStatus.CANCELLED, "the job was cancelled before it ran"),
                                               (JobStatus.FAILED, "the worker running this job was lost")])
def test_a_publish_that_fails_leaves_the_job_committing_and_says_why_whatever_ended_it(
        committer: Committer, status: JobStatus, error: str) -> None:
    """Before one committer, only a worker's result made the daemon unhealthy when its publish failed; a
    rejection or a cancel left the job committing under a daemon that looked healthy."""
    claimed(committer, "stuck")
    shutil.rmtree(committer.outbox.root)
    committer.outbox.root.write_text("not a folder\n")  # the commit's rename into it fails (ENOTDIR)
    committer.finish("stuck", ended(status, error))
    committer.run_pending()
    assert committer.store.get("stuck").status is JobStatus.COMMITTING
    trouble = committer.trouble()
    assert trouble is not None and trouble.startswith("publishing job stuck failed (")
    assert (committer.outbox.spool / "stuck" / "manifest.yaml").exists(), "the job's files were lost"


def test_a_job_that_ended_already_cannot_end_again(committer: Committer) -> None:
    claimed(committer, "once")
    committer.finish("once", ended(JobStatus.REJECTED, "no"))
    with pytest.raises(StoreError):
        committer.finish("once", ended(JobStatus.CANCELLED, "the job was cancelled before it ran"))
    committer.run_pending()
    assert committer.store.get("once").status is JobStatus.REJECTED
