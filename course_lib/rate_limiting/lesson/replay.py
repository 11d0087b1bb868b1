"""Replay recorded traffic through limiters on a simulated clock, and measure what they did.

A replay is deterministic: the same trace (fixed seed) gives the same decisions on every
run, so the notebook can print exact counts and compare algorithms on identical traffic.
The Redis limiters take the simulated time as their ``clock``; everything else (atomicity,
storage, round trips) is real.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from course_lib.clocks import ManualClock, replaced_time

from ..decision import Decision
from . import as_written

__all__ = [
    "admitted_in_window",
    "boundary_trace",
    "bursty_trace",
    "max_in_any_window",
    "replay",
    "run_seed_bucket",
    "token_curve",
]

Hit = Callable[[str], Decision]


def bursty_trace(
    seed: int = 7,
    *,
    seconds: float = 20.0,
    base_rate: float = 2.0,
    bursts: Sequence[tuple[float, int, float]] = ((3.0, 25, 0.4), (9.0, 40, 0.6), (15.0, 15, 0.2)),
) -> list[float]:
    """Request times (s): Poisson traffic at ``base_rate``/s plus ``(start, count, spread)``
    bursts of ``count`` requests spread uniformly over ``spread`` seconds. Rounded to 1 ms."""
    rng = np.random.default_rng(seed)
    steady = np.cumsum(rng.exponential(1 / base_rate, size=int(seconds * base_rate * 2)))
    times = list(steady[steady < seconds])
    for start, count, spread in bursts:
        times.extend(start + rng.uniform(0, spread, size=count))
    return sorted(round(float(t), 3) for t in times)


def boundary_trace(limit: int, window: float, *, lead: float = 0.1) -> list[float]:
    """``limit`` requests in the last ``lead`` s of a window, ``limit`` more in the first
    ``lead`` s of the next: the worst case for a fixed window."""
    step = lead / limit
    before = [window - lead + i * step for i in range(limit)]
    after = [window + i * step for i in range(limit)]
    return [round(t, 6) for t in before + after]


def replay(
    make: Mapping[str, Callable[[ManualClock], Hit]],
    times: Sequence[float],
    *,
    key: str = "client",
) -> pd.DataFrame:
    """Run ``times`` through each limiter ``make[name](clock)`` returns (a ``hit(key)``
    function reading ``clock``). One row per (limiter, request): t, allowed, remaining."""
    rows = []
    for name, factory in make.items():
        clock = ManualClock(0.0)
        hit = factory(clock)
        for t in times:
            clock.set(t)
            decision = hit(key)
            rows.append((name, t, decision.allowed, decision.remaining))
    return pd.DataFrame(rows, columns=["limiter", "t", "allowed", "remaining"])


def run_seed_bucket(times: Sequence[float], capacity: float, refill_rate: float) -> pd.DataFrame:
    """The seed's ``TokenBucket`` on ``times`` with a simulated wall clock: t, tokens before
    and after each request, allowed."""
    clock = ManualClock(0.0)
    rows = []
    with replaced_time(as_written, clock):
        bucket = as_written.TokenBucket(capacity, refill_rate)
        for t in times:
            clock.set(t)
            before = min(capacity, bucket.tokens + (t - bucket.last_refill) * refill_rate)
            allowed = bucket.consume()
            rows.append((t, before, bucket.tokens, allowed))
    return pd.DataFrame(rows, columns=["t", "before", "after", "allowed"])


def token_curve(
    run: pd.DataFrame, capacity: float, refill_rate: float, *, until: float
) -> tuple[list[float], list[float]]:
    """The token count as a continuous line up to ``until``: a climb at ``refill_rate``
    between requests, flat once at capacity, a drop at each allowed request.

    Drawn straight between its points, the line's slope is never more than ``refill_rate``:
    where the bucket fills up between two points (also after the last request), the point at
    which it reaches capacity is part of the line.
    """
    xs, ys = [0.0], [capacity]
    level, last = capacity, 0.0

    def refill_to(t: float) -> None:
        full_at = last + (capacity - level) / refill_rate
        if full_at < t:
            xs.append(full_at)
            ys.append(capacity)
        xs.append(t)
        ys.append(min(capacity, level + (t - last) * refill_rate))

    for t, after in zip(run["t"], run["after"], strict=True):
        refill_to(t)
        xs.append(t)
        ys.append(after)
        level, last = after, t
    refill_to(until)
    return xs, ys


def admitted_in_window(times: Sequence[float], window: float) -> list[int]:
    """For each of the (sorted) admission ``times``: how many fall in ``(t - window, t]``,
    i.e. what a client had been granted in the trailing window at that moment."""
    ordered = sorted(times)
    return [
        i + 1 - bisect.bisect_right(ordered, t - window, hi=i + 1) for i, t in enumerate(ordered)
    ]


def max_in_any_window(times: Sequence[float], window: float) -> int:
    """The most ``times`` that fall in any half-open interval ``[t, t + window)``."""
    ordered = sorted(times)
    best = 0
    for i, start in enumerate(ordered):
        best = max(best, bisect.bisect_left(ordered, start + window, lo=i) - i)
    return best
