"""What counts as "Redis cannot serve now", and a full client pool: the one classification
of Redis errors, used by the caches and the rate limiters to apply their failure policies.

It depends on redis-py only, so library code that needs it (a limiter copied into a service)
does not bring the course's server manager along.
"""

from __future__ import annotations

import redis

__all__ = [
    "POOL_WAIT_TIMED_OUT",
    "UNAVAILABLE_REPLIES",
    "PoolExhaustedError",
    "pool_exhausted",
    "redis_unavailable",
]

# What redis-py's BlockingConnectionPool (sync and asyncio) raises when its wait times out:
# a bare ConnectionError, told apart from a real connection failure only by this text.
POOL_WAIT_TIMED_OUT = "No connection available."


class PoolExhaustedError(redis.exceptions.MaxConnectionsError):
    """No connection of the client's own pool became free within its ``pool_timeout``.

    Redis itself was not asked. A subclass of ``MaxConnectionsError`` (what a full
    non-blocking pool raises), so one ``except`` catches both kinds of full pool.
    """


def pool_exhausted(exc: BaseException) -> bool:
    """Whether ``exc`` says the client's own connection pool is full: a non-blocking pool's
    ``MaxConnectionsError`` or a ``BlockingConnectionPool`` whose wait timed out (sync or
    asyncio, ours or redis-py's own)."""
    if isinstance(exc, redis.exceptions.MaxConnectionsError):
        return True
    return isinstance(exc, redis.ConnectionError) and exc.args == (POOL_WAIT_TIMED_OUT,)


# Error replies that mean "this server cannot serve now", not "this command is wrong":
# out of memory under noeviction, a failed background save, a replica after a failover,
# loading its data after a restart, busy in a long script, too few replicas, master down.
UNAVAILABLE_REPLIES = frozenset(
    {
        "OOM",
        "MISCONF",
        "READONLY",
        "LOADING",
        "BUSY",
        "NOREPLICAS",
        "MASTERDOWN",
        # Redis Cluster: a slot has no live primary (the whole cluster refuses while full
        # coverage is required), or a slot is being moved between nodes right now.
        "CLUSTERDOWN",
        "TRYAGAIN",
    }
)
_UNAVAILABLE_TYPES = (
    redis.ConnectionError,  # includes LOADING (BusyLoadingError)
    redis.TimeoutError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.OutOfMemoryError,
    # redis-py strips the reply code from these two, so their text cannot tell
    redis.exceptions.ClusterDownError,
    redis.exceptions.TryAgainError,
)


def redis_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` means the Redis server cannot serve now (unreachable, timed out, or
    one of :data:`UNAVAILABLE_REPLIES`), rather than a fault of the command itself.

    A client pool that is full is not the server being away (:func:`pool_exhausted`: a
    non-blocking pool's ``MaxConnectionsError``, a ``BlockingConnectionPool`` whose wait
    timed out, :class:`PoolExhaustedError`): it is never counted as unavailable. Works on
    Redis 6.2 too, where an error raised inside a Lua script reaches the client as a generic
    script error whose text carries the reply code (``... -OOM command not allowed ...``).
    """
    if pool_exhausted(exc):
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
