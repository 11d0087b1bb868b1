"""The store behind a write-through or write-behind cache: ``load(key)`` and ``save(key, value)``.

:class:`Store` is the protocol; :class:`UserStore` implements it on the ``users`` table with
SQLAlchemy Core (bound parameters only).

``save`` semantics, which the caches rely on:

- ``value`` without ``"version"``: an ordinary write; the row's ``version`` is incremented
  in the same statement and the row *as committed* is returned (write-through caches that).
- ``value`` with ``"version"``: an idempotent, ordered write (write-behind); it is applied
  only if the stored version is lower, so replaying an entry after a crash, or applying an
  older entry after a newer one, changes nothing. Returns the row, or ``None`` if skipped.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

from sqlalchemy import BigInteger, Column, Engine, Integer, SmallInteger, String, select
from sqlalchemy.dialects.postgresql import insert

from .users import COLUMNS, users_table

__all__ = ["Store", "UserStore"]

_WRITABLE = frozenset(COLUMNS) - {"id", "version"}


@runtime_checkable
class Store(Protocol):
    """What a write-through or write-behind cache needs from the database."""

    def load(self, key: Any) -> dict[str, Any] | None: ...

    def save(self, key: Any, value: Mapping[str, Any]) -> dict[str, Any] | None: ...


_stores: weakref.WeakSet[UserStore] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # A forked child must not reuse the parent's pooled connections (SQLAlchemy's advice).
    for store in list(_stores):
        store.engine.dispose(close=False)


os.register_at_fork(after_in_child=_after_fork_in_child)


def _check_column(column: Column[Any], value: Any) -> None:
    name = column.name
    if value is None:
        if not column.nullable:
            raise ValueError(f"{name} must not be None (the column is NOT NULL)")
        return
    kind = column.type
    if isinstance(kind, Integer):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer, got {type(value).__name__}")
        bits = 64 if isinstance(kind, BigInteger) else 16 if isinstance(kind, SmallInteger) else 32
        low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        if not low <= value <= high:
            raise ValueError(f"{name} must be in [{low}, {high}] ({bits}-bit column), got {value}")
    elif isinstance(kind, String) and not isinstance(value, str):
        raise ValueError(f"{name} must be a string, got {type(value).__name__}")


class UserStore:
    """:class:`Store` on ``users`` in the engine's schema. Keys are user ids (int or str)."""

    def __init__(self, engine: Engine) -> None:
        if not isinstance(engine, Engine):
            raise TypeError(f"engine must be a sqlalchemy Engine, got {type(engine).__name__}")
        self.engine = engine
        self.table = users_table
        self._lock = threading.Lock()
        self.writes = 0
        _stores.add(self)

    @staticmethod
    def _id(key: Any) -> int:
        try:
            return int(key)
        except (TypeError, ValueError):
            raise ValueError(f"key must be a user id, got {key!r}") from None

    def load(self, key: Any) -> dict[str, Any] | None:
        """The row as a dict, or ``None`` if there is no such user."""
        with self.engine.connect() as conn:
            row = conn.execute(select(self.table).where(self.table.c.id == self._id(key))).first()
        return None if row is None else dict(row._mapping)

    @staticmethod
    def validate(value: Any) -> dict[str, Any]:
        """The writable columns of ``value``; ``ValueError`` naming any unknown column or any
        value the column would refuse (wrong type, ``NULL`` in a ``NOT NULL`` column, an
        integer outside the column's range, e.g. ``2**40`` for PostgreSQL's ``integer``).

        ``id`` and ``version`` are not writable: the key and the store decide them. Checking
        here, before anything is cached or queued, is what keeps one bad value of a
        write-behind record from poisoning the valid writes merged after it.
        """
        if not isinstance(value, Mapping):
            raise TypeError(f"value must be a mapping of columns, got {type(value).__name__}")
        fields = {k: v for k, v in value.items() if k not in ("id", "version")}
        unknown = set(fields) - _WRITABLE
        if unknown:
            raise ValueError(
                f"value has unknown columns {sorted(unknown)}; known: {sorted(_WRITABLE)}"
            )
        for name, item in fields.items():
            _check_column(users_table.c[name], item)
        return fields

    def save(self, key: Any, value: Mapping[str, Any]) -> dict[str, Any] | None:
        """Insert or update the row (see the module docstring); the row as committed."""
        fields = self.validate(value)
        table = self.table
        user_id = self._id(key)
        if "version" in value:
            version = int(value["version"])
            stmt = insert(table).values(id=user_id, version=version, **fields)
            stmt = stmt.on_conflict_do_update(
                index_elements=[table.c.id],
                set_={**{k: stmt.excluded[k] for k in fields}, "version": stmt.excluded.version},
                where=table.c.version < stmt.excluded.version,
            )
        else:
            stmt = insert(table).values(id=user_id, version=1, **fields)
            stmt = stmt.on_conflict_do_update(
                index_elements=[table.c.id],
                set_={**{k: stmt.excluded[k] for k in fields}, "version": table.c.version + 1},
            )
        with self.engine.begin() as conn:
            row = conn.execute(stmt.returning(*table.c)).first()
        if row is None:
            return None
        with self._lock:
            self.writes += 1
        return dict(row._mapping)
