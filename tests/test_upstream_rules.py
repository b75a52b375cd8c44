"""Pipelines' rules in milliseconds: the manifest keys (`after:`, `outbox:` inputs) and an Intake driven
without its thread (`run_pending`) on a clock the test moves, with a real Store, a real Committer and
Outbox (driven by `run_pending` too) and real files. End to end, with a daemon: test_pipelines.py."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dropq.config import Config, JobDefaults
from dropq.errors import ManifestError, UnsafePathError
from dropq.intake.claim import Intake, IntakeHooks
from dropq.intake.inputs import Settled
from dropq.intake.manifest import Manifest
from dropq.intake.watcher import Arrival
from dropq.publish.committer import Committer
from dropq.publish.outbox import Outbox
from dropq.queue.jobs import JobStatus
from dropq.queue.store import JobRecord, Store

ROOT = Path(__file__).resolve().parent.parent


def parse(text: str) -> Manifest:
    return Manifest.parse(text.encode(), defaults=JobDefaults(), max_bytes=65536)


# --- the manifest keys ----------------------------------------------------------------------------------

def test_after_and_outbox_inputs_make_the_upstream_list_and_the_placed_inputs() -> None:
    m = parse("program: concat\ninput: outbox:b/output/b.txt\ninputs: [local.csv, 'outbox:c/./stdout.txt']\n"
              "after: [a, b]\n")
    assert m.after == ("a", "b", "c"), "after first, then the jobs outbox: inputs read from, each once"
    assert m.inputs == ("outbox/b/output/b.txt", "local.csv", "outbox/c/stdout.txt")
    assert m.from_outbox == ("b/output/b.txt", "c/stdout.txt")
    assert m.inbox_inputs() == ("local.csv",)
    assert Manifest.from_json(m.to_json()) == m


def test_a_manifest_stored_before_pipelines_still_reads() -> None:
    m = parse("program: echo\ninput: x.txt\n")
    old = m.to_json().replace(',"after":[],"from_outbox":[]', "")
    assert "after" not in old
    assert Manifest.from_json(old) == m


@pytest.mark.parametrize(("text", "message"), [
    ("after: prep", "`after` must be a list of job ids, e.g. after: [prep, fetch]"),
    ("after: [1]", "every item of `after` must be a string, not int"),
    ("after: [prep, prep]", "`after` names the same job twice"),
    ("after: ['a/b']", "`after` names 'a/b', which is not a job id"),
    ("after: ['..']", "`after` names '..', which is not a job id"),
    ("after: ['.hidden']", "`after` names '.hidden', which is not a job id"),
    ("after: ['']", "`after` names '', which is not a job id"),
    (f"after: [{'x' * 201}]", "`after` names a job id longer than 200 bytes"),
    ("input: 'outbox:prep'", "input 'outbox:prep' must name a file in a job's outbox folder"),
    ("input: 'outbox:.x/out.txt'", "input 'outbox:.x/out.txt' names '.x', which is not a job id"),
    ("inputs: ['outbox:p/x', 'outbox/p/x']", "inputs 'outbox:p/x' and 'outbox/p/x' would both be inputs/outbox/p/x"),
    ("inputs: ['outbox:p/x', 'outbox:p//x']", "the same input file is named twice"),
])
def test_bad_pipeline_keys_are_refused_naming_the_key(text: str, message: str) -> None:
    with pytest.raises(ManifestError) as caught:
        parse(f"program: echo\n{text}\n")
    assert str(caught.value).startswith(message), str(caught.value)


@pytest.mark.parametrize("item", ["outbox:../etc/passwd", "outbox:/etc/passwd", "outbox:p/../../x"])
def test_an_outbox_input_that_would_leave_its_folder_is_an_unsafe_path(item: str) -> None:
    with pytest.raises(UnsafePathError):
        parse(f"program: echo\ninput: '{item}'\n")


# --- the intake, driven by the test -----------------------------------------------------------------------

class Rig:
    def __init__(self, root: Path) -> None:
        self.t = time.time()
        self.config = Config.from_mapping({"intake": {"settle": 2, "rescan": 30, "input_grace": 10}}, base=root)
        for folder in (self.config.inbox, self.config.outbox, self.config.spool):
            folder.mkdir(parents=True)
        shutil.copytree(ROOT / "programs", self.config.programs)
        self.store = Store(self.config.database)
        self.published: list[str] = []
        self.intake = self.make_intake()

    def now(self) -> float:
        return self.t

    def make_intake(self) -> Intake:
        """An Intake (and its committer) on the rig's store: made again, it is a daemon's restart."""
        outbox = Outbox(root=self.config.outbox, spool=self.config.spool, store=self.store,
                        on_published=self._on_published)
        self.committer = Committer(outbox=outbox)
        return Intake(config=self.config, store=self.store, committer=self.committer, inbox=_NoWriters(),
                      hooks=IntakeHooks(notify=lambda: None, cancel=lambda job_id: "not here"), now=self.now)

    def _on_published(self, job: JobRecord) -> None:
        self.published.append(job.id)
        self.intake.published(job)

    def drop(self, name: str, text: str) -> None:
        path = self.config.inbox / name
        path.write_text(text)
        self.intake.offer(name, Arrival.WHOLE)
        self.turn()

    def turn(self) -> None:
        """Let the intake and the committer do all they can, as their threads would."""
        for _ in range(10):
            self.intake.run_pending()
            self.committer.run_pending()

    def status(self, job_id: str) -> JobStatus:
        return self.store.get(job_id).status

    def run(self, job_id: str, status: JobStatus = JobStatus.SUCCEEDED, files: dict[str, str] | None = None,
            links: dict[str, str] | None = None) -> None:
        """Job `job_id`, queued, runs and ends with `status`; `files` (and symlinks, `links`) are what its
        output/ holds when the intake hears that it ended."""
        job = self.store.take_next("w1")
        assert job is not None and job.id == job_id, job
        self.committer.finish(job_id, {"status": status.value, "exit_code": 0 if status is JobStatus.SUCCEEDED else 1,
                                       "finished_at": self.t})
        self.committer.run_pending()
        for rel, text in (files or {}).items():
            path = self.config.outbox / job_id / "output" / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        for rel, target in (links or {}).items():
            (self.config.outbox / job_id / "output" / rel).symlink_to(target)
        self.turn()


class _NoWriters:
    """The watcher's view of writers: nothing is being written."""

    def being_written(self, rel: str) -> bool:
        return False

    def mark_being_written(self, rel: str) -> None:
        pass

    def release_abandoned(self) -> list[str]:
        return []

    def open_now(self) -> set[tuple[int, int]] | None:
        return None


@pytest.fixture
def rig() -> Iterator[Rig]:
    root = Path(tempfile.mkdtemp(prefix="dq-upstream-"))
    r = Rig(root)
    r.intake.run_pending()
    yield r
    r.store.close()
    shutil.rmtree(root, ignore_errors=True)


def test_a_job_waits_for_its_upstream_then_gets_a_read_only_copy_of_its_output(rig: Rig) -> None:
    rig.drop("clean.yaml", "program: concat\ninput: outbox:prep/output/data/clean.csv\n")
    rig.drop("prep.yaml", "program: echo\n")
    assert rig.status("clean") is JobStatus.WAITING
    assert rig.store.waiting_reason(rig.store.get("clean")) == "waiting for prep"
    rig.run("prep", files={"data/clean.csv": "a,b\n"})
    assert rig.status("clean") is JobStatus.QUEUED
    copied = rig.config.spool / "clean" / "inputs" / "outbox" / "prep" / "output" / "data" / "clean.csv"
    upstream = rig.config.outbox / "prep" / "output" / "data" / "clean.csv"
    assert copied.read_text() == "a,b\n"
    assert stat.S_IMODE(os.stat(copied).st_mode) == 0o444
    assert os.stat(copied).st_ino != os.stat(upstream).st_ino
    assert upstream.read_text() == "a,b\n" and stat.S_IMODE(os.stat(upstream).st_mode) != 0o444


def test_an_upstream_that_ended_before_the_claim_lets_the_job_run_at_once(rig: Rig) -> None:
    rig.drop("prep.yaml", "program: echo\n")
    rig.run("prep", files={"x.txt": "x\n"})
    rig.drop("next.yaml", "program: concat\ninput: outbox:prep/output/x.txt\nafter: [prep]\n")
    assert rig.status("next") is JobStatus.QUEUED


def test_a_failure_cancels_the_chain_below_it_naming_the_first_that_failed(rig: Rig) -> None:
    rig.drop("a.yaml", "program: fail\n")
    rig.drop("b.yaml", "program: echo\nafter: [a]\n")
    rig.drop("c.yaml", "program: echo\nafter: [b]\n")
    rig.drop("d.yaml", "program: echo\nafter: [c, other]\n")
    rig.drop("other.yaml", "program: sleep\n")
    rig.run("a", JobStatus.FAILED)
    assert [rig.status(j) for j in "bcd"] == [JobStatus.CANCELLED] * 3
    assert rig.store.get("b").error == "a failed, so this job did not run"
    assert rig.store.get("c").error == "a failed, so this job did not run (nor did b, which it runs after)"
    assert rig.store.get("d").error == "a failed, so this job did not run (nor did c, which it runs after)"
    assert rig.status("other") is JobStatus.QUEUED, "a job that is not downstream runs as usual"


@pytest.mark.parametrize(("status", "said"), [(JobStatus.TIMED_OUT, "up timed out"),
                                              (JobStatus.CANCELLED, "up was cancelled")])
def test_each_way_of_not_succeeding_is_named(rig: Rig, status: JobStatus, said: str) -> None:
    rig.drop("up.yaml", "program: echo\n")
    rig.drop("down.yaml", "program: echo\nafter: [up]\n")
    rig.run("up", status)
    assert rig.store.get("down").error == f"{said}, so this job did not run"


def test_a_rejected_upstream_cancels_its_downstream(rig: Rig) -> None:
    rig.drop("down.yaml", "program: echo\nafter: [broken]\n")
    rig.drop("broken.yaml", "program: echo\nnot_a_key: 1\n")
    assert rig.status("broken") is JobStatus.REJECTED
    assert rig.store.get("down").error == "broken was rejected, so this job did not run"


def test_an_unknown_upstream_is_waited_for_the_grace_then_the_job_is_rejected_naming_it(rig: Rig) -> None:
    rig.drop("down.yaml", "program: echo\nafter: [known, ghost]\n")
    rig.drop("known.yaml", "program: echo\n")
    rig.t += 9.9
    rig.turn()
    assert rig.status("down") is JobStatus.WAITING
    rig.t += 0.2
    rig.turn()
    down = rig.store.get("down")
    assert down.status is JobStatus.REJECTED
    assert down.error is not None and down.error.startswith("the job runs after 'ghost', but no job 'ghost' was "
                                                            "dropped within 10 seconds of this manifest")


def test_an_upstream_claimed_within_the_grace_is_waited_for_as_long_as_it_takes(rig: Rig) -> None:
    rig.drop("down.yaml", "program: echo\nafter: [slow]\n")
    rig.t += 9
    rig.drop("slow.yaml", "program: sleep\n")
    rig.t += 3600
    rig.turn()
    assert rig.status("down") is JobStatus.WAITING
    rig.run("slow")
    assert rig.status("down") is JobStatus.QUEUED


def test_a_job_after_itself_is_rejected(rig: Rig) -> None:
    rig.drop("loop.yaml", "program: echo\nafter: [loop]\n")
    assert rig.status("loop") is JobStatus.REJECTED
    assert "names itself in `after`" in (rig.store.get("loop").error or "")


def test_a_cycle_is_rejected_when_it_closes_and_the_jobs_in_it_cancelled(rig: Rig) -> None:
    rig.drop("x.yaml", "program: echo\nafter: [y]\n")
    rig.drop("y.yaml", "program: echo\nafter: [z]\n")
    rig.drop("z.yaml", "program: echo\nafter: [x]\n")
    assert rig.status("z") is JobStatus.REJECTED
    assert rig.store.get("z").error == "`after` makes a cycle: z -> x -> y -> z; none of these jobs could ever run"
    assert rig.store.get("y").error == "z was rejected, so this job did not run"
    assert rig.store.get("x").error == "z was rejected, so this job did not run (nor did y, which it runs after)"


def test_a_file_missing_from_a_succeeded_upstream_rejects_the_job_naming_it(rig: Rig) -> None:
    rig.drop("down.yaml", "program: concat\ninputs: [outbox:up/stdout.txt, outbox:up/output/gone.csv]\n")
    rig.drop("up.yaml", "program: echo\n")
    rig.run("up")
    down = rig.store.get("down")
    assert down.status is JobStatus.REJECTED
    assert down.error == ("input 'outbox:up/output/gone.csv' is not there: job up succeeded, but its outbox "
                          "folder has no output/gone.csv")


@pytest.mark.parametrize("link_to", ["/etc/passwd", "../../other/stdout.txt", "ok.txt"])
def test_a_symlink_in_an_upstream_folder_is_never_followed(rig: Rig, link_to: str) -> None:
    rig.drop("other.yaml", "program: echo\n")
    rig.run("other")
    rig.drop("down.yaml", "program: concat\ninputs: [outbox:up/output/link.txt]\n")
    rig.drop("up.yaml", "program: echo\n")
    # made after the commit (which drops a program's symlinks), before the intake looks: as a person might
    rig.run("up", files={"ok.txt": "ok\n"}, links={"link.txt": link_to})
    down = rig.store.get("down")
    assert down.status is JobStatus.REJECTED
    assert down.error is not None and "symlink" in down.error, down.error
    assert not (rig.config.spool / "down" / "inputs" / "outbox").exists()
    assert not (rig.config.outbox / "down" / "inputs" / "outbox").exists()


def test_a_folder_symlink_on_the_way_to_an_upstream_file_is_never_followed(rig: Rig) -> None:
    rig.drop("down.yaml", "program: concat\ninputs: [outbox:up/output/sub/hostname]\n")
    rig.drop("up.yaml", "program: echo\n")
    rig.run("up", links={"sub": "/etc"})
    down = rig.store.get("down")
    assert down.status is JobStatus.REJECTED
    assert down.error is not None and "leads outside its folder through a symlink" in down.error, down.error


def test_a_waiting_job_cancelled_by_a_person_is_forgotten_and_its_downstream_cancelled(rig: Rig) -> None:
    rig.drop("mid.yaml", "program: echo\nafter: [up]\n")
    rig.drop("low.yaml", "program: echo\nafter: [mid]\n")
    rig.drop("up.yaml", "program: echo\n")
    rig.committer.finish("mid", {"status": "cancelled", "error": "the job was cancelled before it ran",
                                 "exit_code": None, "finished_at": rig.t})
    rig.turn()
    assert rig.store.get("low").error == "mid was cancelled, so this job did not run"
    assert not rig.intake.upstreams.awaited("mid"), "nothing waits for it, and it waits no more"
    rig.run("up")
    assert rig.status("mid") is JobStatus.CANCELLED


def test_a_job_that_ends_wakes_only_the_jobs_that_name_it(rig: Rig) -> None:
    rig.drop("down.yaml", "program: echo\nafter: [up]\n")
    for i in range(20):
        rig.drop(f"other{i}.yaml", "program: echo\n")
    rig.drop("up.yaml", "program: echo\n")
    handed: list[str] = []
    real = rig.intake.upstreams.published

    def spy(job_id: str) -> Iterator[Settled]:
        handed.append(job_id)
        return real(job_id)

    rig.intake.upstreams.published = spy  # type: ignore[method-assign]
    for i in range(20):
        rig.run(f"other{i}")
    assert handed == [], "no job waits for these: the intake's thread never hears of them"
    rig.run("up")
    assert handed == ["up"] and rig.status("down") is JobStatus.QUEUED


def test_a_restart_rebuilds_the_wait_from_the_store(rig: Rig) -> None:
    rig.drop("down.yaml", "program: concat\ninput: outbox:up/output/r.txt\n")
    rig.drop("up.yaml", "program: echo\n")
    rig.intake = rig.make_intake()  # a new daemon on the same state: nothing in memory survives
    rig.intake.recover()
    rig.turn()
    assert rig.status("down") is JobStatus.WAITING
    rig.t += 3600  # the grace is long past, but the job it waits for is known: it waits on
    rig.turn()
    assert rig.status("down") is JobStatus.WAITING
    # a copy the last run began (and a crash cut short) is made again, not trusted
    fetched = rig.config.spool / "down" / "inputs" / "outbox" / "up" / "output"
    fetched.mkdir(parents=True)
    (fetched / ".r.txt.fetch").write_text("half")
    (fetched / ".r.txt.fetch").chmod(0o444)
    rig.run("up", files={"r.txt": "restarted\n"})
    assert rig.status("down") is JobStatus.QUEUED
    assert os.listdir(fetched) == ["r.txt"]
    assert (fetched / "r.txt").read_text() == "restarted\n"


def test_a_restart_keeps_the_grace_of_an_unknown_upstream(rig: Rig) -> None:
    rig.drop("down.yaml", "program: echo\nafter: [ghost]\n")
    rig.t += 5
    rig.intake = rig.make_intake()
    rig.intake.recover()
    rig.turn()
    assert rig.status("down") is JobStatus.WAITING
    rig.t += 5.1  # the deadline counts from the claim, not from the restart
    rig.turn()
    assert rig.status("down") is JobStatus.REJECTED
