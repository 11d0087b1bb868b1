"""Write-through: every write goes to the database, then the committed row to the cache.

Guarantees:

- The cache holds whole rows *as committed* (``store.save`` returns them), never just the
  fields a caller changed.
- The cache never goes backwards: a row is cached only if its ``version`` is higher than the
  cached one (``set_if_newer.lua``, which compares versions exactly, also above 2^53). Two
  writers that commit in one order and reach Redis in the other leave the newer row cached,
  not the older one until the TTL.
- Redis being unreachable does not fail a write (the database is the source of truth): it is
  counted in ``stats["redis_errors"]``; ``read`` then serves from the store.

Redis Cluster: ``redis`` may be a ``redis.cluster.RedisCluster``. The row ``<namespace>:{<key>}``
and its version ``<namespace>#v:{<key>}`` share the user's key as hash tag, so
``set_if_newer.lua`` touches one slot (a namespace must not contain braces). A failover
loses what the old primary had not replicated; the database still has every write, so the
cache is at worst missing a row (read again from the store), never going backwards past a
row it still holds.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from typing import Any

from redis.exceptions import RedisError

from course_lib import lua

from ._base import _milliseconds, check_namespace
from .serialization import dumps, loads
from .store import Store

__all__ = ["WriteThrough"]

log = logging.getLogger("course_lib.caching")


class WriteThrough:
    """``WriteThrough(redis, store, ttl=3600, namespace="user")``."""

    def __init__(self, redis: Any, store: Store, *, ttl: float, namespace: str) -> None:
        self.ttl = _milliseconds("ttl", ttl)
        if not isinstance(namespace, str) or not namespace.strip():
            raise ValueError(f"namespace must be a non-empty string, got {namespace!r}")
        check_namespace("namespace", namespace)
        if not isinstance(store, Store):
            raise TypeError(f"store must have load(key) and save(key, value), got {store!r}")
        self.redis = redis
        self.store = store
        self.namespace = namespace
        self._set_if_newer = lua.load(__package__, "set_if_newer").bind(redis)
        self._lock = threading.Lock()
        self._stats = dict.fromkeys(
            ("writes", "hits", "misses", "cache_sets", "stale_sets_rejected", "redis_errors"), 0
        )

    @property
    def stats(self) -> dict[str, int]:
        with self._lock:
            return dict(self._stats)

    def _count(self, name: str) -> None:
        with self._lock:
            self._stats[name] += 1

    def key(self, key: Any) -> str:
        """The Redis key of ``key``'s cached row (the user's key is its hash tag)."""
        return f"{self.namespace}:{{{key}}}"

    def version_key(self, key: Any) -> str:
        """Where the version of the cached row is kept, beside it (same slot), same TTL."""
        return f"{self.namespace}#v:{{{key}}}"

    def write(self, key: Any, fields: Mapping[str, Any]) -> dict[str, Any]:
        """Save ``fields`` in the store, then cache the committed row; return that row."""
        row = self.store.save(key, fields)
        if row is None:
            raise RuntimeError(f"store skipped the write of {key!r}")
        self._count("writes")
        self.publish(key, row)
        return row

    def publish(self, key: Any, row: Mapping[str, Any]) -> bool:
        """Cache ``row`` unless the cache holds the same or a newer version; ``True`` if cached.

        The second half of :meth:`write`, public so a race can be scripted step by step.
        """
        version = row.get("version")
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise ValueError(f"row must carry its integer 'version' >= 0, got {version!r}")
        try:
            stored = bool(
                self._set_if_newer(
                    keys=[self.key(key), self.version_key(key)],
                    args=[dumps(row), str(version), int(self.ttl * 1000)],
                )
            )
        except RedisError as exc:
            self._count("redis_errors")
            log.warning("write-through could not cache %r: %s", key, exc)
            return False
        self._count("cache_sets" if stored else "stale_sets_rejected")
        return stored

    def read(self, key: Any) -> dict[str, Any] | None:
        """The cached row, else the stored row (cached on the way); ``None`` if absent."""
        try:
            raw = self.redis.get(self.key(key))
        except RedisError as exc:
            self._count("redis_errors")
            log.warning("write-through read of %r served from the store: %s", key, exc)
            return self.store.load(key)
        if raw is not None:
            self._count("hits")
            return loads(raw)
        self._count("misses")
        row = self.store.load(key)
        if row is not None:
            self.publish(key, row)
        return row
