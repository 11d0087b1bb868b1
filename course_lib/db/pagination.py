"""Keyset ("seek") pagination: the next page starts after the last key seen, not at an offset.

``OFFSET n`` makes the server produce and throw away ``n`` rows before the page, so page
1000 costs a thousand pages' worth of work, and rows inserted meanwhile shift every later
page (duplicates, skipped rows). ``WHERE key > :last ORDER BY key LIMIT :size`` walks the
index straight to the page: the cost is the same on page 1 and page 1000.

Guarantees of :func:`keyset_page` and :func:`iter_keyset`: the key is refused
(``ValueError`` naming ``key``) unless its columns are ``NOT NULL`` table columns that the
table's metadata declares unique together (a primary key, ``unique=True``, a unique
constraint or index): use ``(created_at, id)``, not ``created_at``. A NULL key would never
be ``>`` anything (its rows would be skipped, or a page ending on one would start over), a
repeated key would skip the rows that share the last key of a page. A statement with its own
``ORDER BY``, ``LIMIT`` or ``OFFSET`` is refused (``ValueError`` naming ``stmt``): the pages
would follow that order, not the key's. The page statement has no ``OFFSET``; walking the
pages visits every row exactly once, in key order, even if rows are inserted behind the cursor
meanwhile.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from sqlalchemy import Column, ColumnElement, Select, UniqueConstraint, inspect, tuple_
from sqlalchemy.orm import Mapper, Session

from course_lib.validation import non_negative_int, positive_int

__all__ = ["iter_keyset", "keyset_page", "offset_page"]


def _keys(key: ColumnElement[Any] | Sequence[ColumnElement[Any]]) -> list[ColumnElement[Any]]:
    keys = list(key) if isinstance(key, (list, tuple)) else [key]
    if not keys:
        raise ValueError("key must name at least one column")
    return keys


def _table_column(key: object) -> Column[Any]:
    column = getattr(key, "expression", key)  # an ORM attribute stands for its column
    if not isinstance(column, Column) or column.table is None:
        raise ValueError(f"key must be table columns (ORM attributes or Columns), got {key!r}")
    return column


def _check_key(keys: list[ColumnElement[Any]]) -> None:
    """Refuse a key the pages cannot follow exactly once (see the module docstring)."""
    columns = [_table_column(key) for key in keys]
    nullable = [str(column) for column in columns if column.nullable]
    if nullable:
        raise ValueError(f"key must be NOT NULL columns; {', '.join(nullable)} can be NULL")
    names = {(column.table, column.name) for column in columns}
    # not column.primary_key: it is True for each column of a composite primary key, which
    # is unique only as a whole (the table's primary key set is added below)
    unique_sets = [[column] for column in columns if column.unique]
    for table in {column.table for column in columns}:
        unique_sets.append(list(table.primary_key.columns))  # type: ignore[attr-defined]
        unique_sets += [
            list(c.columns) for c in table.constraints if isinstance(c, UniqueConstraint)
        ]
        unique_sets += [list(index.columns) for index in table.indexes if index.unique]  # type: ignore[attr-defined]
    if not any(s and {(c.table, c.name) for c in s} <= names for s in unique_sets):
        raise ValueError(
            f"key must be declared unique (primary key, unique=True, a unique constraint or "
            f"index); {', '.join(str(c) for c in columns)} is not: add the primary key to it"
        )


def _check_statement(stmt: Select[Any]) -> None:
    if not isinstance(stmt, Select):
        raise TypeError(f"stmt must be a select(), got {type(stmt).__name__}")
    # private attributes: SQLAlchemy has no public accessor for a Select's ORDER BY or LIMIT
    if stmt._order_by_clauses or stmt._limit_clause is not None or stmt._offset_clause is not None:
        raise ValueError("stmt must have no ORDER BY, LIMIT or OFFSET: the key orders the pages")


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
    _check_statement(stmt)
    keys = _keys(key)
    _check_key(keys)
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
    """Every page of ``stmt``, one query per page, by keyset (see the module's guarantees).

    A statement of one ORM entity (``select(Post)``) gives pages of entities, and ``key`` is
    a column of that entity's table; any other statement (``select(Post.id, Post.title)``)
    gives pages of rows, and ``key`` is one of its selected columns. The key's value in the
    last item of a page is the next page's ``after``. Arguments are checked at the call, not
    at the first page.
    """
    if not isinstance(session, Session):
        raise TypeError(f"session must be a Session, got {type(session).__name__}")
    if isinstance(key, (list, tuple)):
        raise TypeError("key must be one column here; keyset_page takes a tuple of columns")
    keyset_page(stmt, key, size=size)  # checks stmt, key and size now
    column = _table_column(key)
    (first, *others) = stmt.column_descriptions
    mapper = inspect(first["expr"], raiseerr=False) if not others else None
    if isinstance(mapper, Mapper):
        if column.table is not mapper.local_table:
            raise ValueError(f"key must be a column of {mapper.class_.__name__}'s table")
        name = mapper.get_property_by_column(column).key
        return _pages(session, stmt, key, size, lambda entity: getattr(entity, name), True)
    selected = [getattr(d["expr"], "expression", d["expr"]) for d in stmt.column_descriptions]
    if not any(isinstance(s, ColumnElement) and s.shares_lineage(column) for s in selected):
        raise ValueError(f"key must be one of stmt's selected columns, got {column}")
    return _pages(session, stmt, key, size, lambda row: row._mapping[column], False)


def _pages(
    session: Session,
    stmt: Select[Any],
    key: ColumnElement[Any],
    size: int,
    key_of: Callable[[Any], Any],
    entities: bool,
) -> Iterator[list[Any]]:
    """The pages themselves (a generator: :func:`iter_keyset` checks before the first one)."""
    after = None
    while True:
        query = keyset_page(stmt, key, after=after, size=size)
        page = list(session.scalars(query) if entities else session.execute(query))
        if not page:
            return
        yield page
        after = key_of(page[-1])
        if len(page) < size:
            return
