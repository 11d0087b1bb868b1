"""The write-behind producer on an asyncio Redis client (a web app's request handlers
queue writes here; the consumer is a process of its own, see
:class:`course_lib.caching.write_behind.WorkerProcess`).

The asyncio shell of :class:`~course_lib.caching.core.write_behind.ProducerCore`, with the
guarantees of :mod:`course_lib.caching.write_behind`: the same script, keys and entries, so
sync and asyncio producers can feed one stream. ``redis`` is a ``redis.asyncio.Redis`` or
``redis.asyncio.cluster.RedisCluster``. The store is the same sync
:class:`~course_lib.caching.store.Store`: its one call here (reading a row not cached yet)
runs in a worker thread (``asyncio.to_thread``), so it never stalls the event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from redis.exceptions import ResponseError

from ..core.write_behind import (
    ProducerCore,
    check_replicas,
    decode_record,
    group_exists,
    reply_text,
    stored_record,
    write_args,
)

__all__ = ["AsyncWriteBehindProducer"]


class AsyncWriteBehindProducer(ProducerCore):
    """``AsyncWriteBehindProducer(redis, store, stream="wb:users", group="db-writers")``."""

    async def write(self, key: Any, value: Mapping[str, Any]) -> str:
        """Merge the changed columns ``value`` into the cached record and queue the whole
        record for the store; the entry id (see
        :meth:`course_lib.caching.write_behind.WriteBehindProducer.write`)."""
        keys, fields = self.prepare(key, value)
        if not self.declared:
            await self._declare()
        entry = await self._queue(keys, write_args(key, fields))
        if entry is None:  # not cached: start the record from the stored row
            stored = await asyncio.to_thread(self.store.load, key)
            entry = await self._queue(keys, write_args(key, fields, stored or {}))
        return reply_text(entry)

    async def _declare(self) -> None:
        """Create the stream and its group if missing (from the stream's first entry)."""
        try:
            await self.redis.xgroup_create(self.keys.stream, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if not group_exists(exc):
                raise
        self.declared = True

    async def _queue(self, keys: list[str], args: list[Any]) -> Any:
        """Run the write script; with ``replicas``, ``WAIT`` for them on the same connection."""
        if not self.replicas:
            return await self.script.acall(self.redis, keys, args)
        pipe = self.redis.pipeline(transaction=False)
        self.queue_replicated(pipe, keys, args)
        return check_replicas(*await pipe.execute(), self.replicas)

    async def read(self, key: Any) -> dict[str, Any] | None:
        """The cached record, else the stored one without its ``version``; ``None`` if
        neither has it."""
        raw = await self.redis.hgetall(self.keys.record(key))
        if raw:
            return decode_record(raw)
        return stored_record(await asyncio.to_thread(self.store.load, key))
