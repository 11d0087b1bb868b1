"""What a profiler costs: the same function timed with and without it, in one run.

:func:`overhead` times ``fn`` unprofiled and under each profiler in interleaved rounds
(unprofiled, cProfile, pyinstrument, ..., then again), so drift of a busy machine lands on
every subject alike, and reports each one's median seconds per call and its ratio to the
unprofiled median of the same run. A profiler is started before and stopped after its timed
calls, so only the cost it adds to running code is measured, not its start-up.

Built-in profilers: ``"cprofile"`` (deterministic: a hook on every call and return),
``"pyinstrument"`` (statistical: samples the stack every ``interval`` seconds),
``"tracemalloc"`` (a hook on every allocation). Any other tool can be passed as a
name -> context-manager factory, e.g. ``{"opentelemetry": lambda: tracing(engines=[e])}``,
mixed with built-ins through :func:`builtin_profiler`.

Refused (:mod:`.guards`): an ``async`` ``fn``, or one that returns an awaitable or a
generator (``TypeError``: only the creation of the coroutine would be timed; pass
``lambda: asyncio.run(main())``), and a call while another profiler runs in the thread
(``RuntimeError``: the unprofiled baseline would be profiled, and on Python 3.11 cProfile
would take the outer profiler's hook).
"""

from __future__ import annotations

import cProfile
import statistics
import time
import tracemalloc
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import pandas as pd

from course_lib.progress import progress as progress_bar
from course_lib.validation import positive_int, positive_number

from .guards import refuse_async, refuse_deferred_work, refuse_nested

__all__ = ["BUILTIN_PROFILERS", "UNPROFILED", "builtin_profiler", "noise_verdict", "overhead"]

UNPROFILED = "unprofiled"
Factory = Callable[[], AbstractContextManager[Any]]


@contextmanager
def _cprofile() -> Iterator[cProfile.Profile]:
    refuse_nested("cprofile")
    profiler = cProfile.Profile()
    profiler.enable()
    try:
        yield profiler
    finally:
        profiler.disable()


def _pyinstrument(interval: float) -> Factory:
    @contextmanager
    def run() -> Iterator[Any]:
        from pyinstrument import Profiler  # optional at import time of the course

        refuse_nested("pyinstrument")
        profiler = Profiler(interval=interval, async_mode="disabled")
        profiler.start()
        try:
            yield profiler
        finally:
            profiler.stop()

    return run


@contextmanager
def _tracemalloc() -> Iterator[None]:
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    try:
        yield
    finally:
        if not was_tracing:  # leave a caller's own tracing running
            tracemalloc.stop()


BUILTIN_PROFILERS = ("cprofile", "pyinstrument", "tracemalloc")


def builtin_profiler(name: str, *, interval: float = 0.001) -> Factory:
    """The context-manager factory of a built-in profiler (one of :data:`BUILTIN_PROFILERS`),
    to mix built-ins with other tools in one :func:`overhead` mapping."""
    if name == "cprofile":
        return _cprofile
    if name == "pyinstrument":
        return _pyinstrument(positive_number("interval", interval))
    if name == "tracemalloc":
        return _tracemalloc
    raise ValueError(f"name: unknown profiler {name!r}; built-in: {list(BUILTIN_PROFILERS)}")


def _factories(
    profilers: Sequence[str] | Mapping[str, Factory], interval: float
) -> dict[str, Factory]:
    if isinstance(profilers, Mapping):
        chosen = dict(profilers)
        for name, factory in chosen.items():
            if not callable(factory):
                raise TypeError(f"profilers[{name!r}] must be a context-manager factory")
    elif isinstance(profilers, str):
        raise TypeError("profilers must be a sequence of names or a mapping, not one string")
    else:
        unknown = sorted(set(profilers) - set(BUILTIN_PROFILERS))
        if unknown:
            raise ValueError(f"profilers: unknown {unknown}; built-in: {list(BUILTIN_PROFILERS)}")
        chosen = {name: builtin_profiler(name, interval=interval) for name in profilers}
    if not chosen or UNPROFILED in chosen:
        raise ValueError(f"profilers must name at least one profiler other than {UNPROFILED!r}")
    return chosen


def _timed(fn: Callable[[], object], calls: int, context: AbstractContextManager[Any]) -> float:
    with context:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - start) / calls


def _warm_up(fn: Callable[[], object]) -> None:
    """One unprofiled call before timing (caches, connection pools, imports), which also
    checks that the call does its work before it returns."""
    refuse_deferred_work(fn(), "overhead")


def overhead(
    fn: Callable[[], object],
    profilers: Sequence[str] | Mapping[str, Factory] = BUILTIN_PROFILERS,
    *,
    calls: int = 20,
    rounds: int = 5,
    interval: float = 0.001,
    progress: bool = False,
) -> pd.DataFrame:
    """Median seconds per call of ``fn`` unprofiled and under each profiler, and the ratio.

    Returns one row per subject, ``unprofiled`` first: ``profiler``, ``per_call_s``,
    ``ratio`` (to the unprofiled median), ``ratio_low`` and ``ratio_high`` (the lowest and
    highest ratio of one round to the unprofiled run of the same round), ``rounds``,
    ``calls``. ``interval`` is
    pyinstrument's sampling interval in seconds.
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    refuse_async(fn, "overhead")
    calls = positive_int("calls", calls)
    rounds = positive_int("rounds", rounds)
    interval = positive_number("interval", interval)
    subjects: dict[str, Factory] = {UNPROFILED: nullcontext, **_factories(profilers, interval)}
    refuse_nested("overhead")
    _warm_up(fn)
    for name, factory in subjects.items():  # and once under each profiler
        if name != UNPROFILED:
            _timed(fn, 1, factory())
    samples: dict[str, list[float]] = {name: [] for name in subjects}
    for _ in progress_bar(range(rounds), desc="overhead", disable=not progress):
        for name, factory in subjects.items():
            samples[name].append(_timed(fn, calls, factory()))
    base = statistics.median(samples[UNPROFILED])
    rows = []
    for name, values in samples.items():
        # each round's ratio to the unprofiled run of the same round: drift lands on both
        round_ratios = [v / b for v, b in zip(values, samples[UNPROFILED], strict=True)]
        rows.append(
            {
                "profiler": name,
                "per_call_s": statistics.median(values),
                "ratio": statistics.median(values) / base,
                "ratio_low": min(round_ratios),
                "ratio_high": max(round_ratios),
                "rounds": rounds,
                "calls": calls,
            }
        )
    return pd.DataFrame(rows)


def noise_verdict(low: float, high: float) -> str:
    """What a cost ratio measured over rounds says: ``low``-``high`` is its range over the
    rounds. A range that spans 1 cannot tell the cost from the machine's noise."""
    if low <= 1 <= high:
        return "indistinguishable from no overhead within the noise"
    return "above 1 in every round" if low > 1 else "below 1 in every round (noise, not a gain)"
