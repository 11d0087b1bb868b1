"""Rate limiting: an in-process token bucket and five Redis limiters, each one Lua script.

- :class:`Decision`: what every limiter answers (``allowed``, ``remaining``, ``retry_after``,
  ``reset_after``; truthy when allowed).
- :class:`TokenBucket`: in-process, thread-safe, monotonic clock, injectable clock.
- :class:`FixedWindow`, :class:`SlidingWindowLog`, :class:`SlidingWindowCounter`,
  :class:`RedisTokenBucket`, :class:`GCRA`: shared by every process using the same Redis;
  ``hit(key, cost=1)`` and ``hit_many(...)``; one atomic round trip per decision (or per
  batch), Redis server time, hash-tagged keys, ``fail_open`` (default ``True``) when Redis
  is unreachable; :func:`fail_fast_client` gives them a Redis client that notices fast.
- :class:`RateLimitMiddleware`: ASGI middleware answering 429 with ``Retry-After`` and the
  IETF draft ``RateLimit-Policy`` / ``RateLimit`` headers.
- :mod:`.seed`: the seed module's limiters, as written, to show where they break.
"""

from .clients import fail_fast_client
from .clocks import ManualClock, replaced_time
from .decision import Decision
from .middleware import RateLimitMiddleware, api_key_or_ip, client_ip, rate_limit_headers
from .redis_base import FAIL_CLOSED_RETRY_AFTER, RedisLimiter
from .redis_limiters import (
    GCRA,
    FixedWindow,
    RedisTokenBucket,
    SlidingWindowCounter,
    SlidingWindowLog,
)
from .token_bucket import TokenBucket

__all__ = [
    "FAIL_CLOSED_RETRY_AFTER",
    "GCRA",
    "Decision",
    "FixedWindow",
    "ManualClock",
    "RateLimitMiddleware",
    "RedisLimiter",
    "RedisTokenBucket",
    "SlidingWindowCounter",
    "SlidingWindowLog",
    "TokenBucket",
    "api_key_or_ip",
    "client_ip",
    "fail_fast_client",
    "rate_limit_headers",
    "replaced_time",
]
