"""A tiny benchmark harness: every benchmark measures its own baseline in the same run.

A benchmark module ``benchmarks/bench_<name>.py`` defines ``run(quick: bool) -> list[Row]``.
Each :class:`Row` carries the measured value and the baseline measured in the same run, so
the table reports ratios, which survive a slower or busier machine, and an optional target
ratio the row is judged against.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tqdm import tqdm

__all__ = ["Row", "best_of", "format_table", "interleaved", "per_call"]


@dataclass(frozen=True)
class Row:
    """One line of the table: ``value / baseline_value`` against an optional ``target``."""

    benchmark: str
    subject: str
    metric: str
    value: float
    unit: str
    baseline: str
    baseline_value: float
    target: float | None = None
    higher_is_better: bool = False

    @property
    def ratio(self) -> float:
        return self.value / self.baseline_value if self.baseline_value else math.nan

    @property
    def verdict(self) -> str:
        if self.target is None:
            return ""
        ok = self.ratio >= self.target if self.higher_is_better else self.ratio <= self.target
        return "ok" if ok else "MISSED"


def per_call(fn: Callable[[], object], calls: int) -> float:
    """Seconds per call of ``fn`` over ``calls`` back-to-back calls."""
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def best_of(fn: Callable[[], object], calls: int, repeats: int) -> float:
    """Lowest per-call time over ``repeats`` runs: the run least disturbed by the machine."""
    return min(per_call(fn, calls) for _ in range(repeats))


def interleaved(
    subjects: dict[str, Callable[[], object]], calls: int, rounds: int
) -> dict[str, float]:
    """Median per-call seconds of each subject, measured in alternating rounds.

    Alternating subjects round by round spreads any drift of the machine (another process,
    CPU frequency) over all of them instead of penalising whichever ran last.
    """
    samples: dict[str, list[float]] = {name: [] for name in subjects}
    for fn in subjects.values():
        per_call(fn, max(1, calls // 10))
    for _ in tqdm(range(rounds), desc="rounds", unit="round", leave=False, file=sys.stderr):
        for name, fn in subjects.items():
            samples[name].append(per_call(fn, calls))
    return {name: statistics.median(values) for name, values in samples.items()}


def format_table(rows: Sequence[Row]) -> str:
    """Plain-text table of rows, one per line, ratios to 3 significant digits."""
    header = ("benchmark", "subject", "metric", "value", "baseline", "ratio", "target", "")
    lines = [header]
    for row in rows:
        target = "" if row.target is None else f"{'>=' if row.higher_is_better else '<='}"
        target += "" if row.target is None else f"{row.target:g}x"
        lines.append(
            (
                row.benchmark,
                row.subject,
                row.metric,
                f"{row.value:.4g} {row.unit}",
                f"{row.baseline} = {row.baseline_value:.4g} {row.unit}",
                f"{row.ratio:.3g}x",
                target,
                row.verdict,
            )
        )
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(str(cell).ljust(width) for cell, width in zip(line, widths, strict=True))
        for line in lines
    ).rstrip()
