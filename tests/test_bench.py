"""A small smoke run of the benchmark suite, so that it cannot rot. Benchmarks are not tests: no time
is asserted here, only that every figure runs and prints its rows."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.skipif(shutil.which("parallel") is None, reason="GNU parallel (the baseline) is not installed")
def test_the_benchmark_smoke_run_prints_every_figure() -> None:
    done = subprocess.run([sys.executable, "-m", "bench", "--smoke", "--only", "1,2,4,5,6,7"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for heading in ("1. Throughput", "2. Added latency", "4. Backlog", "5. Idle cost", "6. Environments", "7. Agents",
                    "python3 -c pass"):
        assert heading in done.stdout
    assert "ratio" in done.stdout and "suite took" in done.stdout
