"""The five Redis limiters on a blocking client (``redis.Redis`` or ``RedisCluster``).

Each class is its algorithm's sans-I/O core (:mod:`.algorithms`: arguments, guarantees,
script) with :class:`RedisLimiter`'s ``hit`` and ``hit_many``, which only send the core's
script calls and hand the replies back to it. :mod:`course_lib.rate_limiting.aio` puts the
same cores on an asyncio client.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

import redis
from redis.cluster import RedisCluster

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
    "FixedWindow",
    "RedisLimiter",
    "RedisTokenBucket",
    "SlidingWindowCounter",
    "SlidingWindowLog",
]


class RedisLimiter(LimiterCore):
    """The blocking shell of a limiter: one round trip per ``hit``, one per ``hit_many``
    batch; the guarantees are those of :mod:`.redis_base`."""

    client_types: ClassVar[tuple[type, ...]] = (redis.Redis, RedisCluster)
    client_names: ClassVar[str] = "redis.Redis or RedisCluster"

    def hit(self, key: str, cost: int = 1) -> Decision:
        """Count ``cost`` units against ``key`` if they fit; one atomic round trip.

        ``cost=0`` asks without spending. Raises ``ValueError`` for a negative cost or one
        above :attr:`quota`; never raises because Redis is unreachable (see ``fail_open``).
        """
        keys, args = self.script_call(key, cost)
        try:
            reply = self.script(self.redis, keys, args)
        except redis.RedisError as exc:
            return self.decision_on_error(exc)
        return self.decision(reply)

    def hit_many(self, keys_or_pairs: Iterable[str | tuple[str, int]]) -> list[Decision]:
        """Decide a batch in one pipelined round trip, one script call per cluster slot;
        decisions come back in input order.

        Items are keys (cost 1) or ``(key, cost)`` pairs; the same key may appear several
        times and is counted in order. All costs are validated before anything is sent.
        Each decision is the one ``hit`` would make, atomic on its own; the batch is not a
        transaction. A script call that fails answers ``fail_open`` for its keys only.
        """
        batch = self.batch(keys_or_pairs)
        if not batch.calls:
            return []
        try:
            replies = self.script.pipeline(self.redis, batch.calls)
        except redis.RedisError as exc:
            return self.batch_decisions_on_error(batch, exc)
        return self.batch_decisions(batch, replies)


# One class per algorithm: its core (arguments, guarantees, script), then this shell's I/O.


class FixedWindow(FixedWindowCore, RedisLimiter):
    __doc__ = FixedWindowCore.__doc__


class SlidingWindowLog(SlidingWindowLogCore, RedisLimiter):
    __doc__ = SlidingWindowLogCore.__doc__


class SlidingWindowCounter(SlidingWindowCounterCore, RedisLimiter):
    __doc__ = SlidingWindowCounterCore.__doc__


class RedisTokenBucket(RedisTokenBucketCore, RedisLimiter):
    __doc__ = RedisTokenBucketCore.__doc__


class GCRA(GCRACore, RedisLimiter):
    __doc__ = GCRACore.__doc__
