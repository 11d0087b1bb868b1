"""A Redis client that gives up fast: for probes, limiters and outage demonstrations.

redis-py 8 retries a failed command three times with backoff by default, so a dead server
costs seconds per call. Probing whether a server is there, or letting a cache or a rate
limiter apply its own failure policy, needs an answer within a known time instead.
"""

from __future__ import annotations

import math
import numbers

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

__all__ = ["fail_fast_redis"]


def fail_fast_redis(url: str, *, timeout: float = 0.5) -> redis.Redis:
    """A ``redis.Redis`` on ``url`` that never retries and waits at most ``timeout`` seconds
    to connect or for a reply. ``ValueError`` for a bad URL or a timeout that is not a
    finite number > 0 (``TypeError`` if it is not a number)."""
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real):
        raise TypeError(f"timeout must be a number, got {type(timeout).__name__}")
    if not math.isfinite(timeout) or timeout <= 0:
        raise ValueError(f"timeout must be a finite number > 0, got {timeout}")
    return redis.Redis.from_url(
        url,
        socket_timeout=float(timeout),
        socket_connect_timeout=float(timeout),
        retry=Retry(NoBackoff(), 0),
    )
