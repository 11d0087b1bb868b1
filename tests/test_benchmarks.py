"""Every benchmark runs (quick mode) and prints a table with its baseline and ratios."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
NAMES = sorted(p.stem.removeprefix("bench_") for p in BENCHMARKS.glob("bench_*.py"))
# Benchmarks of no Redis or PostgreSQL: one pass of `make test` covers them.
NO_SERVICE = {"load_balancing"}


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.one_pass) if n in NO_SERVICE else n for n in NAMES]
)
def test_benchmark_runs_and_prints_ratios(name: str) -> None:
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "run.py"), "--quick", name],
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[0].split()[:3] == ["benchmark", "subject", "metric"]
    rows = [line for line in lines[1:] if line.startswith(name.split("_")[0])]
    assert rows, done.stdout
    # every row carries a baseline "name = value unit" and a numeric ratio such as 1.02x
    assert all(re.search(r" = [\d.e+-]+ \S+ +[\d.e+-]+x", line) for line in rows), done.stdout


@pytest.mark.one_pass
def test_unknown_benchmark_is_refused() -> None:
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "run.py"), "nope"], capture_output=True, text=True
    )
    assert done.returncode == 2 and "unknown benchmark" in done.stderr
