"""Rate limiting: an in-process token bucket and five Redis limiters, each one Lua script.

- :class:`Decision`: what every limiter answers (``allowed``, ``remaining``, ``retry_after``,
  ``reset_after``; truthy when allowed).
- :class:`TokenBucket`: in-process, thread-safe, monotonic clock, injectable clock;
  :class:`KeyedTokenBucket`: one per key, bounded memory, usable by the middleware without
  Redis.
- :class:`FixedWindow`, :class:`SlidingWindowLog`, :class:`SlidingWindowCounter`,
  :class:`RedisTokenBucket`, :class:`GCRA`: shared by every process using the same Redis;
  ``hit(key, cost=1)`` and ``hit_many(...)``; one atomic round trip per decision (or per
  batch), Redis server time, hash-tagged keys, ``fail_open`` (default ``True``) when Redis
  is unreachable; :func:`course_lib.services.fail_fast_redis` gives them a Redis client
  that notices fast. Each is a sans-I/O core (:mod:`.redis_base`, :mod:`.algorithms`:
  keys, script arguments, decisions, the failure policy) in a blocking shell
  (:class:`RedisLimiter`, :mod:`.redis_limiters`).
- :mod:`.aio`: the same five for asyncio servers (``await limiter.hit(key)``): the same
  cores in an asyncio shell, so the same scripts, keys and decisions.
- :class:`RateLimitMiddleware`: ASGI middleware answering 429 with ``Retry-After`` and the
  IETF draft ``RateLimit-Policy`` / ``RateLimit`` headers.
- :mod:`.lesson`: what stages notebook 03 (the module's limiters as written, replays,
  excerpts and charts, the HTTP demo app); not meant to be copied into a service.
"""

from . import aio
from .decision import Decision
from .keyed_bucket import KeyedTokenBucket
from .middleware import RateLimitMiddleware, api_key_or_ip, client_ip, rate_limit_headers
from .polite_client import Attempt, polite_get, retry_after_seconds
from .redis_base import FAIL_CLOSED_RETRY_AFTER
from .redis_limiters import (
    GCRA,
    FixedWindow,
    RedisLimiter,
    RedisTokenBucket,
    SlidingWindowCounter,
    SlidingWindowLog,
)
from .token_bucket import TokenBucket

__all__ = [
    "FAIL_CLOSED_RETRY_AFTER",
    "GCRA",
    "Attempt",
    "Decision",
    "FixedWindow",
    "KeyedTokenBucket",
    "RateLimitMiddleware",
    "RedisLimiter",
    "RedisTokenBucket",
    "SlidingWindowCounter",
    "SlidingWindowLog",
    "TokenBucket",
    "aio",
    "api_key_or_ip",
    "client_ip",
    "polite_get",
    "rate_limit_headers",
    "retry_after_seconds",
]
