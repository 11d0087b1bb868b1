"""Exercises of notebook 05 (profiling); each checker runs the student's code for real.

- :func:`check_n_plus_1_fix`: the newest page of posts with their authors' names, from the
  blog on PostgreSQL, in at most 2 queries whatever the page size.
- :func:`check_bounded_cache`: an LRU page cache whose memory stops growing (measured with
  tracemalloc) and which keeps the most recently used pages.
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine, text

from course_lib import services
from course_lib.measure import QueryCounter
from course_lib.profiling import allocation_diff
from course_lib.profiling.lesson.service import PAGE, seed_blog

from .result import CheckResult, failed, not_attempted, passed

__all__ = ["check_bounded_cache", "check_n_plus_1_fix"]

_EXPECTED_PAGE = text(
    "SELECT p.id, p.title, a.name FROM posts p JOIN authors a ON a.id = p.author_id "
    "ORDER BY p.id DESC LIMIT :n"
)


def check_n_plus_1_fix(page_with_authors: Callable[[Engine], Any]) -> CheckResult:
    """``page_with_authors(engine)`` returns the newest ``PAGE`` (50) posts, newest first,
    each a dict ``{"id", "title", "author"}`` (the author's name), reading the blog's
    ``posts`` and ``authors`` tables through ``engine``. Checked on a freshly seeded blog: the
    rows, and at most 2 SQL statements (an N+1 runs 51)."""
    name = "check_n_plus_1_fix"
    schema = services.unique_schema("ex05")
    engine = services.schema_engine(schema)
    try:
        seed_blog(engine, seed=11)
        with engine.connect() as conn:
            expected = [
                {"id": i, "title": t, "author": a}
                for i, t, a in conn.execute(_EXPECTED_PAGE, {"n": PAGE})
            ]
        try:
            with QueryCounter(engine) as queries:
                got = page_with_authors(engine)
        except NotImplementedError:
            return not_attempted(name, "implement page_with_authors")
    finally:
        engine.dispose()
        services.drop_schema(schema)
    rows = [dict(row) for row in got] if isinstance(got, list) else got
    if rows != expected:
        first_bad = next(
            (i for i, (g, e) in enumerate(zip(rows, expected, strict=False)) if g != e), None
        )
        detail = (
            f"got {len(rows)} rows, expected {len(expected)}"
            if not isinstance(rows, list) or len(rows) != len(expected)
            else f"row {first_bad}: got {rows[first_bad]}, expected {expected[first_bad]}"
        )
        return failed(name, f"wrong page: {detail}")
    if queries.count > 2:
        return failed(
            name,
            f"{queries.count} SQL statements for {PAGE} posts: still an N+1 (load the authors "
            "with the posts: a join, joinedload or selectinload)",
        )
    return passed(name, f"{PAGE} posts with their authors in {queries.count} statement(s)")


def _page(key: str) -> bytes:
    """A page of about 2 KiB for ``key`` (the memory phase: nothing else is kept)."""
    return key.encode() + bytes(2048)


class _Builds:
    """A page builder that records the keys it built (the eviction phase)."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, key: str) -> bytes:
        self.calls.append(key)
        return _page(key)


def check_bounded_cache(make_cache: Callable[[int], Any]) -> CheckResult:
    """``make_cache(maxsize)`` returns an object whose ``get(key, build)`` returns the cached
    value for ``key``, or ``build(key)`` (then cached) on a miss. Checked: after 5000
    distinct keys with ``maxsize=100`` the memory it holds grows by under 1 MiB; a hit does
    not rebuild; with ``maxsize=3`` the least recently *used* key is evicted."""
    name = "check_bounded_cache"
    try:
        big = make_cache(100)
        big.get("/posts", _page)
    except NotImplementedError:
        return not_attempted(name, "implement make_cache")
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        for i in range(5000):
            big.get(f"/posts?utm_campaign=c{i}", _page)
        after = tracemalloc.take_snapshot()
    finally:
        if not was_tracing:
            tracemalloc.stop()
    growth = allocation_diff(before, after, n=3)
    held_kib = float(growth["grew_kib"].sum()) if len(growth) else 0.0
    if held_kib > 1024:
        top = growth.iloc[0]
        return failed(
            name,
            f"5000 distinct keys, maxsize=100: the cache holds {held_kib:,.0f} KiB more "
            f"(top site {top['site']}, +{top['grew_blocks']} blocks): it is not bounded",
        )
    cache, build = make_cache(3), _Builds()
    first = cache.get("a", build)
    if first != build("a") or cache.get("a", build) != first:
        return failed(name, "get('a', build) must return build('a')")
    if build.calls != ["a", "a"]:  # the checker's own build("a"), nothing from the hit
        return failed(name, "a hit rebuilt the page: get must return the cached value")
    build.calls.clear()
    for key in ("b", "c", "a", "d", "a", "b"):
        cache.get(key, build)
    # b, c built; a used again; d evicts the least recently used: b
    if build.calls != ["b", "c", "d", "b"]:
        return failed(
            name,
            f"maxsize=3, keys a,b,c,a,d,a,b: expected builds of b,c,d,b (d evicts b, the least "
            f"recently used; a stays), got builds of {','.join(build.calls) or 'nothing'}",
        )
    return passed(
        name, "5000 distinct keys with maxsize=100 held in under 1 MiB; hits do not rebuild; LRU"
    )
