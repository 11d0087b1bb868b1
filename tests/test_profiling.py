"""course_lib.profiling: cProfile as a DataFrame, profiler overheads, allocation diffs and
flame graphs from py-spy's collapsed stacks."""

from __future__ import annotations

import asyncio
import cProfile
import sys
import time
import tracemalloc
import warnings

import pandas as pd
import pytest
from matplotlib.figure import Figure

from course_lib.profiling import (
    UNPROFILED,
    allocation_diff,
    builtin_profiler,
    overhead,
    profile_call,
    profile_fastest,
)
from course_lib.profiling.flame import flame_graph, read_collapsed, stack_share

# Profilers on in-process work, no server: one pass of `make test` covers them.
pytestmark = pytest.mark.one_pass


def leaf(x: int) -> int:
    return x + 1


def hot(n: int) -> int:
    total = 0
    for i in range(n):  # all its time is its own: no calls inside the loop
        total += i * i % 7
    return total


def cold() -> int:
    return sum(leaf(i) for i in range(100))


def request(n: int) -> int:
    return hot(n) + cold()


def test_profile_fastest_keeps_the_least_disturbed_run() -> None:
    pauses = iter([0.3, 0.0, 0.2])  # the first and last runs "preempted" for 0.3 and 0.2 s
    calls = []

    def request() -> int:
        calls.append(1)
        time.sleep(next(pauses))
        return len(calls)

    fastest = profile_fastest(request, 3)
    assert len(calls) == 3 and fastest.value == 2 and fastest.total_s < 0.2
    # counts are the kept run's, exact
    assert fastest.stats.set_index("function").at["<built-in method time.sleep>", "calls"] == 1
    with pytest.raises(ValueError, match="repeats"):
        profile_fastest(request, 0)

    async def handler() -> None:  # profile_call's refusals reach the caller, before any run
        calls.append(1)

    with pytest.raises(TypeError, match="async"):
        profile_fastest(handler, 3)
    assert len(calls) == 3


def test_profile_call_finds_the_planted_hot_function_and_counts_calls_exactly() -> None:
    result = profile_call(request, 200_000)
    assert result.value == request(200_000)
    top = result.top(1, by="own")
    assert top["function"].iloc[0].endswith("(hot)")
    assert result.row("leaf")["calls"] == 100
    assert result.row("hot")["calls"] == 1
    assert result.row("request")["cumulative_s"] >= result.row("hot")["cumulative_s"]
    assert result.top(3, by="cumulative")["function"].iloc[0].endswith("(request)")
    assert list(result.stats.columns)[:4] == ["function", "file", "line", "calls"]
    assert "cumulative" in result.print_stats(5) and "hot" in result.print_stats(5)


def test_profile_call_disables_the_profiler_when_the_call_raises() -> None:
    def boom() -> None:
        raise KeyError("planted")

    with pytest.raises(KeyError, match="planted"):
        profile_call(boom)
    assert sys.getprofile() is None
    assert profile_call(leaf, 1).value == 2  # a profiler can be enabled again


def test_profile_call_and_top_reject_bad_arguments() -> None:
    with pytest.raises(TypeError, match="fn"):
        profile_call(3)  # type: ignore[arg-type]
    result = profile_call(leaf, 1)
    with pytest.raises(ValueError, match="n"):
        result.top(0)
    with pytest.raises(ValueError, match="by"):
        result.top(3, by="wall")
    with pytest.raises(KeyError):
        result.row("no_such_function")


def call_heavy() -> int:
    return sum(leaf(i) for i in range(20_000))


def test_cprofile_overhead_is_clearly_above_one_on_a_call_heavy_workload() -> None:
    table = overhead(call_heavy, ["cprofile", "tracemalloc"], calls=3, rounds=5)
    mixed = overhead(call_heavy, {"cprofile": builtin_profiler("cprofile")}, calls=3, rounds=5)
    assert mixed["ratio"].iloc[1] > 1.3, mixed
    assert list(table["profiler"]) == [UNPROFILED, "cprofile", "tracemalloc"]
    ratios = dict(zip(table["profiler"], table["ratio"], strict=True))
    assert ratios[UNPROFILED] == 1.0
    # a hook on each of 40 000 calls and returns: typically 2-4x; 1.3 leaves a wide margin
    assert ratios["cprofile"] > 1.3, table
    assert (table["rounds"] == 5).all() and (table["calls"] == 3).all()


def test_overhead_accepts_any_context_manager_and_rejects_bad_profilers() -> None:
    entered = []

    class Counting:
        def __enter__(self) -> None:
            entered.append(1)

        def __exit__(self, *exc: object) -> None:
            return None

    table = overhead(lambda: leaf(1), {"counting": Counting})
    assert list(table["profiler"]) == [UNPROFILED, "counting"]
    assert len(entered) == 1 + 5  # warm-up, then one per round
    with pytest.raises(ValueError, match="unknown"):
        overhead(call_heavy, ["cprofile", "perf"])
    with pytest.raises(TypeError, match="profilers"):
        overhead(call_heavy, "cprofile")
    with pytest.raises(ValueError, match="calls"):
        overhead(call_heavy, calls=0)
    with pytest.raises(TypeError, match="fn"):
        overhead(None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="name"):
        builtin_profiler("perf")


LEAK: list[bytes] = []


def leak(n: int) -> None:
    for _ in range(n):
        LEAK.append(bytes(1000) + b"x")  # the planted leak: line LEAK_LINE


LEAK_LINE = leak.__code__.co_firstlineno + 2


def test_allocation_diff_names_the_planted_leak_site() -> None:
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        leak(2000)
        noise = [str(i) for i in range(100)]  # a small allocation that must rank below
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    table = allocation_diff(before, after, n=5)
    assert len(table) <= 5 and noise
    top = table.iloc[0]
    assert (top["file"], top["line"]) == (__file__, LEAK_LINE)
    assert top["grew_blocks"] >= 2000
    assert top["grew_kib"] >= 2000 * 1000 / 1024
    assert "tracemalloc" not in " ".join(table["file"])
    LEAK.clear()


def test_allocation_diff_rejects_bad_arguments() -> None:
    tracemalloc.start()
    try:
        snap = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    with pytest.raises(TypeError, match="before"):
        allocation_diff(None, snap)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n"):
        allocation_diff(snap, snap, n=0)
    assert allocation_diff(snap, snap).empty


COLLAPSED = """\
main (app.py:3);handler (app.py:9);query (db.py:4) 6
main (app.py:3);handler (app.py:10);query (db.py:5) 2
main (app.py:3);handler (app.py:11);render (views.py:7) 2
main (app.py:3);startup (app.py:1) 10
 5
"""


def test_read_collapsed_merges_lines_of_one_function_and_shares_are_exact() -> None:
    stacks = read_collapsed(COLLAPSED)
    assert stacks[("main (app.py)", "handler (app.py)", "query (db.py)")] == 8
    assert stacks[()] == 5  # samples with no Python frame
    assert sum(stacks.values()) == 25
    assert stack_share(stacks, "query", root="handler") == pytest.approx(0.8)
    assert stack_share(stacks, "render", root="handler") == pytest.approx(0.2)
    assert stack_share(stacks, "startup") == pytest.approx(10 / 25)
    with pytest.raises(ValueError, match="line 1"):
        read_collapsed("main (app.py:3) lots\n")
    with pytest.raises(ValueError, match="no samples"):
        stack_share(stacks, "query", root="nowhere")


def test_flame_graph_draws_one_box_per_frame_wide_by_its_samples() -> None:
    fig = flame_graph(read_collapsed(COLLAPSED), root="handler", title="handler")
    assert isinstance(fig, Figure)
    boxes = [p for p in fig.axes[0].patches if p.get_height() > 0.5]
    # handler, query, render
    assert sorted(round(b.get_width()) for b in boxes) == [20, 80, 100]


def test_stats_frame_is_a_dataframe_sorted_by_own_time() -> None:
    stats = profile_call(request, 50_000).stats
    assert isinstance(stats, pd.DataFrame)
    assert stats["own_s"].is_monotonic_decreasing


def test_public_names_are_the_documented_objects_whatever_was_imported_first() -> None:
    import importlib
    import types

    import course_lib.profiling as profiling

    for module in ("calls", "costs", "memory", "apm", "spans", "flame"):
        importlib.import_module(f"course_lib.profiling.{module}")
    for name in profiling.__all__:
        assert not isinstance(getattr(profiling, name), types.ModuleType), name
    assert profiling.waterfall.__module__ == "course_lib.profiling.spans"
    with pytest.raises(AttributeError, match="nope"):
        profiling.nope  # noqa: B018


async def async_request(n: int) -> int:
    await asyncio.sleep(0)
    return hot(n)


def rows_of(n: int):
    yield from range(hot(n))


def test_profile_call_refuses_work_that_would_run_after_it_and_profiles_what_runs_it() -> None:
    with pytest.raises(TypeError, match=r"^fn must be a synchronous function, got the async"):
        profile_call(async_request, 10)  # before: profiled the coroutine's creation only
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the refused coroutine is closed: no "never awaited"
        with pytest.raises(TypeError, match=r"^fn returned a coroutine: its work runs after"):
            profile_call(lambda: async_request(10))
    with pytest.raises(TypeError, match=r"^fn returned a generator"):
        profile_call(rows_of, 10)
    result = profile_call(lambda: asyncio.run(async_request(50_000)))  # what the error says
    assert result.value == hot(50_000)
    assert result.row("hot")["calls"] == 1  # the coroutine's work, inside the profile
    assert list(profile_call(lambda: list(rows_of(5))).value) == list(range(hot(5)))


def test_overhead_refuses_an_async_function_or_a_deferred_result() -> None:
    with pytest.raises(TypeError, match=r"^fn must be a synchronous function"):
        overhead(async_request, ["tracemalloc"], calls=1, rounds=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^fn returned a coroutine"):
        overhead(lambda: async_request(10), ["tracemalloc"], calls=1, rounds=1)
    table = overhead(lambda: asyncio.run(async_request(10)), ["tracemalloc"], calls=1, rounds=1)
    assert list(table["profiler"]) == [UNPROFILED, "tracemalloc"]


def test_profilers_refuse_to_nest_instead_of_losing_rows() -> None:
    # before, on 3.11: the inner profile took the thread's hook, the outer lost its rows
    with pytest.raises(RuntimeError, match=r"^profile_call: another profiler is already"):
        profile_call(lambda: profile_call(leaf, 1))
    with pytest.raises(RuntimeError, match=r"^overhead: another profiler"):
        profile_call(lambda: overhead(call_heavy, ["tracemalloc"], calls=1, rounds=1))
    outer = cProfile.Profile()
    outer.enable()
    try:
        for name in ("cprofile", "pyinstrument"):
            with pytest.raises(RuntimeError, match=rf"^{name}: another profiler"):
                builtin_profiler(name)().__enter__()
    finally:
        outer.disable()
    assert sys.getprofile() is None
    assert profile_call(request, 1000).row("leaf")["calls"] == 100  # one at a time: fine
