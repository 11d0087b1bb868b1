"""The five Redis limiters for asyncio servers: ``await limiter.hit(key)``.

Same algorithms, Lua scripts, constructor arguments, keys and :class:`Decision` as the
synchronous family in :mod:`course_lib.rate_limiting` (each class here is the synchronous
one with its I/O awaited), so a key counted by one family is counted by the other. They
take a ``redis.asyncio.Redis`` or ``redis.asyncio.RedisCluster`` client and run on the event
loop: no worker thread per request, as the synchronous limiters need in an ASGI app.

Guarantees are those of :class:`~course_lib.rate_limiting.redis_base.RedisLimiter`: one
atomic round trip per decision (one per batch for ``hit_many``, with one script call per
cluster slot), Redis server time, and the ``fail_open`` answer, never an exception, when
Redis cannot count now. Give them :func:`course_lib.services.fail_fast_async_client`
(``fail_fast_async_redis`` for another URL): no retries, so a dead server is noticed in a
known time, and a bounded ``BlockingConnectionPool`` that many concurrent tasks wait on for at
most ``pool_timeout`` seconds. redis-py's default asyncio pool instead raises
``MaxConnectionsError`` as soon as 100 tasks hold a connection. Either way a full pool is a
client setting, not a server outage: the limiter raises
:class:`~course_lib.services.PoolExhaustedError` rather than answering ``fail_open``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import redis
import redis.asyncio
import redis.asyncio.cluster

from . import redis_limiters
from .decision import Decision
from .redis_base import _to_decision

__all__ = ["GCRA", "FixedWindow", "RedisTokenBucket", "SlidingWindowCounter", "SlidingWindowLog"]


class _Awaited:
    """The I/O of a limiter, awaited; everything else comes from the synchronous class."""

    _client_types: ClassVar[tuple[type, ...]] = (
        redis.asyncio.Redis,
        redis.asyncio.cluster.RedisCluster,
    )
    _client_names: ClassVar[str] = "redis.asyncio.Redis or redis.asyncio.RedisCluster"

    async def hit(self: Any, key: str, cost: int = 1) -> Decision:
        """Count ``cost`` units against ``key`` if they fit; one atomic round trip."""
        keys, args = self._call(key, cost)
        try:
            reply = await self._script.acall(self.redis, keys, args)
        except redis.RedisError as exc:
            return self._unavailable(exc)
        return _to_decision(reply)

    async def hit_many(self: Any, keys_or_pairs: Iterable[str | tuple[str, int]]) -> list[Decision]:
        """Decide a batch in one pipelined round trip, one script call per cluster slot;
        decisions in input order."""
        calls, positions = self._batch(keys_or_pairs)
        if not calls:
            return []
        try:
            replies = await self._script.apipeline(self.redis, calls)
        except redis.RedisError as exc:
            replies = [exc] * len(calls)
        return self._decisions(replies, positions)


class FixedWindow(_Awaited, redis_limiters.FixedWindow):  # type: ignore[misc]
    __doc__ = redis_limiters.FixedWindow.__doc__


class SlidingWindowLog(_Awaited, redis_limiters.SlidingWindowLog):  # type: ignore[misc]
    __doc__ = redis_limiters.SlidingWindowLog.__doc__


class SlidingWindowCounter(_Awaited, redis_limiters.SlidingWindowCounter):  # type: ignore[misc]
    __doc__ = redis_limiters.SlidingWindowCounter.__doc__


class RedisTokenBucket(_Awaited, redis_limiters.RedisTokenBucket):  # type: ignore[misc]
    __doc__ = redis_limiters.RedisTokenBucket.__doc__


class GCRA(_Awaited, redis_limiters.GCRA):  # type: ignore[misc]
    __doc__ = redis_limiters.GCRA.__doc__
