"""The rules of array jobs in milliseconds: matrix validation, placeholders, the cartesian product's order,
globs, the task limit, and the store's and committer's part (a real Store on a temporary SQLite file, a real
Outbox, real files; no daemon)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from dropq.config import JobDefaults
from dropq.errors import ManifestError
from dropq.intake import arrays
from dropq.intake.manifest import Manifest
from dropq.publish.committer import Committer
from dropq.publish.outbox import Outbox
from dropq.queue.jobs import JobStatus
from dropq.queue.store import Store
from dropq_worker.protocol import Staging

DEFAULTS = JobDefaults()


def manifest(text: str) -> Manifest:
    return Manifest.parse(text.encode(), defaults=DEFAULTS, max_bytes=1 << 20)


# --- placeholders ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("template", "filled"), [
    ("{size}", "64"), ("--size={size}x{size}", "--size=64x64"), ("{{size}}", "{size}"), ("{{{size}}}", "{64}"),
    ("a}b", "a}b"), ("a}}b", "a}b"), ("plain", "plain"), ("{size}{mode}", "64fast")])
def test_placeholders_are_filled_and_double_braces_are_braces(template: str, filled: str) -> None:
    assert arrays.fill(template, {"size": "64", "mode": "fast"}, where="`args`") == filled


def test_a_placeholder_the_matrix_does_not_name_is_refused_naming_it() -> None:
    with pytest.raises(ManifestError, match=r"`args` uses \{colour\}, which `matrix` does not name \(it has: size\)"):
        arrays.fill("{colour}", {"size": "1"}, where="`args`")


@pytest.mark.parametrize("template", ["{", "x{1}", "{ size}", "{size"])
def test_a_brace_that_starts_no_placeholder_is_refused(template: str) -> None:
    with pytest.raises(ManifestError, match="starts no placeholder"):
        arrays.fill(template, {"size": "1"}, where="`args`")


# --- expansion -------------------------------------------------------------------------------------------


def test_the_product_runs_keys_in_manifest_order_and_values_in_list_order(tmp_path: Path) -> None:
    m = arrays.resolve(manifest("program: echo\nargs: ['{b}', '{a}']\nmatrix: {b: [x, y, z], a: [2, 1]}\n"),
                       inbox=tmp_path, max_tasks=100)
    made = arrays.tasks(m)
    assert [t.parameters for t in made] == [
        (("b", b), ("a", a)) for b in ("x", "y", "z") for a in ("2", "1")]
    assert [t.args for t in made][:2] == [("x", "2"), ("x", "1")]
    assert [(t.env["DROPQ_TASK_INDEX"], t.env["DROPQ_TASK_COUNT"]) for t in made] == [
        (str(i), "6") for i in range(6)]


def test_placeholders_fill_inputs_output_and_env_but_not_other_keys(tmp_path: Path) -> None:
    m = arrays.resolve(manifest("program: echo\ninput: 'data/{n}.csv'\ninputs: [common.txt]\noutput: 'out-{n}.txt'\n"
                                "env: {N: 'n={n}', KEEP: '{{n}}'}\nmatrix: {n: [1, 2]}\n"), inbox=tmp_path,
                       max_tasks=10)
    assert m.inputs == ("data/1.csv", "common.txt", "data/2.csv"), "each file every task reads, once"
    first, second = arrays.tasks(m)
    assert (first.inputs, first.output, first.env["N"], first.env["KEEP"]) == (
        ("data/1.csv", "common.txt"), "out-1.txt", "n=1", "{n}")
    assert second.inputs == ("data/2.csv", "common.txt")
    assert (first.matrix, first.notify, first.max_failures) == ((), None, None), "a task is no array"


def test_an_output_that_becomes_a_path_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="not a plain file name"):
        arrays.resolve(manifest("program: echo\noutput: '{d}'\nmatrix: {d: [a/b]}\n"), inbox=tmp_path, max_tasks=10)


def test_an_input_that_leaves_the_inbox_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="task 0"):
        arrays.resolve(manifest("program: echo\ninput: '{d}/x'\nmatrix: {d: ['..']}\n"), inbox=tmp_path,
                       max_tasks=10)


def test_a_glob_matches_regular_files_sorted_without_dotfiles_or_manifests(tmp_path: Path) -> None:
    for rel in ("p/b.jpg", "p/a.jpg", "p/.c.jpg", "p/sub/d.jpg", "top.yaml", "top.jpg"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    (tmp_path / "p" / "dir.jpg").mkdir()
    assert arrays.glob_inbox(tmp_path, "p/*.jpg") == ["p/a.jpg", "p/b.jpg"]
    assert arrays.glob_inbox(tmp_path, "p/**/*.jpg") == ["p/a.jpg", "p/b.jpg", "p/sub/d.jpg"]
    assert arrays.glob_inbox(tmp_path, "*") == ["top.jpg"]
    m = arrays.resolve(manifest("program: echo\nmatrix: {photo: {glob: 'p/*.jpg'}, k: [1, 2]}\n"), inbox=tmp_path,
                       max_tasks=10)
    assert m.matrix == (("photo", ("p/a.jpg", "p/b.jpg"), "p/*.jpg"), ("k", ("1", "2"), None))
    assert m.inputs == ("p/a.jpg", "p/b.jpg"), "a glob's matches are claimed as inputs even when no input names them"


def test_a_glob_matching_nothing_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match=r"`matrix.f` is the glob 'x/\*.csv', which matches no file"):
        arrays.resolve(manifest("program: echo\nmatrix: {f: {glob: 'x/*.csv'}}\n"), inbox=tmp_path, max_tasks=10)


def test_more_tasks_than_the_limit_are_refused_with_the_sizes(tmp_path: Path) -> None:
    text = "program: echo\nmatrix: {a: [1, 2, 3], b: [1, 2, 3, 4]}\n"
    with pytest.raises(ManifestError, match=r"makes 12 tasks \(3 × 4\); the limit is 11 \(jobs.max_tasks\)"):
        arrays.resolve(manifest(text), inbox=tmp_path, max_tasks=11)
    assert arrays.task_count(arrays.resolve(manifest(text), inbox=tmp_path, max_tasks=12)) == 12


def test_a_manifest_without_matrix_keeps_its_braces(tmp_path: Path) -> None:
    m = manifest("program: echo\nargs: ['{x}']\n")
    assert arrays.resolve(m, inbox=tmp_path, max_tasks=1) is m and not m.is_array


@pytest.mark.parametrize(("text", "says"), [
    ("matrix: {n: []}", "`matrix.n` has no values"),
    ("matrix: {}", "`matrix` names no parameter"),
    ("matrix: {1n: [1]}", "`matrix` must map parameter names"),
    ("matrix: {n: [true]}", "`matrix` must map parameter names"),
    ("matrix: {n: {glob: '../x'}}", "matrix.n.glob"),
    ("matrix: {n: {pattern: x}}", "`matrix.n` may have only `glob:`"),
    ("max_failures: 0", "`max_failures` must be a whole number of at least 1"),
    ("env: {DROPQ_TASK_INDEX: '1'}", "dropq sets it"),
])
def test_a_bad_matrix_is_refused_with_the_key_named(text: str, says: str) -> None:
    with pytest.raises(ManifestError, match=re_escape(says)):
        manifest(f"program: echo\n{text}\n")


def re_escape(text: str) -> str:
    import re

    return re.escape(text)


def test_the_stored_manifest_keeps_the_matrix_across_json() -> None:
    m = manifest("program: echo\ninput: '{f}'\nmatrix: {f: {glob: 'a/*'}, n: [1, 2.5, x]}\nmax_failures: 3\n")
    again = Manifest.from_json(m.to_json())
    assert again == m
    assert again.matrix == (("f", (), "a/*"), ("n", ("1", "2.5", "x"), None)) and again.max_failures == 3


# --- the store and the committer --------------------------------------------------------------------------


@pytest.fixture
def committer(tmp_path: Path) -> Iterator[Committer]:
    store = Store(tmp_path / "db.sqlite3")
    (tmp_path / "outbox").mkdir()
    c = Committer(outbox=Outbox(root=tmp_path / "outbox", spool=tmp_path / "spool", store=store))
    yield c
    store.close()


def array(committer: Committer, job_id: str, text: str, *, priority: int = 0) -> None:
    """An array as the intake leaves it once its inputs are there: claimed, its manifest stored, queued."""
    spool = committer.outbox.spool / job_id
    (spool / "inputs").mkdir(parents=True)
    (spool / "manifest.yaml").write_text(text)
    committer.store.add(job_id, source=f"{job_id}.yaml")
    m = arrays.resolve(manifest(text), inbox=spool, max_tasks=100)
    committer.store.set_manifest(job_id, m.to_json(), priority=priority, retries=m.retries, deadline=None)
    committer.store.queue_job(job_id)


def ran(committer: Committer, job_id: str, status: JobStatus, code: int | None) -> None:
    committer.finish(job_id, {"status": status.value, "error": None if code == 0 else f"exit {code}",
                              "exit_code": code, "finished_at": 1.0})
    committer.run_pending()


def test_queueing_an_array_makes_its_tasks_queued_rows_and_the_pick_hands_them_out_in_order(
        committer: Committer) -> None:
    store = committer.store
    store.add("first", source="first.yaml")
    store.set_manifest("first", manifest("program: echo\n").to_json(), priority=0, retries=0, deadline=None)
    array(committer, "arr", "program: echo\nargs: ['{n}']\nmatrix: {n: [a, b, c]}\n", priority=5)
    parent = store.get("arr")
    assert (parent.status, parent.tasks, parent.worker) == (JobStatus.RUNNING, 3, None)
    tasks = store.tasks_of("arr")
    assert [(t.id, t.task_index, t.status, t.priority) for t in tasks] == [
        (f"arr/{i}", i, JobStatus.QUEUED, 5) for i in range(3)]
    assert json.loads(tasks[1].manifest or "{}")["args"] == ["b"]
    store.queue_job("first")
    # the parent's priority: its tasks go before a job queued earlier at priority 0
    picked = [store.take_next(f"w{i}") for i in range(4)]
    assert [p.id if p else None for p in picked] == ["arr/0", "arr/1", "arr/2", "first"]
    assert [j.id for j in store.recent()] == ["arr", "first"], "tasks are not listed as jobs"
    assert store.progress(parent) == {"total": 3, "done": 0, "failed": 0, "cancelled": 0, "running": 3,
                                      "queued": 0, "counts": {"running": 3}, "text": "0/3 tasks done"}


def test_every_task_committed_publishes_the_array_in_one_folder(committer: Committer) -> None:
    array(committer, "arr", "program: echo\nmatrix: {n: [a, b]}\n")
    for _ in range(2):
        committer.store.take_next("w1")
    ran(committer, "arr/1", JobStatus.SUCCEEDED, 0)
    assert not (committer.outbox.root / "arr").exists(), "not published before every task has ended"
    assert (committer.outbox.spool / "arr" / "tasks" / "1" / "result.yaml").is_file()
    assert committer.store.progress(committer.store.get("arr"))["text"] == "1/2 tasks done"  # type: ignore[index]
    ran(committer, "arr/0", JobStatus.FAILED, 3)
    committer.run_pending()
    result: dict[str, Any] = yaml.safe_load((committer.outbox.root / "arr" / "result.yaml").read_text())
    assert (result["status"], result["error"]) == ("failed", "1 of 2 task(s) failed")
    assert result["counts"] == {"failed": 1, "succeeded": 1}
    assert result["tasks"] == [
        {"index": 0, "parameters": {"n": "a"}, "status": "failed", "exit_code": 3, "error": "exit 3"},
        {"index": 1, "parameters": {"n": "b"}, "status": "succeeded", "exit_code": 0, "error": None}]
    assert sorted(p.name for p in (committer.outbox.root / "arr").iterdir()) == [
        "inputs", "manifest.yaml", "result.yaml", "tasks"]
    assert committer.store.get("arr").status is JobStatus.FAILED
    assert not (committer.outbox.spool / "arr").exists()


def test_a_task_committed_again_after_a_crash_is_not_committed_twice(committer: Committer) -> None:
    array(committer, "arr", "program: echo\nmatrix: {n: [a, b]}\n")
    task = committer.store.take_next("w1")
    assert task is not None
    committing = committer.finish(task.id, {"status": "succeeded", "error": None, "exit_code": 0,
                                            "finished_at": 1.0})
    first = committer.outbox.commit_task(committing, staging=None)  # renamed; "crash" before the store learns
    text = (first / "result.yaml").read_text()
    (first / "stdout.txt").write_text("the first commit's")
    committer.run_pending()  # the restart's commit of the same job and attempt
    assert (first / "stdout.txt").read_text() == "the first commit's" and (first / "result.yaml").read_text() == text
    assert committer.store.get(task.id).status is JobStatus.SUCCEEDED


def test_a_task_commit_cut_off_mid_assembly_keeps_what_it_had_moved_out_of_staging(
        committer: Committer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # what the kill -9 test once found: a crash after stdout.txt had moved from staging into the task's folder
    # being assembled, and the restart made that folder again from a staging folder with no stdout left
    array(committer, "arr", "program: echo\nmatrix: {n: [a, b]}\n")
    task = committer.store.take_next("w1")
    assert task is not None
    committing = committer.finish(task.id, {"status": "succeeded", "error": None, "exit_code": 0,
                                            "finished_at": 1.0})
    staging = Staging(tmp_path / "jobs", "k-1")
    staging.output.mkdir(parents=True)
    (staging.output / "made.txt").write_text("made\n")
    staging.stdout.write_text("task a\n")
    staging.stderr.write_text("warned\n")
    place = Outbox._place

    def crash_at_stderr(source: Path | None, target: Path) -> None:
        if target.name == "stderr.txt":
            raise KeyboardInterrupt("the kill, between two moves")
        place(source, target)

    monkeypatch.setattr(Outbox, "_place", staticmethod(crash_at_stderr))
    with pytest.raises(KeyboardInterrupt):
        committer.outbox.commit_task(committing, staging=staging)
    assert not staging.stdout.exists(), "stdout had moved before the crash"
    monkeypatch.setattr(Outbox, "_place", staticmethod(place))
    folder = committer.outbox.commit_task(committing, staging=staging)  # the restart's commit
    assert (folder / "stdout.txt").read_text() == "task a\n"
    assert (folder / "stderr.txt").read_text() == "warned\n"
    assert (folder / "output" / "made.txt").read_text() == "made\n"
    assert sorted(os.listdir(folder)) == ["output", "result.yaml", "stderr.txt", "stdout.txt"], "no mark left"


def test_a_half_assembled_task_folder_of_another_attempt_is_made_again(committer: Committer) -> None:
    array(committer, "arr", "program: echo\nmatrix: {n: [a, b]}\n")
    task = committer.store.take_next("w1")
    assert task is not None
    committing = committer.finish(task.id, {"status": "succeeded", "error": None, "exit_code": 0,
                                            "finished_at": 1.0})
    stale = committer.outbox.spool / "arr" / "tasks" / f".{task.task_index}.tmp"
    stale.mkdir(parents=True)
    (stale / ".attempt").write_text("another attempt's key")
    (stale / "stdout.txt").write_text("another attempt's output")
    folder = committer.outbox.commit_task(committing, staging=None)
    assert (folder / "stdout.txt").read_text() == "" and not stale.exists()


def test_max_failures_cancels_the_queued_tasks_and_the_array_fails(committer: Committer) -> None:
    array(committer, "arr", "program: echo\nmatrix: {n: [1, 2, 3, 4, 5]}\nmax_failures: 2\n")
    committer.store.take_next("w1")
    committer.store.take_next("w2")
    ran(committer, "arr/0", JobStatus.FAILED, 1)
    assert committer.store.task_counts("arr") == {"failed": 1, "running": 1, "queued": 3}
    ran(committer, "arr/1", JobStatus.FAILED, 1)
    committer.run_pending()
    assert committer.store.task_counts("arr") == {"failed": 2, "cancelled": 3}
    cancelled = committer.store.get("arr/4")
    assert cancelled.error is not None and "max_failures: 2" in cancelled.error
    arr = committer.store.get("arr")
    assert arr.status is JobStatus.FAILED and arr.error == "2 of 5 task(s) failed; 3 cancelled (max_failures: 2)"


def test_settle_arrays_finishes_an_array_whose_last_task_ended_before_a_crash(committer: Committer) -> None:
    array(committer, "arr", "program: echo\nmatrix: {n: [a]}\n")
    committer.store.take_next("w1")
    job = committer.finish("arr/0", {"status": "succeeded", "error": None, "exit_code": 0, "finished_at": 1.0})
    committer.outbox.finish(job)  # the task is committed, and the daemon dies before the array is finished
    assert committer.store.get("arr").status is JobStatus.RUNNING
    fresh = Committer(outbox=committer.outbox)
    fresh.run_pending()
    fresh.settle_arrays()
    fresh.run_pending()
    assert committer.store.get("arr").status is JobStatus.SUCCEEDED
    assert yaml.safe_load((committer.outbox.root / "arr" / "result.yaml").read_text())["counts"] == {"succeeded": 1}


def test_an_array_in_an_environment_being_built_holds_its_tasks_until_it_is_ready(committer: Committer) -> None:
    store = committer.store
    store.want_env("e1", spec={"dependencies": ["x"]}, target={"kind": "venv"})
    text = "program: echo\nmatrix: {n: [a, b]}\n"
    spool = committer.outbox.spool / "arr"
    spool.mkdir(parents=True)
    store.add("arr", source="arr.yaml")
    store.set_manifest("arr", arrays.resolve(manifest(text), inbox=spool, max_tasks=10).to_json(), priority=0,
                       retries=0, deadline=None)
    parent = store.queue_job("arr", env="e1")
    # held like a queued job, so that the builder requests the build; never picked, being running
    assert (parent.status, parent.held) == (JobStatus.RUNNING, "e1")
    assert [t.held for t in store.tasks_of("arr")] == ["e1", "e1"]
    assert store.held_envs() == {"e1": 2}
    assert store.take_next("w1") is None
    assert store.env_ready("e1", packages=[], size_bytes=0) == 3
    assert [t.id for t in (store.take_next("w1"), store.take_next("w2")) if t] == ["arr/0", "arr/1"]


def test_an_outbox_input_with_a_placeholder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="`outbox:` input cannot hold a placeholder"):
        arrays.resolve(manifest("program: echo\ninput: 'outbox:{j}/stdout.txt'\nmatrix: {j: [a, b]}\n"),
                       inbox=tmp_path, max_tasks=10)
