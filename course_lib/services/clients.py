"""A Redis client that gives up fast, and what counts as "Redis cannot serve now".

redis-py 8 retries a failed command three times with backoff by default, so a dead server
costs seconds per call. Probing whether a server is there, or letting a cache or a rate
limiter apply its own failure policy, needs an answer within a known time instead.
"""

from __future__ import annotations

import redis
import redis.asyncio
from redis.backoff import NoBackoff
from redis.retry import Retry

from course_lib.validation import positive_number

__all__ = ["fail_fast_async_redis", "fail_fast_redis", "redis_unavailable"]


def fail_fast_redis(url: str, *, timeout: float = 0.5) -> redis.Redis:
    """A ``redis.Redis`` on ``url`` that never retries and waits at most ``timeout`` seconds
    to connect or for a reply. ``ValueError`` for a bad URL or a timeout that is not a
    finite number > 0 (``TypeError`` if it is not a number)."""
    timeout = positive_number("timeout", timeout)
    return redis.Redis.from_url(
        url,
        socket_timeout=float(timeout),
        socket_connect_timeout=float(timeout),
        retry=Retry(NoBackoff(), 0),
    )


def fail_fast_async_redis(url: str, *, timeout: float = 0.5) -> redis.asyncio.Redis:
    """The ``redis.asyncio`` twin of :func:`fail_fast_redis`, with the same guarantees."""
    timeout = positive_number("timeout", timeout)
    return redis.asyncio.Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=redis.asyncio.retry.Retry(NoBackoff(), 0),
    )


# Error replies that mean "this server cannot serve now", not "this command is wrong":
# out of memory under noeviction, a failed background save, a replica after a failover,
# loading its data after a restart, busy in a long script, too few replicas, master down.
UNAVAILABLE_REPLIES = frozenset(
    {"OOM", "MISCONF", "READONLY", "LOADING", "BUSY", "NOREPLICAS", "MASTERDOWN"}
)
_UNAVAILABLE_TYPES = (
    redis.ConnectionError,  # includes LOADING (BusyLoadingError)
    redis.TimeoutError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.OutOfMemoryError,
)


def redis_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` means the Redis server cannot serve now (unreachable, timed out, or
    one of :data:`UNAVAILABLE_REPLIES`), rather than a fault of the command itself.

    A client pool that is full (``MaxConnectionsError``) is not the server being away: it
    is not counted as unavailable. Works on Redis 6.2 too, where an error raised inside a
    Lua script reaches the client as a generic script error whose text carries the reply
    code (``... -OOM command not allowed ...``).
    """
    if isinstance(exc, redis.exceptions.MaxConnectionsError):
        # The client's own pool is full: the server could count. Failing open here would
        # admit unlimited traffic exactly when load peaks; it is a configuration error.
        return False
    if isinstance(exc, _UNAVAILABLE_TYPES):
        return True
    if not isinstance(exc, redis.ResponseError):
        return False
    text = str(exc)
    if text.split(" ", 1)[0] in UNAVAILABLE_REPLIES:
        return True
    return any(f"-{code} " in text for code in UNAVAILABLE_REPLIES)
