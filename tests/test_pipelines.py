"""Pipelines end to end (issue 13): `after:` and `outbox:` inputs, with a real daemon process, real local
workers and real files. Manifests go into inbox/, results are read from outbox/ and through the CLI.
The same rules, in milliseconds and without a daemon, are in test_upstream_rules.py."""

from __future__ import annotations

import os
from typing import Any

from conftest import DaemonProcess, Workspace
from helpers import dropq, dropq_json, wait_for_status, wait_until


def concat(*inputs: str, prefix: str = "", output: str | None = None, after: list[str] | None = None) -> dict[str, Any]:
    """A manifest running programs/concat.py on `inputs` (inbox paths or outbox:JOB/PATH)."""
    manifest: dict[str, Any] = {"program": "concat", "input": inputs[0], "inputs": list(inputs[1:])}
    if prefix:
        manifest["args"] = ["--prefix", prefix]
    if output:
        manifest["output"] = output
    if after:
        manifest["after"] = after
    return manifest


def test_a_diamond_runs_each_job_after_its_upstreams_and_d_reads_the_outputs_of_b_and_c(
        workspace: Workspace, daemon: DaemonProcess) -> None:
    daemon.start()
    run_diamond(workspace)


def test_a_diamond_on_docker_workers_reads_the_upstream_outputs_through_the_read_only_inputs_mount(
        workspace: Workspace, daemon: DaemonProcess, docker_image: str) -> None:
    workspace.configure(workers={"pool": "docker", "count": 2, "docker": {"image": docker_image}})
    daemon.start()
    assert "worker pool: docker" in daemon.log_text()
    run_diamond(workspace)


def run_diamond(workspace: Workspace) -> None:
    workspace.put("words.txt", "alpha\nbeta\n")
    # dropped downstream first: each is claimed before the jobs it runs after, and waits for them
    workspace.drop("d.yaml", concat("outbox:b/output/b.txt", "outbox:c/output/c.txt", after=["a"]))
    workspace.drop("c.yaml", concat("outbox:a/output/a.txt", prefix="c:", output="c.txt"))
    workspace.drop("b.yaml", concat("outbox:a/output/a.txt", prefix="b:", output="b.txt"))
    workspace.drop("a.yaml", concat("words.txt", output="a.txt"))
    results = workspace.wait_results(4, timeout=60)
    assert {job: r["status"] for job, r in results.items()} == dict.fromkeys("abcd", "succeeded"), results
    assert (workspace.outbox / "d" / "stdout.txt").read_text() == "b:alpha\nb:beta\nc:alpha\nc:beta\n"
    # each ran after the jobs it names had ended
    for job, ups in {"b": "a", "c": "a", "d": "abc"}.items():
        assert all(results[job]["started_at"] >= results[up]["finished_at"] for up in ups), (job, results)
    # the inputs came in as copies, under inputs/outbox/JOB/PATH; the upstream folders are as published
    copied = workspace.outbox / "d" / "inputs" / "outbox" / "b" / "output" / "b.txt"
    upstream = workspace.outbox / "b" / "output" / "b.txt"
    assert copied.read_text() == upstream.read_text() == "b:alpha\nb:beta\n"
    assert os.stat(copied).st_ino != os.stat(upstream).st_ino, "a copy, not a link to the upstream file"
    assert (workspace.outbox / "a" / "output" / "a.txt").read_text() == "alpha\nbeta\n"
    assert sorted(os.listdir(workspace.outbox / "a" / "output")) == ["a.txt"]


def test_a_failed_upstream_cancels_its_downstream_and_the_job_after_that_naming_it(
        workspace: Workspace, daemon: DaemonProcess) -> None:
    daemon.start()
    workspace.drop("prep.yaml", {"program": "fail"})
    workspace.drop("clean.yaml", {"program": "echo", "after": ["prep"]})
    workspace.drop("plot.yaml", {"program": "concat", "input": "outbox:clean/stdout.txt"})
    results = workspace.wait_results(3, timeout=60)
    assert results["prep"]["status"] == "failed"
    assert results["clean"]["status"] == "cancelled"
    assert results["clean"]["error"] == "prep failed, so this job did not run"
    assert results["plot"]["status"] == "cancelled"
    assert results["plot"]["error"] == "prep failed, so this job did not run (nor did clean, which it runs after)"
    for job in ("clean", "plot"):
        assert results[job]["started_at"] is None and results[job]["attempts"] == 0, "it never ran"
    assert dropq_json(workspace.config, "show", "plot")["error"] == results["plot"]["error"]


def test_a_dependency_dropped_after_its_dependent_or_finished_before_it_works(
        workspace: Workspace, daemon: DaemonProcess) -> None:
    workspace.configure(intake={"input_grace": 20})
    daemon.start()
    # the dependent first: it is claimed, and waits (visibly) for a job no one has dropped yet
    workspace.drop("late.yaml", {"program": "concat", "input": "outbox:early/output/e.txt", "args": ["--prefix", "> "]})
    wait_for_status(workspace.config, "late", "waiting")
    assert dropq_json(workspace.config, "show", "late")["waiting"] == "waiting for early"
    workspace.drop("early.yaml", {"program": "echo", "args": ["made early"], "output": "e.txt"})
    assert wait_for_status(workspace.config, "late", "succeeded", "failed", "cancelled", "rejected") == "succeeded"
    # echo.py prints its arguments, then its DROPQ_ variables: each line now after the prefix
    assert (workspace.outbox / "late" / "stdout.txt").read_text().startswith("> made early\n> DROPQ_JOB_ID=early\n")
    # the other order: the job it runs after has long finished when it is claimed
    workspace.drop("later.yaml", {"program": "echo", "args": ["ok"], "after": ["early", "late"]})
    assert wait_for_status(workspace.config, "later", "succeeded", "failed", "cancelled", "rejected") == "succeeded"


def test_an_unknown_dependency_is_rejected_after_the_grace_naming_it(workspace: Workspace,
                                                                     daemon: DaemonProcess) -> None:
    daemon.start()  # intake.input_grace is 2 seconds here
    workspace.drop("orphan.yaml", {"program": "echo", "after": ["nosuchjob"]})
    result = workspace.wait_results(1, timeout=30)["orphan"]
    assert result["status"] == "rejected"
    assert "'nosuchjob'" in result["error"] and "within 2 seconds" in result["error"], result["error"]


def test_a_job_waiting_for_its_upstream_survives_a_daemon_restart(workspace: Workspace,
                                                                   daemon: DaemonProcess) -> None:
    workspace.configure(workers={"count": 1})
    daemon.start()
    gate = workspace.root / "gate"
    # the upstream runs until the test lets it end (a file it polls for): no sleep decides anything
    workspace.programs.joinpath("gated.py").write_text(
        "import os, sys, time\n"
        f"while not os.path.exists({str(gate)!r}):\n    time.sleep(0.05)\n"
        "print('upstream done')\n")
    workspace.drop("up.yaml", {"program": "gated"})
    workspace.drop("down.yaml", {"program": "concat", "input": "outbox:up/stdout.txt", "args": ["--prefix", "got: "]})
    wait_for_status(workspace.config, "up", "running")
    wait_for_status(workspace.config, "down", "waiting")
    status = dropq(workspace.config, "status")
    assert "waiting  down: waiting for up" in status.stdout, status.stdout
    daemon.kill()
    daemon.start()
    assert dropq_json(workspace.config, "show", "down")["status"] == "waiting"
    assert dropq_json(workspace.config, "show", "down")["waiting"] == "waiting for up"
    gate.touch()
    assert wait_for_status(workspace.config, "down", "succeeded", "failed", "cancelled", "rejected",
                           timeout=60) == "succeeded"
    assert workspace.result("up")["status"] == "succeeded"
    assert (workspace.outbox / "down" / "stdout.txt").read_text() == "got: upstream done\n"


def test_cancelling_a_waiting_job_cancels_the_jobs_after_it(workspace: Workspace, daemon: DaemonProcess) -> None:
    workspace.configure(intake={"input_grace": 30})
    daemon.start()
    workspace.drop("second.yaml", {"program": "echo", "after": ["first"]})
    workspace.drop("third.yaml", {"program": "echo", "after": ["second"]})
    wait_for_status(workspace.config, "third", "waiting")
    assert dropq(workspace.config, "cancel", "second").returncode == 0
    assert wait_for_status(workspace.config, "third", "cancelled") == "cancelled"
    assert workspace.result("third")["error"] == "second was cancelled, so this job did not run"
    wait_until(lambda: workspace.result("second")["status"] == "cancelled", what="second cancelled")


def test_submit_after_builds_the_manifest(workspace: Workspace, daemon: DaemonProcess) -> None:
    workspace.configure(intake={"input_grace": 30})
    daemon.start()
    done = dropq(workspace.config, "submit", "concat", "outbox:first/stdout.txt", "--after", "zeroth",
                 "--name", "joined")
    assert done.returncode == 0, done.stderr
    wait_for_status(workspace.config, "joined", "waiting")
    assert dropq_json(workspace.config, "show", "joined")["waiting"] == "waiting for zeroth, first"
    dropq(workspace.config, "submit", "echo", "--name", "zeroth", "--", "0")
    dropq(workspace.config, "submit", "echo", "--name", "first", "--", "1")
    assert wait_for_status(workspace.config, "joined", "succeeded", "failed", "cancelled", "rejected") == "succeeded"
    assert (workspace.outbox / "joined" / "stdout.txt").read_text().startswith("1\n")


def test_retrying_a_pipeline_job_reads_the_upstream_output_again_and_leaves_the_inbox_empty(
        workspace: Workspace, daemon: DaemonProcess) -> None:
    daemon.start()
    workspace.put("local.txt", "mine\n")
    workspace.drop("up.yaml", {"program": "echo", "args": ["from up"], "output": "u.txt"})
    workspace.drop("down.yaml", concat("local.txt", "outbox:up/output/u.txt"))
    assert wait_for_status(workspace.config, "down", "succeeded", "failed", "cancelled", "rejected") == "succeeded"
    done = dropq(workspace.config, "retry", "down", "--wait", timeout=90)
    assert done.returncode == 0, done.stderr
    assert (workspace.outbox / "down-retry" / "stdout.txt").read_text().startswith("mine\nfrom up\n")
    # its own input went back through the inbox; the one from up's folder was read from there again
    assert (workspace.outbox / "down-retry" / "inputs" / "local.txt").read_text() == "mine\n"
    assert (workspace.outbox / "down-retry" / "inputs" / "outbox" / "up" / "output" / "u.txt").exists()
    assert os.listdir(workspace.inbox) == []
