"""The course's charts: one style, one palette, every function returns a ``Figure``.

The same strategy gets the same colour in every notebook (:data:`PALETTE`, :func:`color`),
latency is shown as percentiles and CDFs rather than means, and titles are meant to state the
conclusion. Functions never call ``plt.show()``: notebooks display the returned figure,
tests inspect it.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterable, Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .measure import percentiles

__all__ = [
    "PALETTE",
    "Claim",
    "bar_by_category",
    "claim",
    "color",
    "ladder",
    "latency_cdf",
    "latency_hist",
    "new_figure",
    "step_timeline",
    "timeline",
]

# Same colour for the same strategy across the course.
PALETTE: dict[str, str] = {
    "naive": "#d62728",
    "seed": "#ff7f0e",
    "course_lib": "#2ca02c",
    "baseline": "#7f7f7f",
    "hit": "#2ca02c",
    "miss": "#d62728",
    "redis": "#dc382d",
    "postgres": "#336791",
    "postgresql": "#336791",
    "python": "#f2b701",
    "allowed": "#2ca02c",
    "denied": "#d62728",
    "fixed_window": "#9467bd",
    "sliding_window_log": "#1f77b4",
    "sliding_window_counter": "#17becf",
    "token_bucket": "#2ca02c",
    "gcra": "#8c564b",
    "tokens": "#1f77b4",
    "round_robin": "#1f77b4",
    "least_connections": "#2ca02c",
    "random": "#bcbd22",
    "write_through": "#1f77b4",
    "write_behind": "#9467bd",
}
# Names outside PALETTE: a colour picked by a stable hash of the name, from colours the
# palette does not use, so a name gets the same colour in every notebook and every run.
_EXTRA = (
    "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173",
    "#5254a3", "#8ca252", "#bd9e39", "#ad494a", "#a55194",
)  # fmt: skip

STYLE = {
    "figure.figsize": (8.0, 4.2),
    "figure.dpi": 100,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.titleweight": "bold",
    "axes.titlesize": 11,
    "legend.frameon": False,
}


def _key(name: str) -> str:
    # "gcra (11)": a label may carry a count in parentheses; the colour is the strategy's.
    name = re.sub(r"\s*\([^()]*\)$", "", name)
    return name.lower().replace(" ", "_").replace("-", "_")


def colors_for(names: Iterable[str]) -> dict[str, str]:
    """Colours for the series of one chart: :func:`color` for each, except that a name outside
    :data:`PALETTE` whose colour another series of the chart already has moves to the next
    free one, so no two series of a chart look alike. Deterministic for a given list."""
    taken: set[str] = set()
    chosen: dict[str, str] = {}
    for name in names:
        shade = color(name)
        if _key(name) not in PALETTE and shade in taken:
            start = _EXTRA.index(shade)
            free = [_EXTRA[(start + i) % len(_EXTRA)] for i in range(1, len(_EXTRA))]
            shade = next((c for c in free if c not in taken), shade)
        taken.add(shade)
        chosen[name] = shade
    return chosen


def color(name: str) -> str:
    """Colour of a strategy; names not in :data:`PALETTE` get a stable colour of their own."""
    key = _key(name)
    if key in PALETTE:
        return PALETTE[key]
    return _EXTRA[zlib.crc32(key.encode()) % len(_EXTRA)]


class Claim(str):
    """A chart title that states a conclusion, made by :func:`claim` after checking it."""

    __slots__ = ()


def claim(text: str, *, holds: object) -> Claim:
    """``text`` as a chart title, once ``holds`` (a check on the data the chart plots) is
    true. Raises ``AssertionError`` naming the title when it is not, so a notebook cannot
    show a title its own data contradicts; ``TypeError`` if ``holds`` is not a bool (a
    NumPy bool counts), so a number or a list cannot pass for a check."""
    if not isinstance(text, str) or not text:
        raise TypeError("text must be a non-empty str")
    if not isinstance(holds, bool | np.bool_):
        raise TypeError(f"holds must be a bool (the check), got {type(holds).__name__}")
    if not holds:
        raise AssertionError(f"the chart's title does not hold on its data: {text!r}")
    return Claim(text)


def new_figure(
    title: str, *, xlabel: str = "", ylabel: str = "", ncols: int = 1
) -> tuple[Figure, list]:
    """A figure in the course style with ``ncols`` axes side by side."""
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, ncols, squeeze=False, figsize=(4.2 * ncols + 3.8, 4.2))
    axes_list = list(axes[0])
    for ax in axes_list:
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)
    fig.suptitle(title, fontweight="bold", fontsize=11)
    plt.close(fig)  # the caller displays it; keeps pyplot from showing it twice
    return fig, axes_list


def _number(value: float) -> str:
    """Three significant digits, never in e-notation (1,304 rather than 1.3e+03)."""
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def _label_with_percentiles(label: str, values: Sequence[float], unit: str) -> str:
    p = percentiles(values)
    return f"{label} (p50 {_number(p['p50'])} {unit}, p99 {_number(p['p99'])} {unit})"


def latency_hist(
    samples: Mapping[str, Sequence[float]],
    title: str,
    *,
    unit: str = "ms",
    scale: float = 1e3,
    bins: int = 60,
    log_x: bool = True,
) -> Figure:
    """Overlaid histograms of latency samples (seconds, shown in ``unit`` via ``scale``)."""
    fig, (ax,) = new_figure(title, xlabel=f"latency ({unit})", ylabel="calls")
    scaled = {k: np.asarray(v, dtype=float) * scale for k, v in samples.items() if len(v)}
    if not scaled:
        raise ValueError("samples must hold at least one non-empty series")
    every = np.concatenate(list(scaled.values()))
    lo, hi = max(every.min(), 1e-9), every.max()
    edges = np.geomspace(lo, hi * 1.0001, bins) if log_x else np.linspace(lo, hi, bins)
    shades = colors_for(scaled)
    for label, values in scaled.items():
        ax.hist(
            values,
            bins=edges,
            alpha=0.55,
            color=shades[label],
            label=_label_with_percentiles(label, values, unit),
        )
    if log_x:
        ax.set_xscale("log")
    ax.legend()
    return fig


def latency_cdf(
    samples: Mapping[str, Sequence[float]],
    title: str,
    *,
    unit: str = "ms",
    scale: float = 1e3,
    log_x: bool = True,
) -> Figure:
    """Empirical CDF per label, with p50 and p99 in the legend."""
    fig, (ax,) = new_figure(title, xlabel=f"latency ({unit})", ylabel="fraction of calls ≤ x")
    shades = colors_for(samples)
    for label, values in samples.items():
        if not len(values):
            continue
        ordered = np.sort(np.asarray(values, dtype=float) * scale)
        fraction = np.arange(1, len(ordered) + 1) / len(ordered)
        ax.step(
            ordered,
            fraction,
            where="post",
            color=shades[label],
            label=_label_with_percentiles(label, ordered, unit),
        )
    for level in (0.5, 0.99):
        ax.axhline(level, color="#999999", linewidth=0.8, linestyle=":")
    if log_x:
        ax.set_xscale("log")
    ax.set_ylim(0, 1.01)
    ax.legend(loc="lower right")
    return fig


def timeline(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    title: str,
    *,
    xlabel: str = "time (s)",
    ylabel: str = "",
    markers: Mapping[str, tuple[Sequence[float], Sequence[float]]] | None = None,
    limits: Mapping[str, float] | None = None,
    integer_y: bool = False,
    steps: bool = False,
    distinct: bool = False,
) -> Figure:
    """Lines of ``(x, y)`` per label over time, plus optional scatter ``markers`` per label.

    Markers are how the course marks discrete events on a continuous quantity, e.g. the
    allowed and denied requests on a token-count line. ``limits`` draws dashed horizontal
    reference lines (``{"limit 20": 20}``); ``integer_y`` keeps y ticks on whole numbers
    (counts of requests); ``steps`` draws counts as steps, not slopes; ``distinct`` gives
    each line its own dash pattern and draws the first ones widest, so lines that coincide
    stay visible on top of each other. The legend sits outside the axes, so it never covers
    data.
    """
    fig, (ax,) = new_figure(title, xlabel=xlabel, ylabel=ylabel)
    shades = colors_for([*series, *(markers or {}), *(limits or {})])
    for rank, (label, (x, y)) in enumerate(series.items()):
        draw = ax.step if steps else ax.plot
        kwargs: dict[str, object] = {"where": "post"} if steps else {}
        if distinct:
            kwargs["linestyle"] = _DASHES[rank % len(_DASHES)]
            kwargs["linewidth"] = 1.2 + 2.0 * (len(series) - 1 - rank) / max(1, len(series) - 1)
        else:
            kwargs["linewidth"] = 1.6
        draw(x, y, color=shades[label], label=label, **kwargs)
    for label, (x, y) in (markers or {}).items():
        ax.scatter(x, y, color=shades[label], label=label, s=14, zorder=3)
    for label, level in (limits or {}).items():
        ax.axhline(level, color=shades[label], linestyle="--", linewidth=1.2, label=label)
    if integer_y:
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    _legend_outside(ax)
    return fig


_DASHES = ("-", "--", "-.", ":", (0, (5, 1, 1, 1)))


def _legend_outside(ax: Axes) -> None:
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)


def step_timeline(
    events: Mapping[str, Iterable[tuple[float, bool]]],
    title: str,
    *,
    xlabel: str = "time (s)",
) -> Figure:
    """One row per label, a tick per request at its time: allowed green, denied red."""
    fig, (ax,) = new_figure(title, xlabel=xlabel)
    labels = list(events)
    for row, label in enumerate(labels):
        pairs = list(events[label])
        for verdict in (True, False):
            xs = [t for t, ok in pairs if ok is verdict]
            ax.scatter(
                xs,
                [row] * len(xs),
                marker="|",
                s=120,
                color=PALETTE["allowed" if verdict else "denied"],
                label=("allowed" if verdict else "denied") if row == 0 else None,
            )
    ax.set_yticks(range(len(labels)), labels)
    ax.set_ylim(-0.6, len(labels) - 0.4)
    _legend_outside(ax)
    return fig


def bar_by_category(
    values: Mapping[str, float],
    title: str,
    *,
    ylabel: str = "",
    log: bool = False,
    annotate: str = "{:.3g}",
) -> Figure:
    """One bar per category, coloured by :func:`color`, value written on each bar."""
    fig, (ax,) = new_figure(title, ylabel=ylabel)
    names = list(values)
    heights = [values[n] for n in names]
    shades = colors_for(names)
    bars = ax.bar(names, heights, color=[shades[n] for n in names])
    if log:
        ax.set_yscale("log")
    for bar, height in zip(bars, heights, strict=True):
        ax.annotate(
            annotate.format(height),
            (bar.get_x() + bar.get_width() / 2, height),
            ha="center",
            va="bottom",
            fontsize=9,
        )
    return fig


def ladder(
    rungs: Mapping[str, float],
    title: str,
    *,
    unit: str = "µs",
    scale: float = 1e6,
) -> Figure:
    """The course's latency ladder, fastest at the top: one dot per rung on a log axis.

    Dots, not bars: a bar's length on a log axis depends on where the axis starts, so it
    would draw a ratio that is not in the data; a dot's position is the value itself.
    """
    fig, (ax,) = new_figure(title, xlabel=f"time per operation ({unit}, log scale)")
    names = list(rungs)[::-1]
    widths = [rungs[n] * scale for n in names]
    ax.scatter(widths, names, s=60, color=[color(n.split()[0]) for n in names], zorder=3)
    ax.set_xscale("log")
    ax.set_xlim(min(widths) / 3, max(widths) * 30)  # room for the labels right of the dots
    for y, width in enumerate(widths):
        shown = f"{width:,.0f}" if width >= 100 else f"{width:.3g}"
        ax.annotate(f"  {shown} {unit}", (width, y), va="center", fontsize=9)
    ax.grid(True, axis="x", which="both", alpha=0.3)
    return fig
