"""Lesson helpers of notebook 03: what its charts plot is what the bucket did."""

from __future__ import annotations

from itertools import pairwise

import pandas as pd
import pytest

from course_lib.rate_limiting.lesson import replay as rp

# Replays and charts, no server: one pass of `make test` covers them.
pytestmark = pytest.mark.one_pass


def _slopes(xs: list[float], ys: list[float]) -> list[float]:
    points = pairwise(zip(xs, ys, strict=True))
    return [(y1 - y0) / (x1 - x0) for (x0, y0), (x1, y1) in points if x1 > x0]


def test_token_curve_reaches_capacity_after_the_last_request_then_stays_flat() -> None:
    # Drained to 0 at t=2; at 2 tokens/s it is full (10) at t=7 and flat until 12. Before the
    # fix the curve went straight from (2, 0) to (12, 10): 1 token/s, full only at the end.
    run = pd.DataFrame({"t": [1.0, 2.0], "after": [9.0, 0.0]})
    xs, ys = rp.token_curve(run, 10, 2, until=12)
    assert (xs[-2:], ys[-2:]) == ([7.0, 12.0], [10.0, 10.0])
    assert max(_slopes(xs, ys)) <= 2


def test_token_curve_on_the_notebook_trace_never_climbs_faster_than_the_refill() -> None:
    trace = rp.bursty_trace(seed=7)
    run = rp.run_seed_bucket(trace, capacity=10, refill_rate=2)
    xs, ys = rp.token_curve(run, 10, 2, until=25)
    assert max(_slopes(xs, ys)) <= 2 + 1e-9
    assert ys[-1] == 10 and xs[-2] < 25 and ys[-2] == 10


def test_excerpt_quotes_from_marker_to_marker_and_fails_when_a_marker_is_gone() -> None:
    from course_lib.rate_limiting.lesson.show import excerpt

    source = "def f():\n    a = 1\n    b = 2\n    return a + b\n"
    assert excerpt(source, "a = 1", "b = 2") == "a = 1\nb = 2"
    with pytest.raises(ValueError, match="last"):
        excerpt(source, "b = 2", "a = 1")
    with pytest.raises(ValueError, match="first"):
        excerpt(source, "c = 3", "return")


def test_small_multiples_draws_one_panel_per_series_on_shared_scales() -> None:
    from course_lib.rate_limiting.lesson.show import small_multiples

    fig = small_multiples(
        {"gcra": ([0, 1], [0, 5]), "token_bucket": ([0, 1], [0, 5]), "fixed_window": ([0], [1])},
        "t",
        ylabel="n",
        notes={"gcra": "5 admitted"},
        limit=4,
        ncols=2,
    )
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert len(visible) == 3 and visible[0].get_title() == "gcra\n5 admitted"
    assert visible[0].get_shared_y_axes().joined(visible[0], visible[2])
