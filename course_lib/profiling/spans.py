"""One request's spans as a table and as a waterfall chart, from finished spans.

:func:`span_table` puts each span on a row (start order, parents before children) with its
depth in the tree, start and duration in milliseconds from the first span's start, what it
talks to (``python``, ``redis``, ``postgresql``) and the statement or command it carries.
:func:`waterfall` draws the same rows as horizontal bars; the repeated lookups of an N+1
share one row, labelled with their count, so they show as a comb of short database bars.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from opentelemetry.sdk.trace import ReadableSpan

from course_lib.charts import color, new_figure

__all__ = ["SPAN_COLUMNS", "span_table", "waterfall"]

SPAN_COLUMNS = [
    "name",
    "system",
    "statement",
    "depth",
    "start_ms",
    "duration_ms",
    "span_id",
    "parent_id",
]
# old and stable semantic-convention names; the instrumentations emit one or the other
_SYSTEM_KEYS = ("db.system", "db.system.name")
_STATEMENT_KEYS = ("db.statement", "db.query.text")


def _first(span: ReadableSpan, keys: Sequence[str]) -> str:
    attributes = span.attributes or {}
    for key in keys:
        if key in attributes:
            return str(attributes[key])
    return ""


def span_table(spans: Sequence[ReadableSpan]) -> pd.DataFrame:
    """One row per finished span; see the module docstring. Raises ``ValueError`` if empty."""
    spans = list(spans)
    if not spans:
        raise ValueError("spans is empty: nothing was traced")
    for span in spans:
        if not isinstance(span, ReadableSpan) or span.end_time is None:
            raise TypeError("spans must hold finished OpenTelemetry SDK spans")
    ids = {span.context.span_id for span in spans}
    by_id = {span.context.span_id: span for span in spans}

    def depth(span: ReadableSpan) -> int:
        level = 0
        while span.parent is not None and span.parent.span_id in ids:
            span = by_id[span.parent.span_id]
            level += 1
        return level

    origin = min(span.start_time for span in spans)  # type: ignore[type-var]
    rows = []
    for span in sorted(spans, key=lambda s: (s.start_time, depth(s))):
        rows.append(
            {
                "name": span.name,
                "system": _first(span, _SYSTEM_KEYS) or "python",
                "statement": _first(span, _STATEMENT_KEYS),
                "depth": depth(span),
                "start_ms": (span.start_time - origin) / 1e6,  # type: ignore[operator]
                "duration_ms": (span.end_time - span.start_time) / 1e6,  # type: ignore[operator]
                "span_id": f"{span.context.span_id:016x}",
                "parent_id": f"{span.parent.span_id:016x}" if span.parent else "",
            }
        )
    return pd.DataFrame(rows, columns=SPAN_COLUMNS)


def _label(row: pd.Series, width: int = 48) -> str:
    text = " ".join(row["statement"].split()) or row["name"]
    return text if len(text) <= width else text[: width - 1] + "…"


def _bands(table: pd.DataFrame) -> list[list[int]]:
    """Rows of ``table`` grouped into bands: a run of consecutive leaf spans with the same
    parent and the same label (an N+1's fifty lookups) is one band; any other span is a
    band of its own."""
    parents = set(table["parent_id"])
    bands: list[list[int]] = []
    for index, row in table.iterrows():
        leaf = row["span_id"] not in parents
        if bands and leaf:
            last = table.loc[bands[-1][-1]]
            same = last["parent_id"] == row["parent_id"] and _label(last) == _label(row)
            if same and last["span_id"] not in parents:
                bands[-1].append(index)
                continue
        bands.append([index])
    return bands


def waterfall(spans: Sequence[ReadableSpan], title: str = "") -> Figure:
    """Horizontal bars from the first span's start (ms), one row per span in start order,
    except that a run of identical leaf spans under one parent (an N+1's lookups) shares one
    row, labelled with its count: the repetition shows as a comb of short bars."""
    table = span_table(spans)
    bands = _bands(table)
    title = title or f"{len(table)} spans of one request"
    fig, (ax,) = new_figure(title, xlabel="time since the request started (ms)")
    fig.set_size_inches(10, min(2.0 + 0.3 * len(bands), 14))
    labels = []
    for position, band in enumerate(bands):
        y = len(bands) - 1 - position  # first span at the top
        rows = table.loc[band]
        ax.barh(
            [y] * len(rows),
            rows["duration_ms"],
            left=rows["start_ms"],
            color=[color(system) for system in rows["system"]],
            height=0.7,
        )
        label = _label(rows.iloc[0])
        labels.append(f"{label}  × {len(rows)}" if len(rows) > 1 else label)
    ax.set_yticks(list(range(len(bands)))[::-1], labels, fontsize=8)
    ax.set_ylim(-0.7, len(bands) - 0.3)
    ax.grid(True, axis="x", alpha=0.3)
    ax.grid(False, axis="y")
    systems = list(dict.fromkeys(table["system"]))
    ax.legend(  # outside the axes: a corner inside would hide the last spans' bars
        handles=[Patch(color=color(s), label=s) for s in systems],
        loc="upper left",
        bbox_to_anchor=(1.0, 1.0),
        fontsize=8,
    )
    fig.tight_layout()
    return fig
