"""How ``course_lib.caching`` turns values into bytes for Redis and back: JSON, never pickle.

Guarantees:

- :func:`dumps` produces compact UTF-8 JSON; :func:`loads` only ever parses JSON, so bytes
  read from Redis (which anyone with access can write) can never execute code, as
  ``pickle.loads`` would.
- :func:`to_jsonable` converts what a database hands back (SQLAlchemy ORM objects and rows,
  ``datetime``, ``date``, ``Decimal``, ``UUID``) into plain JSON types. The conversion is
  one way: a ``datetime`` comes back as its ISO 8601 string.
- Anything else raises ``TypeError`` naming the type, at write time rather than read time.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

__all__ = ["dumps", "loads", "to_jsonable"]


def _orm_columns(obj: Any) -> dict[str, Any] | None:
    """The mapped columns of a SQLAlchemy ORM object (its class's ``__mapper__``), or
    ``None``. Found by duck typing, so the cache does not depend on SQLAlchemy: only a
    program that uses it can hand one over."""
    mapper = getattr(type(obj), "__mapper__", None)
    if mapper is None:
        return None
    return {attr.key: getattr(obj, attr.key) for attr in mapper.column_attrs}


def _default(obj: Any) -> Any:
    if isinstance(obj, dt.datetime | dt.date | dt.time):
        return obj.isoformat()
    if isinstance(obj, Decimal | uuid.UUID):
        return str(obj)
    if isinstance(obj, Mapping):
        return dict(obj)
    mapping = getattr(obj, "_mapping", None)  # a SQLAlchemy Row
    if isinstance(mapping, Mapping):
        return dict(mapping)
    columns = _orm_columns(obj)
    if columns is not None:
        return columns
    raise TypeError(f"cannot cache a {type(obj).__name__}: not JSON-serialisable")


def to_jsonable(value: Any) -> Any:
    """``value`` as plain dicts, lists, strings, numbers, booleans and ``None``."""
    return json.loads(dumps(value))


def dumps(value: Any) -> bytes:
    """Compact JSON bytes of ``value`` (see :func:`to_jsonable` for what is converted)."""
    return json.dumps(value, default=_default, separators=(",", ":"), ensure_ascii=False).encode()


def loads(raw: bytes | str) -> Any:
    """Parse JSON read from Redis."""
    return json.loads(raw)
