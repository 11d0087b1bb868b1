"""Deterministic profiling of one call: cProfile's numbers as a DataFrame.

:func:`profile_call` runs ``fn(*args, **kwargs)`` once under :class:`cProfile.Profile` and
returns a :class:`ProfileResult`: the call's return value, the raw :class:`pstats.Stats`
(``print_stats`` as the module does it) and ``.stats``, one row per function with its call
counts, own time (``tottime``: in the function itself) and cumulative time (``cumtime``: in
it and everything it called). Guarantees: only the call itself is profiled (the profiler is
enabled around it and nothing else), the profiler is disabled even if ``fn`` raises, and the
exception propagates.

Refused, because the numbers would silently be wrong (:mod:`.guards`):

- ``TypeError`` if ``fn`` is an ``async`` function, or returns an awaitable or a generator:
  its work would run after the profiler stopped (only the object's creation is profiled).
  Profile what runs it instead: ``profile_call(asyncio.run, main())``,
  ``profile_call(list, rows())``.
- ``RuntimeError`` if a profiler is already running in this thread (another
  :func:`profile_call`, cProfile, pyinstrument): a thread has one profile hook, so on Python
  3.11 the inner profiler would take it over and the outer one would lose every row from then
  on. To profile a part of a call, profile that part alone.

cProfile is deterministic: it records every call, so its counts are exact, but each call pays
a fixed cost, which inflates code made of many small calls (see :func:`.overhead`). Its times
are one run's: :func:`profile_fastest` profiles ``repeats`` runs and keeps the least
disturbed one, for times that a preempted run on a busy machine would otherwise inflate.
"""

from __future__ import annotations

import cProfile
import io
import pstats
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pandas as pd

from course_lib.validation import positive_int

from .guards import refuse_async, refuse_deferred_work, refuse_nested

__all__ = ["STATS_COLUMNS", "ProfileResult", "profile_call", "profile_fastest", "stats_frame"]

STATS_COLUMNS = [
    "function",
    "file",
    "line",
    "calls",
    "primitive_calls",
    "own_s",
    "cumulative_s",
    "own_per_call_us",
]
_SORT_KEYS = {"own": "own_s", "cumulative": "cumulative_s", "calls": "calls"}


def _label(file: str, line: int, name: str) -> str:
    # built-ins have file "~" and line 0: their name ("<method 'recv_into' ...>") says it all
    if file == "~":
        return name
    short = file.rsplit("/", 2)
    return f"{'/'.join(short[-2:])}:{line}({name})"


def stats_frame(stats: pstats.Stats) -> pd.DataFrame:
    """One row per function of ``stats``, sorted by own time, longest first."""
    rows = []
    for (file, line, name), (primitive, total, own, cumulative, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append(
            {
                "function": _label(file, line, name),
                "file": file,
                "line": line,
                "calls": total,
                "primitive_calls": primitive,
                "own_s": own,
                "cumulative_s": cumulative,
                "own_per_call_us": own / total * 1e6 if total else 0.0,
            }
        )
    frame = pd.DataFrame(rows, columns=STATS_COLUMNS)
    return frame.sort_values("own_s", ascending=False, ignore_index=True)


@dataclass(frozen=True)
class ProfileResult:
    """What :func:`profile_call` measured: ``value`` (the call's return value), ``pstats``
    (the raw :class:`pstats.Stats`) and ``stats`` (the same as a DataFrame)."""

    value: Any
    pstats: pstats.Stats
    stats: pd.DataFrame

    @property
    def total_s(self) -> float:
        """Seconds of the profiled call as cProfile saw it (profiler overhead included)."""
        return float(self.pstats.total_tt)  # type: ignore[attr-defined]

    def top(self, n: int = 10, by: str = "own") -> pd.DataFrame:
        """The ``n`` functions with the most ``by`` (``"own"``, ``"cumulative"`` or
        ``"calls"``), largest first."""
        n = positive_int("n", n)
        if by not in _SORT_KEYS:
            raise ValueError(f"by must be one of {sorted(_SORT_KEYS)}, got {by!r}")
        frame = self.stats.sort_values(_SORT_KEYS[by], ascending=False, kind="stable")
        return frame.head(n).reset_index(drop=True)

    def row(self, name: str) -> pd.Series:
        """The row of the one function whose ``function`` label ends with ``(name)``."""
        matches = self.stats[self.stats["function"].str.endswith(f"({name})")]
        if len(matches) != 1:
            raise KeyError(f"{len(matches)} profiled functions are named {name!r}")
        return matches.iloc[0]

    def print_stats(self, n: int = 10, sort: str = "cumulative") -> str:
        """``pstats``' own report of the top ``n`` (as the module prints it), as text."""
        n = positive_int("n", n)
        out, saved = io.StringIO(), self.pstats.stream  # type: ignore[attr-defined]
        self.pstats.stream = out  # type: ignore[attr-defined]
        try:
            self.pstats.sort_stats(sort).print_stats(n)
        finally:
            self.pstats.stream = saved  # type: ignore[attr-defined]
        return out.getvalue()


def profile_call(fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> ProfileResult:
    """Run ``fn(*args, **kwargs)`` once under cProfile; see the module docstring."""
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    refuse_async(fn, "profile_call")
    refuse_nested("profile_call")
    profiler = cProfile.Profile()
    profiler.enable()
    try:
        value = fn(*args, **kwargs)
    finally:
        profiler.disable()
    refuse_deferred_work(value, "profile_call")
    stats = pstats.Stats(profiler)
    # the profiler also saw its own disable() call: drop it from the table
    stats.stats = {  # type: ignore[attr-defined]
        key: row
        for key, row in stats.stats.items()  # type: ignore[attr-defined]
        if key[2] != "<method 'disable' of '_lsprof.Profiler' objects>"
    }
    return ProfileResult(value, stats, stats_frame(stats))


def profile_fastest(
    fn: Callable[..., Any], repeats: int, /, *args: Any, **kwargs: Any
) -> ProfileResult:
    """:func:`profile_call` ``repeats`` times; the run with the least total time.

    One run's times include whatever stopped it: a core taken by another process, a garbage
    collection. Those only ever add time, so the fastest run is the one closest to the code's
    own cost (``timeit`` reports its minimum for the same reason). The counts are exact in
    every run. Raises ``ValueError`` if ``repeats`` is below 1, and what :func:`profile_call`
    raises.
    """
    repeats = positive_int("repeats", repeats)
    runs = [profile_call(fn, *args, **kwargs) for _ in range(repeats)]
    return min(runs, key=lambda run: run.total_s)
