"""Write-through without I/O: settings, key names, the ``set_if_newer.lua`` call, counters.

What the sync shell (:mod:`course_lib.caching.write_through`) and the asyncio shell
(:mod:`course_lib.caching.aio.write_through`) share; nothing here talks to Redis or to the
database.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from typing import Any

from course_lib import lua
from course_lib.validation import instance_of, text, whole_milliseconds

from .._base import check_namespace
from ..serialization import dumps
from ..store import Store

__all__ = ["STAT_NAMES", "WriteThroughCore"]

log = logging.getLogger("course_lib.caching")

STAT_NAMES = ("writes", "hits", "misses", "cache_sets", "stale_sets_rejected", "redis_errors")


class WriteThroughCore:
    """Checked settings, key names, what :meth:`publish` sends and what its reply means,
    and thread-safe counters (``stats``)."""

    def __init__(self, redis: Any, store: Store, *, ttl: float, namespace: str) -> None:
        self.redis = redis  # a sync or asyncio client, as the shell needs
        self.ttl_ms = whole_milliseconds("ttl", ttl)
        self.namespace = check_namespace("namespace", text("namespace", namespace))
        self.store: Store = instance_of("store", store, Store, "a Store (load and save)")
        self.script = lua.load("course_lib.caching", "set_if_newer")
        self._lock = threading.Lock()
        self._stats = dict.fromkeys(STAT_NAMES, 0)

    @property
    def stats(self) -> dict[str, int]:
        with self._lock:
            return dict(self._stats)

    def count(self, name: str) -> None:
        with self._lock:
            self._stats[name] += 1

    def key(self, key: Any) -> str:
        """The Redis key of ``key``'s cached row (the user's key is its hash tag)."""
        return f"{self.namespace}:{{{key}}}"

    def version_key(self, key: Any) -> str:
        """Where the version of the cached row is kept, beside it (same slot), same TTL."""
        return f"{self.namespace}#v:{{{key}}}"

    def committed(self, key: Any, row: dict[str, Any] | None) -> dict[str, Any]:
        """The row ``store.save`` returned for a write of ``key``, counted."""
        if row is None:
            raise RuntimeError(f"store skipped the write of {key!r}")
        self.count("writes")
        return row

    def publish_call(self, key: Any, row: Mapping[str, Any]) -> lua.Call:
        """The keys and arguments of ``set_if_newer.lua`` caching ``row``."""
        version = row.get("version")
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise ValueError(f"row must carry its integer 'version' >= 0, got {version!r}")
        return [self.key(key), self.version_key(key)], [dumps(row), str(version), self.ttl_ms]

    def published(self, reply: Any) -> bool:
        """Whether the script cached the row (else the cache held the same or newer)."""
        stored = bool(reply)
        self.count("cache_sets" if stored else "stale_sets_rejected")
        return stored

    def found(self, raw: bytes | None) -> bool:
        """Whether a read found the row cached (a hit), counted."""
        self.count("misses" if raw is None else "hits")
        return raw is not None

    def redis_failed(self, doing: str, key: Any, exc: BaseException) -> None:
        """Redis failed ``doing`` (a cache write or read) of ``key``: counted and logged;
        the database, which has every write, answers instead."""
        self.count("redis_errors")
        log.warning("write-through %s of %r left to the store: %s", doing, key, exc)
