"""The balancer's rules in milliseconds (issue 19, item 7): a stub pool whose workers answer from a script,
a real store and outbox on a temporary folder, no worker process and no daemon. What is claimed end to
end (real workers) is in test_pipeline.py, test_slot_repair.py and the fault suite."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dropq.config import Config
from dropq.errors import JobRefused
from dropq.intake.manifest import Manifest
from dropq.pools.base import Incarnation, Pool, WorkerHandle
from dropq.pools.transport import Transport
from dropq.publish.committer import Committer
from dropq.publish.outbox import Outbox
from dropq.queue.balancer import Balancer
from dropq.queue.store import Store
from dropq_worker.protocol import PROTOCOL, Health, JobSpec, JobState, Outcome, Report


class StubTransport(Transport):
    """A worker that answers at once: `answer(spec)` says how each job ends (an exit code, or raises)."""

    def __init__(self, answer: Callable[[JobSpec], int]) -> None:
        super().__init__(socket_path="/nonexistent/stub.sock")
        self.answer = answer
        self.started: list[JobSpec] = []

    def start(self, spec: JobSpec, *, wait: float = 0.0) -> Report:
        self.started.append(spec)
        code = self.answer(spec)
        now = time.time()
        return Report(key=spec.key, state=JobState.DONE, started_at=now, outcome=Outcome.EXITED, exit_code=code,
                      finished_at=now)

    def forget(self, key: str) -> None:
        return None


class StubPool(Pool):
    kind = "stub"

    def __init__(self, root: Path, transports: list[StubTransport]) -> None:
        super().__init__()
        self.handles = [WorkerHandle(name=f"s{i + 1}", transport=t, jobs_dir=root / f"s{i + 1}" / "jobs",
                                     inputs_dir=root / f"s{i + 1}" / "inputs") for i, t in enumerate(transports)]
        for handle in self.handles:
            handle.jobs_dir.mkdir(parents=True)
            handle.inputs_dir.mkdir(parents=True)

    def start(self) -> None:
        return None

    def workers(self) -> list[WorkerHandle]:
        return list(self.handles)

    def ensure(self, name: str, *, timeout: float | None = None) -> Incarnation | None:
        return Incarnation(health=Health(pid=1, protocol=PROTOCOL, name=name), id="1")

    def stop(self) -> None:
        self._stopping.set()


class Rig:
    def __init__(self, root: Path, transports: list[StubTransport]) -> None:
        self.config = Config.from_mapping({"retry": {"base": 0, "cap": 0}}, base=root)
        for folder in (self.config.outbox, self.config.spool):
            folder.mkdir(parents=True)
        self.store = Store(self.config.database)
        self.outbox = Outbox(root=self.config.outbox, spool=self.config.spool, store=self.store)
        self.committer = Committer(outbox=self.outbox)
        self.pool = StubPool(root / "workers", transports)
        self.balancer = Balancer(config=self.config, store=self.store, pool=self.pool, committer=self.committer)

    def queue(self, job_id: str, **manifest: Any) -> None:
        self.store.add(job_id, source=f"{job_id}.yaml")
        (self.config.spool / job_id).mkdir()
        parsed = Manifest.from_mapping({"program": "p", **manifest}, defaults=self.config.jobs)
        self.store.set_manifest(job_id, parsed.to_json(), priority=parsed.priority, retries=parsed.retries,
                                deadline=None)
        self.store.queue_job(job_id)

    def run_until(self, *ids: str, timeout: float = 10.0) -> dict[str, str]:
        """Start the balancer and committer; wait until every job in `ids` has a final status."""
        self.committer.start()
        self.balancer.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            statuses = {i: self.store.get(i).status.value for i in ids}
            if all(s in ("succeeded", "failed", "cancelled", "timed_out", "rejected") for s in statuses.values()):
                return statuses
            time.sleep(0.01)
        raise AssertionError(f"not all ended: {statuses}")

    def close(self) -> None:
        self.balancer.stop()
        self.pool.stop()
        self.balancer.join()
        self.committer.stop()
        self.store.close()


@pytest.fixture
def rig_of(tmp_path: Path) -> Iterator[Callable[[list[StubTransport]], Rig]]:
    made: list[Rig] = []

    def make(transports: list[StubTransport]) -> Rig:
        made.append(Rig(tmp_path, transports))
        return made[-1]

    yield make
    for rig in made:
        rig.close()


def test_the_highest_priority_goes_first_and_the_oldest_within_a_priority(rig_of: Any) -> None:
    worker = StubTransport(lambda spec: 0)
    rig = rig_of([worker])
    rig.queue("first")
    rig.queue("urgent", priority=5)
    rig.queue("second")
    rig.queue("later-urgent", priority=5)
    assert set(rig.run_until("first", "urgent", "second", "later-urgent").values()) == {"succeeded"}
    assert [s.job_id for s in worker.started] == ["urgent", "later-urgent", "first", "second"]


def test_an_exit_code_the_manifest_retries_runs_again_until_its_retries_are_spent(rig_of: Any) -> None:
    worker = StubTransport(lambda spec: 75)
    rig = rig_of([worker])
    rig.queue("flaky", retries=2, retry_on_exit=[75])
    rig.queue("plain", retries=2)
    assert rig.run_until("flaky", "plain") == {"flaky": "failed", "plain": "failed"}
    assert [s.job_id for s in worker.started].count("flaky") == 3  # the first attempt and two retries
    assert [s.job_id for s in worker.started].count("plain") == 1  # 75 is no reason to retry it
    assert rig.store.get("flaky").attempts == 3


def test_a_refused_job_counts_an_attempt_and_each_attempt_has_its_own_key(rig_of: Any) -> None:
    def refuse(spec: JobSpec) -> int:
        raise JobRefused("this worker refuses every job")

    worker = StubTransport(refuse)
    rig = rig_of([worker])
    rig.queue("refused", retries=2)
    assert rig.run_until("refused") == {"refused": "failed"}
    keys = [s.key for s in worker.started]
    assert len(keys) == 3 and len(set(keys)) == 3, "a retried attempt never reuses the key of the one before"
    error = rig.store.get("refused").error or ""
    assert "lost 3 time(s)" in error and "this worker refuses every job" in error, error
