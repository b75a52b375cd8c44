"""One contract, every pool: what the balancer relies on from a pool and its transport.

Real pools only: local worker processes, and containers on a real Docker engine.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dropq.config import Config
from dropq.errors import TransportError, UnknownJob, WorkerBusy
from dropq.pools import Incarnation, Pool, find_staging
from dropq.pools.transport import Transport
from dropq_worker.protocol import PROTOCOL, JobSpec, JobState, Outcome
from helpers import remove_containers

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(params=["local", pytest.param("docker", marks=pytest.mark.docker)])
def pool(request: pytest.FixtureRequest) -> Iterator[Pool]:
    root = Path(tempfile.mkdtemp(prefix="dqp-"))
    shutil.copytree(ROOT / "programs", root / "programs")
    data = {"workers": {"pool": request.param, "count": 2, "docker": {"on_shutdown": "remove"}}}
    if request.param == "docker":
        data["workers"]["docker"]["image"] = request.getfixturevalue("docker_image")
    config = Config.from_mapping(data, base=root)
    if request.param == "docker":
        from dropq.pools.docker import DockerPool

        made: Pool = DockerPool(config)
    else:
        from dropq.pools.local import LocalPool

        made = LocalPool(config)
    try:
        made.start()
        yield made
    finally:  # also when start() failed: nothing of this test may be left behind
        made.stop()
        remove_containers(config.state)
        shutil.rmtree(root, ignore_errors=True)


def spec(key: str, program: str, *args: str, inputs: tuple[str, ...] = ()) -> JobSpec:
    return JobSpec(key=key, job_id=f"job-{key}", program=program, args=args, inputs=inputs)


def kill(pool: Pool, name: str, incarnation: Incarnation) -> None:
    from dropq.pools.docker import DockerPool

    if isinstance(pool, DockerPool):
        pool.client.containers.get(incarnation.id).kill()
    else:
        os.kill(incarnation.health.pid, signal.SIGKILL)


def test_workers_have_stable_names_and_answer(pool: Pool) -> None:
    assert [w.name for w in pool.workers()] == ["w1", "w2"]
    for worker in pool.workers():
        health = pool.ensure(worker.name, timeout=30)
        assert health is not None and health.health.protocol == PROTOCOL and health.health.job is None


def test_a_job_runs_and_its_files_appear_in_the_workers_jobs_dir(pool: Pool) -> None:
    worker = pool.workers()[0]
    (worker.inputs_dir / "c1").mkdir(parents=True, exist_ok=True)
    (worker.inputs_dir / "c1" / "in.txt").write_text("one two two\n")
    os.chmod(worker.inputs_dir / "c1" / "in.txt", 0o644)
    worker.transport.start(spec("c1", "wordcount.py", inputs=("c1/in.txt",)))
    status = worker.transport.status("c1", wait=30)
    assert (status.state, status.outcome, status.exit_code) == (JobState.DONE, Outcome.EXITED, 0)
    assert (worker.jobs_dir / "c1.stdout").read_text() == "2 two\n1 one\n"
    # readers without a pool (recovery at start, `dropq logs`, the dashboard) find it too
    assert find_staging(pool.config, worker.name, "c1") == worker.staging("c1")


def test_one_job_at_a_time(pool: Pool) -> None:
    worker = pool.workers()[1]
    worker.transport.start(spec("c2", "sleep.py", "5"))
    with pytest.raises(WorkerBusy):
        worker.transport.start(spec("c3", "echo.py"))
    worker.transport.cancel("c2")
    assert worker.transport.status("c2", wait=30).outcome is Outcome.CANCELLED


def test_unknown_jobs_are_reported_as_such(pool: Pool) -> None:
    with pytest.raises(UnknownJob):
        pool.workers()[0].transport.status("never-posted")


def test_a_killed_worker_comes_back_as_a_new_incarnation(pool: Pool) -> None:
    name = pool.workers()[0].name
    before = pool.ensure(name, timeout=30)
    assert before is not None
    kill(pool, name, before)
    deadline = time.monotonic() + 60
    after = pool.ensure(name, timeout=60)
    while after is not None and after.id == before.id and time.monotonic() < deadline:
        time.sleep(0.1)  # the old one may answer once more while it dies
        after = pool.ensure(name, timeout=60)
    assert after is not None and after.id != before.id
    assert after.health.job is None


def test_the_transport_reports_a_dead_worker_as_an_error(pool: Pool) -> None:
    worker = pool.workers()[1]
    health = pool.ensure(worker.name, timeout=30)
    assert health is not None
    pool.stop()
    # stop() ended the worker (the process, or the container with on_shutdown: remove): a new
    # connection finds no one listening; the pool's own transport refuses after its abort() too
    fresh = Transport(socket_path=worker.transport.socket_path, token="any")
    try:
        with pytest.raises(TransportError):
            fresh.health(timeout=2)
    finally:
        fresh.close()
    with pytest.raises(TransportError):
        worker.transport.health(timeout=2)


def test_a_jobs_own_memory_limit_holds_and_is_lifted_after_it(pool: Pool) -> None:
    # writes every page of argv[1] MiB (a zeroed buffer would not be counted until touched)
    (pool.config.programs / "alloc.py").write_text(
        'import sys\ndata = b"x" * (int(sys.argv[1]) * 1024 * 1024)\nprint(len(data) // 1048576)\n')
    worker = pool.workers()[0]
    limit = 64 * 1024 * 1024
    rlimit = pool.apply_limits(worker.name, memory=limit, cpus=0.5)
    assert (rlimit is not None) == (pool.kind == "local")  # local: the worker sets it in the program's process
    worker.transport.start(JobSpec(key="m1", job_id="job-m1", program="alloc.py", args=("256",),
                                   memory=limit, memory_rlimit=rlimit))
    tight = worker.transport.status("m1", wait=60)
    assert tight.done and (tight.exit_code, tight.outcome) != (0, Outcome.EXITED), tight
    pool.lift_limits(worker.name)
    worker.transport.start(spec("m2", "alloc.py", "256"))
    roomy = worker.transport.status("m2", wait=60)
    assert (roomy.outcome, roomy.exit_code) == (Outcome.EXITED, 0), roomy
