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

This is the sync shell: the settings, keys and decisions are
:class:`~course_lib.caching.core.write_through.WriteThroughCore`'s, and
:class:`course_lib.caching.aio.AsyncWriteThrough` is the asyncio shell.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from redis.exceptions import RedisError

from .core.write_through import WriteThroughCore
from .serialization import loads

__all__ = ["WriteThrough"]


class WriteThrough(WriteThroughCore):
    """``WriteThrough(redis, store, ttl=3600, namespace="user")``."""

    def write(self, key: Any, fields: Mapping[str, Any]) -> dict[str, Any]:
        """Save ``fields`` in the store, then cache the committed row; return that row."""
        row = self.committed(key, self.store.save(key, fields))
        self.publish(key, row)
        return row

    def publish(self, key: Any, row: Mapping[str, Any]) -> bool:
        """Cache ``row`` unless the cache holds the same or a newer version; ``True`` if cached.

        The second half of :meth:`write`, public so a race can be scripted step by step.
        """
        keys, args = self.publish_call(key, row)
        try:
            return self.published(self.script(self.redis, keys, args))
        except RedisError as exc:
            self.redis_failed("cache write", key, exc)
            return False

    def read(self, key: Any) -> dict[str, Any] | None:
        """The cached row, else the stored row (cached on the way); ``None`` if absent."""
        try:
            raw = self.redis.get(self.key(key))
        except RedisError as exc:
            self.redis_failed("read", key, exc)
            return self.store.load(key)
        if self.found(raw):
            return loads(raw)
        row = self.store.load(key)
        if row is not None:
            self.publish(key, row)
        return row
