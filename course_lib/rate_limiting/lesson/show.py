"""Showing notebook 03's results: source excerpts and one-panel-per-limiter charts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from course_lib import charts

__all__ = ["excerpt", "small_multiples"]


def excerpt(source: str, first: str, last: str) -> str:
    """The lines of ``source`` from the first one containing ``first`` to the next one
    containing ``last`` (both included), dedented by the first line's indent.

    Raises ``ValueError`` naming the marker that is missing, so a notebook quoting an
    excerpt fails when the source it quotes changes instead of showing the wrong lines.
    """
    lines = source.splitlines()
    start = next((i for i, line in enumerate(lines) if first in line), None)
    if start is None:
        raise ValueError(f"first: {first!r} is not in the source")
    end = next((i for i in range(start, len(lines)) if last in lines[i]), None)
    if end is None:
        raise ValueError(f"last: {last!r} is not in the source after {first!r}")
    indent = len(lines[start]) - len(lines[start].lstrip())
    return "\n".join(line[indent:] for line in lines[start : end + 1])


def small_multiples(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    title: str,
    *,
    ylabel: str,
    xlabel: str = "time (s)",
    notes: Mapping[str, str] | None = None,
    limit: float | None = None,
    ncols: int | None = None,
) -> Figure:
    """One panel per series (same x and y scales), drawn as steps in the series' colour
    (:func:`course_lib.charts.color`), so series that coincide are never hidden under each
    other. ``notes[name]`` is added to a panel's title (e.g. a count); ``limit`` draws a
    dashed reference line in every panel."""
    if not series:
        raise ValueError("series must not be empty")
    cols = ncols or len(series)
    rows = -(-len(series) // cols)
    with plt.rc_context(charts.STYLE):
        fig, axes = plt.subplots(
            rows,
            cols,
            sharex=True,
            sharey=True,
            squeeze=False,
            figsize=(max(8.0, 2.3 * cols + 1), 2.6 * rows + 0.8),
        )
    flat = list(axes.flat)
    for ax, (name, (x, y)) in zip(flat, series.items(), strict=False):
        ax.step(x, y, where="post", color=charts.color(name), linewidth=1.8)
        if limit is not None:
            ax.axhline(limit, color=charts.PALETTE["baseline"], linestyle="--", linewidth=1)
        note = (notes or {}).get(name)
        ax.set_title(f"{name}\n{note}" if note else name, fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in flat[len(series) :]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel(xlabel)
    for ax in axes[:, 0]:
        ax.set_ylabel(ylabel)
    if limit is not None:
        flat[0].annotate(
            f"limit {limit:g}",
            (0, limit),
            xycoords=("axes fraction", "data"),
            xytext=(2, 3),
            textcoords="offset points",
            fontsize=8,
            color=charts.PALETTE["baseline"],
        )
    fig.suptitle(title, fontweight="bold", fontsize=11)
    fig.tight_layout()
    plt.close(fig)  # the caller displays it
    return fig
