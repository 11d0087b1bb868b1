"""The five Redis limiters for asyncio servers: ``await limiter.hit(key)``.

Same algorithms, Lua scripts, constructor arguments, keys and :class:`Decision` as the
blocking limiters of :mod:`course_lib.rate_limiting` (the same sans-I/O cores, with an
asyncio shell instead of a blocking one), so a key counted by one family is counted by the
other. They take a ``redis.asyncio.Redis`` or ``redis.asyncio.RedisCluster`` client and run
on the event loop: no worker thread per request, as the blocking limiters need in an ASGI
app. Give them :func:`course_lib.services.fail_fast_async_client` (``fail_fast_async_redis``
for another URL): no retries, so a dead server is noticed in a known time, and a bounded
``BlockingConnectionPool`` that many concurrent tasks wait on for at most ``pool_timeout``
seconds.
"""

from .redis_limiters import (
    GCRA,
    AsyncRedisLimiter,
    FixedWindow,
    RedisTokenBucket,
    SlidingWindowCounter,
    SlidingWindowLog,
)

__all__ = [
    "GCRA",
    "AsyncRedisLimiter",
    "FixedWindow",
    "RedisTokenBucket",
    "SlidingWindowCounter",
    "SlidingWindowLog",
]
