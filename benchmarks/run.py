"""Run the benchmarks and print one table: ``python benchmarks/run.py [--quick] [name ...]``.

Each ``bench_<name>.py`` beside this file is a benchmark (see ``harness.py``). Exit status 0
even when a target is missed: benchmarks inform, the table says ``MISSED``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from harness import Row, format_table  # noqa: E402


def available() -> list[str]:
    return sorted(p.stem.removeprefix("bench_") for p in HERE.glob("bench_*.py"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "names", nargs="*", help=f"benchmarks to run (default: all of {available()})"
    )
    parser.add_argument("--quick", action="store_true", help="fewer iterations, for smoke tests")
    args = parser.parse_args(argv)
    names = args.names or available()
    unknown = sorted(set(names) - set(available()))
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; available: {available()}")
    rows: list[Row] = []
    for name in names:
        print(f"running bench_{name} ...", file=sys.stderr, flush=True)
        rows.extend(importlib.import_module(f"bench_{name}").run(quick=args.quick))
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
