"""A Redis client that gives up fast, and what counts as "Redis cannot serve now".

redis-py 8 retries a failed command three times with backoff by default, so a dead server
costs seconds per call. Probing whether a server is there, or letting a cache or a rate
limiter apply its own failure policy, needs an answer within a known time instead.

The clients handed out here also bound their own pool: at most ``max_connections``
connections, and a caller that finds them all busy waits at most ``pool_timeout`` seconds
for one, then gets :class:`PoolExhaustedError`. A full pool is a client setting, not a
server outage: :func:`redis_unavailable` never counts it as one, so a rate limiter raises
instead of answering its ``fail_open`` policy (which would admit everyone exactly at peak
load), and a cache serves that one call from its loader without declaring Redis down.
"""

from __future__ import annotations

from typing import Any

import redis
import redis.asyncio
from redis.backoff import NoBackoff
from redis.retry import Retry

from course_lib.redis_errors import (
    POOL_WAIT_TIMED_OUT,
    PoolExhaustedError,
    pool_exhausted,
    redis_unavailable,
)
from course_lib.validation import positive_int, positive_number

__all__ = [
    "PoolExhaustedError",
    "fail_fast_async_redis",
    "fail_fast_redis",
    "pool_exhausted",
    "redis_unavailable",
]


def _exhausted(pool: Any) -> PoolExhaustedError:
    return PoolExhaustedError(
        f"no connection of this Redis client's pool became free within {pool.timeout:g} s "
        f"(max_connections={pool.max_connections}); Redis itself was not asked. Raise "
        "max_connections or pool_timeout, or lower the concurrency"
    )


class _BoundedPool(redis.BlockingConnectionPool):
    """``BlockingConnectionPool`` whose wait timeout raises :class:`PoolExhaustedError`."""

    def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().get_connection(*args, **kwargs)
        except redis.ConnectionError as exc:
            if exc.args == (POOL_WAIT_TIMED_OUT,):
                raise _exhausted(self) from exc
            raise


class _AsyncBoundedPool(redis.asyncio.BlockingConnectionPool):
    """The asyncio twin of :class:`_BoundedPool`."""

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().get_connection(*args, **kwargs)
        except redis.ConnectionError as exc:
            if exc.args == (POOL_WAIT_TIMED_OUT,):
                raise _exhausted(self) from exc
            raise


def _pool_settings(timeout: object, max_connections: object, pool_timeout: object) -> dict:
    return {
        "socket_timeout": positive_number("timeout", timeout),
        "socket_connect_timeout": positive_number("timeout", timeout),
        "max_connections": positive_int("max_connections", max_connections),
        "timeout": positive_number("pool_timeout", pool_timeout),
    }


def fail_fast_redis(
    url: str, *, timeout: float = 0.5, max_connections: int = 50, pool_timeout: float = 5.0
) -> redis.Redis:
    """A ``redis.Redis`` on ``url`` that never retries and waits at most ``timeout`` seconds
    to connect or for a reply, with a pool of at most ``max_connections`` connections: a
    thread that finds them all busy waits for one at most ``pool_timeout`` seconds, then
    gets :class:`PoolExhaustedError` (never counted as Redis being unavailable).

    ``ValueError`` for a bad URL, a timeout that is not a finite number > 0 or a
    ``max_connections`` < 1 (``TypeError`` if one is not a number / an int).
    """
    settings = _pool_settings(timeout, max_connections, pool_timeout)
    pool = _BoundedPool.from_url(url, retry=Retry(NoBackoff(), 0), **settings)
    return redis.Redis(connection_pool=pool)


def fail_fast_async_redis(
    url: str, *, timeout: float = 0.5, max_connections: int = 50, pool_timeout: float = 5.0
) -> redis.asyncio.Redis:
    """The ``redis.asyncio`` twin of :func:`fail_fast_redis`, with the same guarantees: no
    retries (an asyncio ``Retry``), ``timeout`` to connect or for a reply, and tasks that
    wait at most ``pool_timeout`` seconds for one of ``max_connections`` connections.

    Use it for the asyncio limiters and caches: redis-py's default asyncio pool raises
    ``MaxConnectionsError`` as soon as 100 tasks hold a connection, instead of waiting.
    """
    settings = _pool_settings(timeout, max_connections, pool_timeout)
    retry = redis.asyncio.retry.Retry(NoBackoff(), 0)
    pool = _AsyncBoundedPool.from_url(url, retry=retry, **settings)
    return redis.asyncio.Redis(connection_pool=pool)
