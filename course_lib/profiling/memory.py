"""Where memory grew between two :mod:`tracemalloc` snapshots.

:func:`allocation_diff` compares ``after`` with ``before`` line by line and returns the
``n`` sites whose live allocations grew most: file, line, growth in KiB and in blocks, and
the size held at ``after``. Allocations made by tracemalloc itself and by the import system
are left out, so the table names the caller's code. Take the snapshots with enough frames
(``tracemalloc.start(1)`` is enough for a line; more frames cost more and only matter for
``traceback`` grouping, which this table does not use).
"""

from __future__ import annotations

import tracemalloc

import pandas as pd

from course_lib.validation import positive_int

__all__ = ["ALLOCATION_COLUMNS", "allocation_diff"]

ALLOCATION_COLUMNS = ["file", "line", "site", "grew_kib", "grew_blocks", "size_kib", "blocks"]
_NOISE = (
    tracemalloc.Filter(False, tracemalloc.__file__),
    tracemalloc.Filter(False, "<frozen importlib._bootstrap>"),
    tracemalloc.Filter(False, "<frozen importlib._bootstrap_external>"),
    tracemalloc.Filter(False, "<unknown>"),
)


def allocation_diff(
    before: tracemalloc.Snapshot, after: tracemalloc.Snapshot, n: int = 10
) -> pd.DataFrame:
    """The ``n`` allocation sites that grew most from ``before`` to ``after``."""
    for name, snapshot in (("before", before), ("after", after)):
        if not isinstance(snapshot, tracemalloc.Snapshot):
            raise TypeError(f"{name} must be a tracemalloc.Snapshot, got {type(snapshot).__name__}")
    n = positive_int("n", n)
    diffs = after.filter_traces(_NOISE).compare_to(before.filter_traces(_NOISE), "lineno")
    growing = sorted(
        (d for d in diffs if d.size_diff > 0), key=lambda d: d.size_diff, reverse=True
    )[:n]
    rows = []
    for diff in growing:
        frame = diff.traceback[0]
        short = "/".join(frame.filename.rsplit("/", 2)[-2:])
        rows.append(
            {
                "file": frame.filename,
                "line": frame.lineno,
                "site": f"{short}:{frame.lineno}",
                "grew_kib": diff.size_diff / 1024,
                "grew_blocks": diff.count_diff,
                "size_kib": diff.size / 1024,
                "blocks": diff.count,
            }
        )
    return pd.DataFrame(rows, columns=ALLOCATION_COLUMNS)
