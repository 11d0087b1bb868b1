"""``course_lib.charts``: every helper returns a titled Figure in the course palette."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest
from matplotlib.colors import to_hex
from matplotlib.figure import Figure

from course_lib import charts

# Charts use no server: one pass of `make test` covers them.
pytestmark = pytest.mark.one_pass

rng = random.Random(1)
FAST = [rng.uniform(0.0001, 0.0002) for _ in range(200)]
SLOW = [rng.uniform(0.002, 0.004) for _ in range(200)]


def test_same_strategy_same_colour_everywhere() -> None:
    assert charts.color("course_lib") == charts.PALETTE["course_lib"]
    assert charts.color("Token Bucket") == charts.PALETTE["token_bucket"]
    assert charts.color("something new") == charts.color("Something New")
    extras = {charts.color(f"series {i}") for i in range(40)}
    assert len(extras) > 4 and not extras & set(charts.PALETTE.values())


def test_unknown_names_get_the_same_colour_in_every_process() -> None:
    # Another process with another str hash seed than ours (a colour picked by hash() differs)
    seed = "1" if os.environ.get("PYTHONHASHSEED") != "1" else "2"
    script = "from course_lib import charts; print(charts.color('ttl 5 s'))"
    other = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": seed},
    )
    assert other.stdout == charts.color("ttl 5 s") + "\n"


def test_empty_samples_are_a_clear_error() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        charts.latency_hist({"hit": []}, "nothing")


def test_latency_hist_and_cdf_show_percentiles_in_legend() -> None:
    for make in (charts.latency_hist, charts.latency_cdf):
        fig = make({"hit": FAST, "miss": SLOW}, "Hits are 20x faster")
        assert isinstance(fig, Figure)
        assert fig.get_suptitle() == "Hits are 20x faster"
        (ax,) = fig.axes
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert labels[0].startswith("hit (p50 ") and "p99" in labels[0]
        assert ax.get_xscale() == "log" and "ms" in ax.get_xlabel()


def test_cdf_uses_strategy_colours() -> None:
    fig = charts.latency_cdf({"naive": SLOW, "course_lib": FAST}, "t")
    colours = [to_hex(line.get_color()) for line in fig.axes[0].get_lines()[:2]]
    assert colours == [charts.PALETTE["naive"], charts.PALETTE["course_lib"]]


def test_bar_timeline_step_and_ladder() -> None:
    bars = charts.bar_by_category({"naive": 100, "course_lib": 1}, "Loader calls", log=True)
    assert [round(p.get_height()) for p in bars.axes[0].patches] == [100, 1]
    line = charts.timeline(
        {"tokens": ([0, 1, 2], [5, 3, 4])}, "Tokens", markers={"denied": ([1], [3])}
    )
    assert len(line.axes[0].get_lines()) == 1 and len(line.axes[0].collections) == 1
    steps = charts.step_timeline(
        {"a": [(0.0, True), (0.5, False)], "b": [(0.1, True)]}, "Decisions"
    )
    assert [t.get_text() for t in steps.axes[0].get_yticklabels()] == ["a", "b"]
    ladder = charts.ladder({"Python dict lookup": 2e-8, "Redis GET": 5e-5}, "Ladder")
    # dots on the log axis, no bars (a bar's length there depends on where the axis starts)
    assert ladder.axes[0].get_xscale() == "log" and not ladder.axes[0].patches
    assert len(ladder.axes[0].collections[0].get_offsets()) == 2


def test_new_figure_columns() -> None:
    _, axes = charts.new_figure("Side by side", xlabel="s", ylabel="n", ncols=3)
    assert len(axes) == 3 and axes[0].get_xlabel() == "s"


def test_series_of_one_chart_never_share_a_colour() -> None:
    names = [f"ttl {t} s" for t in (0.1, 0.25, 0.5, 1, 2, 5, 10)] + ["naive", "course_lib"]
    shades = charts.colors_for(names)
    assert len(set(shades.values())) == len(names)
    assert shades == charts.colors_for(names)  # deterministic
    fig = charts.timeline({n: ([0, 1], [0, 1]) for n in names}, "t")
    assert len({to_hex(line.get_color()) for line in fig.axes[0].get_lines()}) == len(names)
