"""A Redis client fit for a rate limiter: it gives up fast when Redis is gone.

A limiter sits in front of every request. With redis-py 8's defaults a dead server is
retried with backoff, and each decision takes seconds before ``fail_open`` can answer; the
client below fails within ``timeout`` so the limiter's policy decides instead.
"""

from __future__ import annotations

import redis

from course_lib import services

__all__ = ["fail_fast_client"]


def fail_fast_client(url: str | None = None, *, timeout: float = 0.5) -> redis.Redis:
    """A ``redis.Redis`` on ``url`` (default: the course's Redis) that never retries and
    waits at most ``timeout`` seconds to connect or for a reply."""
    return services.fail_fast_redis(url or services.redis_url(), timeout=timeout)
