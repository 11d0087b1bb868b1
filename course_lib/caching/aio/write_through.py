"""Write-through on an asyncio Redis client: the asyncio shell of
:class:`~course_lib.caching.core.write_through.WriteThroughCore`, with the guarantees of
:mod:`course_lib.caching.write_through`.

``redis`` is a ``redis.asyncio.Redis`` or ``redis.asyncio.cluster.RedisCluster``. The store
is the same sync :class:`~course_lib.caching.store.Store`: its calls run in a worker thread
(``asyncio.to_thread``), so a database round trip never stalls the event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from redis.exceptions import RedisError

from ..core.write_through import WriteThroughCore
from ..serialization import loads

__all__ = ["AsyncWriteThrough"]


class AsyncWriteThrough(WriteThroughCore):
    """``AsyncWriteThrough(redis, store, ttl=3600, namespace="user")``."""

    async def write(self, key: Any, fields: Mapping[str, Any]) -> dict[str, Any]:
        """Save ``fields`` in the store, then cache the committed row; return that row."""
        row = self.committed(key, await asyncio.to_thread(self.store.save, key, fields))
        await self.publish(key, row)
        return row

    async def publish(self, key: Any, row: Mapping[str, Any]) -> bool:
        """Cache ``row`` unless the cache holds the same or a newer version; ``True`` if cached."""
        keys, args = self.publish_call(key, row)
        try:
            return self.published(await self.script.acall(self.redis, keys, args))
        except RedisError as exc:
            self.redis_failed("cache write", key, exc)
            return False

    async def read(self, key: Any) -> dict[str, Any] | None:
        """The cached row, else the stored row (cached on the way); ``None`` if absent."""
        try:
            raw = await self.redis.get(self.key(key))
        except RedisError as exc:
            self.redis_failed("read", key, exc)
            return await asyncio.to_thread(self.store.load, key)
        if self.found(raw):
            return loads(raw)
        row = await asyncio.to_thread(self.store.load, key)
        if row is not None:
            await self.publish(key, row)
        return row
