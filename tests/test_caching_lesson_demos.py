"""The caching notebook's experiments (lesson code) measure what the notebook says they do."""

from __future__ import annotations

import pandas as pd
import pytest

from course_lib.caching import CacheAside
from course_lib.caching.lesson import demos


def test_replay_follows_its_schedule_and_classifies_hits(redis, ns):
    cache = CacheAside(redis, lambda k: {"k": k}, ttl=60, namespace=ns)
    frame = demos.replay(cache, [1, 1, 2, 1], interval=0.05)
    assert list(frame.hit) == [False, True, False, True]
    # call i starts no earlier than i * interval: the replay's length is the schedule's
    assert all(t >= i * 0.05 - 1e-6 for i, t in enumerate(frame.t))
    assert frame.t.iloc[-1] >= 0.15


def test_replay_refuses_a_negative_interval(redis, ns):
    with pytest.raises(ValueError, match="interval"):
        demos.replay(CacheAside(redis, lambda k: k, ttl=60, namespace=ns), [1], interval=-1)


@pytest.mark.one_pass
def test_hit_ratio_series_is_a_ratio_of_equal_runs_of_calls():
    # 30 calls alternating hit/miss, then 2 misses: runs of 10 calls, the short last run left out
    times = [i * 0.01 for i in range(32)]
    frame = pd.DataFrame({"t": times, "hit": [i % 2 == 0 for i in range(30)] + [False, False]})
    x, y = demos.hit_ratio_series(frame, calls=10)
    assert y == [0.5, 0.5, 0.5]
    assert x == pytest.approx([0.045, 0.145, 0.245])  # each run's median time
    # a last run of at least half the size stays
    assert len(demos.hit_ratio_series(frame.iloc[:25], calls=10)[0]) == 3
    with pytest.raises(ValueError, match="calls"):
        demos.hit_ratio_series(frame, calls=0)


@pytest.mark.timeout(60)
def test_stampede_failures_counts_the_seeds_hung_and_mistyped_callers(ns):
    seed = demos.stampede_failures("seed", [3, 6], namespace=ns, timeout=0.5)
    assert seed == [
        {"other_type": 2, "hung": 2, "raised": 1},
        {"other_type": 5, "hung": 5, "raised": 1},
    ]
    course_lib = demos.stampede_failures("course_lib", [3, 6], namespace=ns, timeout=10)
    assert course_lib == [
        {"other_type": 0, "hung": 0, "raised": 3},
        {"other_type": 0, "hung": 0, "raised": 6},
    ]


@pytest.mark.parametrize(
    ("strategy", "levels", "match"),
    [("naive", [3], "strategy"), ("seed", [], "levels"), ("seed", [0], "levels")],
)
def test_stampede_failures_refuses_bad_arguments(strategy, levels, match):
    with pytest.raises(ValueError, match=match):
        demos.stampede_failures(strategy, levels, namespace="unused")


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("strategy", "expected"), [("naive", 20), ("seed", 4), ("course_lib", 1)])
def test_stampede_over_processes_counts_every_process(strategy, expected, ns):
    """The processes meet before their callers go: one that finished its set-up late would
    otherwise find the value cached by the others (27 naive loads for 100 callers, seen on a
    busy machine), and the chart would show a stampede smaller than the one that happens."""
    result = demos.stampede(strategy, 20, namespace=ns, delay=0.1, processes=4, model="asyncio")
    assert result.loader_calls == expected and result.errors == 0
