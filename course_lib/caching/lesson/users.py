"""The ``users`` table the caching notebook reads and writes, its deterministic seeding, and
:class:`UserStore`, the :class:`~course_lib.caching.store.Store` the write caches use on it.

Lesson code: the cache patterns depend on Redis only (a service brings its own store);
this is the course's PostgreSQL side of them, with SQLAlchemy Core (bound parameters only).
``User`` and ``users_table`` are the course's one model of ``users`` (:mod:`course_lib.models`,
which notebook 04 queries too), not a copy of it.

``seed_users(engine, n, seed)`` drops and recreates the table in the engine's schema
(``search_path``), with the ``posts`` that reference it if there are any, and inserts ``n``
rows generated from ``random.Random(seed)``: the same seed always gives the same rows.
``version`` starts at 0 and is what write-through and write-behind compare to keep caches
and the database from going backwards.
"""

from __future__ import annotations

import os
import random
import threading
import weakref
from collections.abc import Iterator, Mapping
from typing import Any

from sqlalchemy import BigInteger, Column, Engine, Integer, SmallInteger, String, Table, select
from sqlalchemy.dialects.postgresql import insert

from course_lib.models import Base, Post, User
from course_lib.validation import int_in_range, positive_int, string

__all__ = [
    "COLUMNS",
    "User",
    "UserStore",
    "seed_users",
    "users_table",
]

users_table: Table = User.__table__  # type: ignore[assignment]

COLUMNS = tuple(users_table.columns.keys())
PLANS = ("free", "pro", "team", "enterprise")
_FIRST = ("Ana", "Bruno", "Carla", "Diego", "Elisa", "Fabio", "Gabi", "Hugo", "Iris", "Joao")
_LAST = ("Silva", "Souza", "Costa", "Lima", "Rocha", "Alves", "Pereira", "Gomes")

_WRITABLE = frozenset(COLUMNS) - {"id", "version"}


def _rows(n: int, seed: int) -> Iterator[dict[str, object]]:
    rng = random.Random(seed)
    for user_id in range(1, n + 1):
        first, last = rng.choice(_FIRST), rng.choice(_LAST)
        yield {
            "id": user_id,
            "name": f"{first} {last}",
            "email": f"{first.lower()}.{last.lower()}{user_id}@example.com",
            "plan": rng.choice(PLANS),
            "score": rng.randrange(1000),
            "version": 0,
        }


def seed_users(engine: Engine, n: int = 5000, *, seed: int = 42) -> int:
    """Recreate ``users`` in the engine's schema with ``n`` deterministic rows; return ``n``.
    ``posts`` that reference the old rows are dropped with them."""
    positive_int("n", n)
    with engine.begin() as conn:
        # posts reference users: the posts of the users being replaced go with them
        Base.metadata.drop_all(conn, tables=[Post.__table__, users_table])
        users_table.create(conn)
        conn.execute(users_table.insert(), list(_rows(n, seed)))
    return n


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
        bits = 64 if isinstance(kind, BigInteger) else 16 if isinstance(kind, SmallInteger) else 32
        low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        int_in_range(name, value, low, high, why=f" ({bits}-bit column)")
    elif isinstance(kind, String):
        string(name, value)


class UserStore:
    """:class:`~course_lib.caching.store.Store` on ``users`` in the engine's schema. Keys are
    user ids (int or str)."""

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
            user_id = int(key)
        except (TypeError, ValueError):
            raise ValueError(f"key must be a user id, got {key!r}") from None
        _check_column(users_table.c.id, user_id)  # before the database refuses it
        return user_id

    def load(self, key: Any) -> dict[str, Any] | None:
        """The row as a dict, or ``None`` if there is no such user."""
        with self.engine.connect() as conn:
            row = conn.execute(select(self.table).where(self.table.c.id == self._id(key))).first()
        return None if row is None else dict(row._mapping)

    @staticmethod
    def validate(value: Any) -> dict[str, Any]:
        """The writable columns of ``value``; ``ValueError`` naming any unknown column or any
        value the column would refuse (``NULL`` in a ``NOT NULL`` column, an integer outside
        the column's range, e.g. ``2**40`` for PostgreSQL's ``integer``), ``TypeError`` for
        a value of the wrong type (the rules of :mod:`course_lib.validation`).

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
