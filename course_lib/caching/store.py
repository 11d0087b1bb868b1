"""The store behind a write-through or write-behind cache: ``load(key)`` and ``save(key, value)``.

:class:`Store` is the protocol; the course's implementation on its ``users`` table is
:class:`course_lib.caching.lesson.users.UserStore` (a service brings its own).

``save`` semantics, which the caches rely on:

- ``value`` without ``"version"``: an ordinary write; the row's ``version`` is incremented
  in the same statement and the row *as committed* is returned (write-through caches that).
- ``value`` with ``"version"``: an idempotent, ordered write (write-behind); it is applied
  only if the stored version is lower, so replaying an entry after a crash, or applying an
  older entry after a newer one, changes nothing. Returns the row, or ``None`` if skipped.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

__all__ = ["Store"]


@runtime_checkable
class Store(Protocol):
    """What a write-through or write-behind cache needs from the database."""

    def load(self, key: Any) -> dict[str, Any] | None: ...

    def save(self, key: Any, value: Mapping[str, Any]) -> dict[str, Any] | None: ...
