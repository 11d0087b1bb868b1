"""Cache-aside (lazy loading) on Redis, with stampede protection and safe invalidation.

``CacheAside(redis, loader, ttl=..., namespace=...)``; ``cache.get(key)`` returns the cached
value or calls ``loader(key)`` on a miss and caches what it returns. ``None`` is cached too
(a negative entry, for ``negative_ttl`` seconds) so a missing row does not cost a query per
lookup. :class:`~course_lib.caching.aio.AsyncCacheAside` is the same over ``redis.asyncio``.
Both are thin shells: the algorithm is :class:`~course_lib.caching.core.cache_aside.CacheAsideCore`,
which does no I/O; a shell only takes the steps it asks for.

``stampede`` decides what concurrent misses of one key do (a mode object of
:mod:`course_lib.caching.core.cache_aside`, or its name):

- ``None`` (:class:`NoProtection`): every miss calls the loader (the naive pattern; N misses,
  N loads);
- ``"local"`` (:class:`LocalFlight`): single-flight within the process (one load per process);
- ``"lock"`` (:class:`RedisMutex`, the default): single-flight plus the key's
  :class:`~course_lib.caching.RedisLock` (:meth:`CacheAside.mutex`), so one load across every
  process; waiters poll for the value, bounded by ``wait_timeout``, after which they load
  themselves;
- ``"xfetch"`` (:class:`XFetch`): ``"lock"`` plus probabilistic early refresh of hot keys
  (:mod:`course_lib.caching.xfetch`), so a hot key is reloaded before it expires.

Guarantees:

- Values are stored as JSON (:mod:`course_lib.caching.serialization`), never pickled.
- A loader exception reaches the caller and every waiter of that load (waiters in another
  process get :class:`LoaderError` carrying its type and message); the lock is released and
  the next call loads again.
- No stale fill: :meth:`invalidate` records when it ran (Redis server time), and a load that
  began at or before that moment is not cached (``reserve.lua``, ``fill.lua``). This closes
  the race where a reader caches the row it read just before a writer updated the row and
  deleted the key. A record is kept ``invalidation_ttl`` (default ``max(ttl, 60 s)``); a
  load that took longer than that is returned to its caller but not cached, since an
  invalidation during it may have been forgotten. Tickets are times, so they never repeat
  (a counter restarted after its key expired would hand a late reader a ticket equal to the
  new generation).
- Fail-open: if Redis is unreachable (connection error or timeout) or cannot serve now
  (out of memory, read-only, loading, ...: :func:`course_lib.redis_errors.redis_unavailable`),
  ``get`` returns ``loader(key)`` (through the local single-flight), counts it in
  ``stats["fail_open"]``, logs one warning per outage, and skips Redis for ``retry_after``
  seconds before trying it again.
  Any other Redis error (a wrong type, a script error) fails open for that call only and is
  counted in ``stats["redis_errors"]``; it starts no outage. Neither does a full client
  pool (:func:`course_lib.redis_errors.pool_exhausted`): Redis itself was not asked. Give
  the client a short ``socket_timeout`` and few retries, or each failing call waits out
  redis-py's retry policy.
  ``invalidate`` does raise: a write that could not invalidate must know it.
- A cached value that cannot be decoded (bad bytes, or another stampede mode's format under
  the same namespace) is a miss, counted in ``stats["decode_errors"]``, and gets overwritten.
- Bad settings raise ``ValueError``/``TypeError`` at construction (TTLs are at least 1 ms).

Redis Cluster: ``redis`` may be a ``redis.cluster.RedisCluster`` (``CacheAside``) or a
``redis.asyncio.cluster.RedisCluster`` (``AsyncCacheAside``). Every key of one user key
carries that key as its hash tag, so the scripts and the lock poll (``MGET``) that touch
several of them stay in one slot: the value ``<namespace>:{<key>}``, the invalidation record
``<namespace>#inv:{<key>}``, the lock ``<namespace>#lock:{<key>}`` and a failed load's error
``<namespace>#err:{<key>}:<token>``. So a namespace must not contain braces, and a key whose
text is empty (``""``) has no hash tag (Redis hashes the whole name) and cannot be used on a
cluster. During a failover (a primary dies, its replica is promoted after
``cluster-node-timeout``) the keys of the lost primary's slots fail like an outage: ``get``
fails open (``stats["fail_open"]``) for ``retry_after`` s at a time, then follows the new
topology (redis-py follows ``MOVED``); ``invalidate`` raises. Replication is asynchronous:
an invalidation record the old primary acknowledged but had not yet sent to its replica is
lost with it, so a load that began before it can fill a stale value (until the TTL); call
``WAIT`` on the client if that window matters. Give a cluster client
``retry=Retry(NoBackoff(), 1)``: redis-py's default retries a dead node with a backoff of
seconds, during which ``get`` waits instead of failing open.
"""

from __future__ import annotations

from typing import Any

from .core import steps
from .core.cache_aside import STAMPEDE_MODES, CacheAsideShell, LoaderError, Ticket
from .redis_lock import RedisLock
from .single_flight import SingleFlight

__all__ = ["STAMPEDE_MODES", "CacheAside", "LoaderError", "Ticket"]


class CacheAside(CacheAsideShell):
    """Cache-aside over a synchronous ``redis.Redis``; safe to share between threads."""

    flight_type = SingleFlight

    def get(self, key: Any) -> Any:
        """The value for ``key``: from Redis, else from the loader (then cached)."""
        return self._run(self.core.get(key))

    def invalidate(self, key: Any) -> int:
        """Delete ``key`` and refuse any fill from a load that began before; 1 if a value
        was cached."""
        return self._run(self.core.invalidate(key))

    # The two halves of a miss, public so that an interleaving can be scripted step by step.
    def reserve(self, key: Any) -> Ticket:
        """First half of a miss: note the server time before the load begins."""
        return self._run(self.core.reserve(key))

    def fill(self, ticket: Ticket, value: Any, *, delta: float = 0.0) -> bool:
        """Second half: cache ``value`` unless ``ticket.key`` was invalidated since reserve."""
        return self._run(self.core.fill(ticket, value, delta))

    def mutex(self, key: Any) -> RedisLock:
        """The Redis lock a miss of ``key`` takes (no waiting: its waiters poll the value)."""
        return RedisLock(self.redis, self.core.lock_key(key), ttl=self.core.lock_ttl, wait=0)

    def _run(self, algorithm: steps.Steps[Any]) -> Any:
        return steps.run(algorithm, self._perform)

    def _perform(self, step: steps.Step) -> Any:
        match step:
            case steps.Command() | steps.Eval() | steps.Pause():
                return steps.perform_redis(self.redis, step)
            case steps.Load():
                return self.loader(step.key)
            case steps.Shared():
                return self.flight.do(step.key, lambda: self._run(step.algorithm()))
            case steps.TryLock():
                return self.mutex(step.key).try_acquire()
            case steps.Unlock():
                return self.mutex(step.key).release(step.token)
