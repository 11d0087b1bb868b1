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


def test_hit_ratio_series_leaves_out_a_sparse_last_bucket():
    # 10 calls in each of three 0.1 s buckets, then 1 call (a miss) in a fourth
    times = [b * 0.1 + i * 0.009 for b in range(3) for i in range(10)] + [0.301]
    frame = pd.DataFrame({"t": times, "hit": [i % 2 == 0 for i in range(30)] + [False]})
    x, y = demos.hit_ratio_series(frame, bucket=0.1)
    assert len(x) == 3 and y == [0.5, 0.5, 0.5]
    # a last bucket as full as the others stays
    full = pd.concat(
        [frame, pd.DataFrame({"t": [0.31 + i * 0.009 for i in range(9)], "hit": True})]
    )
    assert len(demos.hit_ratio_series(full, bucket=0.1)[0]) == 4


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
