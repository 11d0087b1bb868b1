"""Keyset ("seek") pagination: the next page starts after the last key seen, not at an offset.

``OFFSET n`` makes the server produce and throw away ``n`` rows before the page, so page
1000 costs a thousand pages' worth of work, and rows inserted meanwhile shift every later
page (duplicates, skipped rows). ``WHERE key > :last ORDER BY key LIMIT :size`` walks the
index straight to the page: the cost is the same on page 1 and page 1000.

Guarantees of :func:`keyset_page`: the key must be unique (use ``(created_at, id)``, not
``created_at``); the statement has no ``OFFSET``; walking it page after page visits every
row exactly once, in key order, even if rows are inserted behind the cursor meanwhile.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from sqlalchemy import ColumnElement, Select, tuple_
from sqlalchemy.orm import Session

from course_lib.validation import non_negative_int, positive_int

__all__ = ["iter_keyset", "keyset_page", "offset_page"]


def _keys(key: ColumnElement[Any] | Sequence[ColumnElement[Any]]) -> list[ColumnElement[Any]]:
    keys = list(key) if isinstance(key, (list, tuple)) else [key]
    if not keys:
        raise ValueError("key must name at least one column")
    return keys


def keyset_page(
    stmt: Select[Any],
    key: ColumnElement[Any] | Sequence[ColumnElement[Any]],
    *,
    after: Any = None,
    size: int,
) -> Select[Any]:
    """``stmt`` restricted to the ``size`` rows whose ``key`` comes after ``after``
    (``None``: the first page). ``key`` is a column or a tuple of columns (a row
    comparison, ``(a, b) > (:a, :b)``, which PostgreSQL serves from a composite index)."""
    positive_int("size", size)
    keys = _keys(key)
    if after is not None:
        if len(keys) == 1:
            stmt = stmt.where(keys[0] > after)
        else:
            if not isinstance(after, (list, tuple)) or len(after) != len(keys):
                raise ValueError(f"after must be a tuple of {len(keys)} values, got {after!r}")
            stmt = stmt.where(tuple_(*keys) > tuple_(*after))
    return stmt.order_by(*keys).limit(size)


def offset_page(
    stmt: Select[Any],
    key: ColumnElement[Any] | Sequence[ColumnElement[Any]],
    *,
    page: int,
    size: int,
) -> Select[Any]:
    """Page ``page`` (from 0) of ``stmt`` with ``LIMIT/OFFSET``: the baseline keyset beats."""
    non_negative_int("page", page)
    positive_int("size", size)
    return stmt.order_by(*_keys(key)).limit(size).offset(page * size)


def iter_keyset(
    session: Session,
    stmt: Select[Any],
    key: ColumnElement[Any],
    *,
    size: int,
) -> Iterator[list[Any]]:
    """Every page of ``stmt`` (ORM entities or rows), one query per page, by keyset.

    ``key`` is a single unique column selected by ``stmt``'s first entity; the last row of
    each page gives the next page's ``after``.
    """
    after = None
    name = key.key  # type: ignore[attr-defined]
    while True:
        page = list(session.scalars(keyset_page(stmt, key, after=after, size=size)))
        if not page:
            return
        yield page
        after = getattr(page[-1], name)
        if len(page) < size:
            return
