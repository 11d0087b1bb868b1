"""The five Redis limiters for asyncio servers: ``await limiter.hit(key)``.

Same algorithms, Lua scripts, constructor arguments, keys and :class:`Decision` as the
blocking limiters of :mod:`course_lib.rate_limiting` (:mod:`.redis_limiters`): each class
here is its algorithm's sans-I/O core (:mod:`.algorithms`) with :class:`AsyncRedisLimiter`'s
``hit`` and ``hit_many``, which only await the core's script calls and hand the replies back
to it. So a key counted by one family is counted by the other, and the guarantees are those
of :mod:`.redis_base`. They take a ``redis.asyncio.Redis`` or ``redis.asyncio.RedisCluster``
client and run on the event loop: no worker thread per request, as the blocking limiters
need in an ASGI app.

Give them :func:`course_lib.services.fail_fast_async_client` (``fail_fast_async_redis`` for
another URL): no retries, so a dead server is noticed in a known time, and a bounded
``BlockingConnectionPool`` that many concurrent tasks wait on for at most ``pool_timeout``
seconds. redis-py's default asyncio pool instead raises ``MaxConnectionsError`` as soon as
100 tasks hold a connection; either way a full pool is a client setting, not a server
outage: the limiter raises :class:`~course_lib.redis_errors.PoolExhaustedError` rather than
answering ``fail_open``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

import redis
import redis.asyncio
import redis.asyncio.cluster

from .algorithms import (
    FixedWindowCore,
    GCRACore,
    RedisTokenBucketCore,
    SlidingWindowCounterCore,
    SlidingWindowLogCore,
)
from .decision import Decision
from .redis_base import LimiterCore

__all__ = [
    "GCRA",
    "AsyncRedisLimiter",
    "FixedWindow",
    "RedisTokenBucket",
    "SlidingWindowCounter",
    "SlidingWindowLog",
]


class AsyncRedisLimiter(LimiterCore):
    """The asyncio shell of a limiter: ``await hit(...)``, ``await hit_many(...)``, one
    round trip each."""

    client_types: ClassVar[tuple[type, ...]] = (
        redis.asyncio.Redis,
        redis.asyncio.cluster.RedisCluster,
    )
    client_names: ClassVar[str] = "redis.asyncio.Redis or redis.asyncio.RedisCluster"

    async def hit(self, key: str, cost: int = 1) -> Decision:
        """Count ``cost`` units against ``key`` if they fit; one atomic round trip.

        ``cost=0`` asks without spending. Raises ``ValueError`` for a negative cost or one
        above :attr:`quota`; never raises because Redis is unreachable (see ``fail_open``).
        """
        keys, args = self.script_call(key, cost)
        try:
            reply = await self.script.acall(self.redis, keys, args)
        except redis.RedisError as exc:
            return self.decision_on_error(exc)
        return self.decision(reply)

    async def hit_many(self, keys_or_pairs: Iterable[str | tuple[str, int]]) -> list[Decision]:
        """Decide a batch in one pipelined round trip, one script call per cluster slot;
        decisions in input order (see the blocking ``RedisLimiter.hit_many``)."""
        batch = self.batch(keys_or_pairs)
        if not batch.calls:
            return []
        try:
            replies = await self.script.apipeline(self.redis, batch.calls)
        except redis.RedisError as exc:
            return self.batch_decisions_on_error(batch, exc)
        return self.batch_decisions(batch, replies)


# One class per algorithm: its core (arguments, guarantees, script), then this shell's I/O.


class FixedWindow(FixedWindowCore, AsyncRedisLimiter):
    __doc__ = FixedWindowCore.__doc__


class SlidingWindowLog(SlidingWindowLogCore, AsyncRedisLimiter):
    __doc__ = SlidingWindowLogCore.__doc__


class SlidingWindowCounter(SlidingWindowCounterCore, AsyncRedisLimiter):
    __doc__ = SlidingWindowCounterCore.__doc__


class RedisTokenBucket(RedisTokenBucketCore, AsyncRedisLimiter):
    __doc__ = RedisTokenBucketCore.__doc__


class GCRA(GCRACore, AsyncRedisLimiter):
    __doc__ = GCRACore.__doc__
