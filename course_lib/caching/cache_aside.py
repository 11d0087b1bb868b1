"""Cache-aside (lazy loading) on Redis, with stampede protection and safe invalidation.

``CacheAside(redis, loader, ttl=..., namespace=...)``; ``cache.get(key)`` returns the cached
value or calls ``loader(key)`` on a miss and caches what it returns. ``None`` is cached too
(a negative entry, for ``negative_ttl`` seconds) so a missing row does not cost a query per
lookup.

``stampede`` decides what concurrent misses of one key do:

- ``None``: every miss calls the loader (the naive pattern; N misses, N loads);
- ``"local"``: single-flight within the process (one load per process);
- ``"lock"`` (default): single-flight plus a Redis lock (``SET NX PX`` + token,
  compare-and-delete release), so one load across every process; waiters poll for the value,
  bounded by ``wait_timeout``, after which they load themselves;
- ``"xfetch"``: ``"lock"`` plus probabilistic early refresh of hot keys
  (:mod:`course_lib.caching.xfetch`), so a hot key is reloaded before it expires.

Guarantees:

- Values are stored as JSON (:mod:`course_lib.caching.serialization`), never pickled.
- A loader exception reaches the caller and every waiter of that load (waiters in another
  process get :class:`LoaderError` carrying its type and message); the lock is released and
  the next call loads again.
- No stale fill: :meth:`invalidate` records when it ran (Redis server time), and a load that
  began at or before that moment is not cached (``reserve.lua``, ``fill.lua``). This closes
  the race where a reader caches the row it read just before a writer updated the row and
  deleted the key. A record is kept ``max(ttl, 60 s)``; a load that took longer than that
  is returned to its caller but not cached, since an invalidation during it may have been
  forgotten. Tickets are times, so they never repeat (a counter restarted after its key
  expired would hand a late reader a ticket equal to the new generation).
- Fail-open: if Redis is unreachable (connection error or timeout) or cannot serve now
  (out of memory, read-only, loading, ...: :func:`course_lib.redis_errors.redis_unavailable`),
  ``get`` returns ``loader(key)`` (through the local single-flight), counts it in
  ``stats["fail_open"]``, logs one warning per outage, and skips Redis for ``retry_after``
  seconds before trying it again.
  Any other Redis error (a wrong type, a script error) fails open for that call only and is
  counted in ``stats["redis_errors"]``; it starts no outage. Neither does a full client
  pool (:func:`course_lib.services.pool_exhausted`): Redis itself was not asked. Give the
  client a short ``socket_timeout`` and few retries
  (:func:`course_lib.services.fail_fast_client`), or each failing call waits out redis-py's
  retry policy.
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

import asyncio
import contextlib
import inspect
import random
import time
from collections.abc import Callable
from typing import Any

from redis.exceptions import RedisError

from course_lib import lua

from ._base import (
    ERROR_TTL_MS,
    FIRST_POLL,
    MAX_POLL,
    MISSING,
    STAMPEDE_MODES,
    CacheCore,
    LoaderError,
    Ticket,
    describe,
)
from .redis_lock import new_token
from .single_flight import AsyncSingleFlight, FlightTimeout, SingleFlight

__all__ = ["STAMPEDE_MODES", "AsyncCacheAside", "CacheAside", "LoaderError", "Ticket"]


_SCRIPTS = ("release", "reserve", "fill", "invalidate")


def _text(raw: bytes | str | None) -> str:
    if raw is None:
        return ""
    return raw.decode() if isinstance(raw, bytes) else raw


class _CacheAsideBase:
    """Construction, settings and the script arguments both front ends share."""

    _flight_type: type[SingleFlight[Any]] | type[AsyncSingleFlight[Any]]
    _bind_script: Callable[[lua.Script, Any], Callable[..., Any]]

    def __init__(
        self,
        redis: Any,
        loader: Callable[[Any], Any],
        *,
        ttl: float,
        namespace: str,
        stampede: str | None = "lock",
        negative_ttl: float | None = None,
        lock_ttl: float = 5.0,
        wait_timeout: float = 10.0,
        beta: float = 1.0,
        retry_after: float = 1.0,
        rng: random.Random | None = None,
    ) -> None:
        self._c = CacheCore(
            loader,
            ttl=ttl,
            namespace=namespace,
            stampede=stampede,
            negative_ttl=negative_ttl,
            lock_ttl=lock_ttl,
            wait_timeout=wait_timeout,
            beta=beta,
            retry_after=retry_after,
            rng=rng,
        )
        self.redis = redis
        self._scripts = {n: self._bind_script(lua.load(__package__, n), redis) for n in _SCRIPTS}
        # A waiter of the local flight may sit behind a leader waiting for the Redis lock.
        timeout = self._c.wait_timeout + (self._c.lock_ttl if self._c.distributed else 0)
        self._flight = self._flight_type(timeout=timeout) if stampede is not None else None

    @property
    def namespace(self) -> str:
        return self._c.namespace

    @property
    def ttl(self) -> float:
        return self._c.ttl

    @property
    def stampede(self) -> str | None:
        return self._c.stampede

    @property
    def stats(self) -> dict[str, int]:
        """Counters: hits, misses, loads, load_errors, stale_fills_rejected, lock_waits,
        lock_timeouts, early_refreshes, fail_open, redis_errors, decode_errors."""
        return self._c.stats.snapshot()

    def key(self, key: Any) -> str:
        """The Redis key holding ``key``'s value."""
        return self._c.value_key(key)

    def _invalidate_call(self, key: Any) -> dict[str, list[Any]]:
        c = self._c
        return {
            "keys": [c.value_key(key), c.invalidation_key(key)],
            "args": [c.invalidation_ttl_ms],
        }

    def _fill_call(self, ticket: Ticket, value: Any, delta: float) -> dict[str, list[Any]]:
        c = self._c
        payload, ttl_ms = c.encode(value, delta)
        return {
            "keys": [c.value_key(ticket.key), c.invalidation_key(ticket.key)],
            "args": [ticket.started, payload, ttl_ms, c.invalidation_ttl_ms],
        }

    def _poll_keys(self, key: Any, holder: str | None) -> list[str]:
        c = self._c
        keys = [c.value_key(key), c.lock_key(key)]
        return keys + ([c.error_key(key, holder)] if holder else [])

    def _after_poll(self, found: list[Any], holder: str | None) -> tuple[Any, str | None]:
        """One look at a key another process is loading: ``(value, holder)`` once cached;
        ``(MISSING, None)`` if the lock was released without a value (compete again);
        ``(MISSING, holder token)`` while it is held. The holder's loader error is raised."""
        c = self._c
        if found[0] is not None and (value := c.decode(found[0], count=False)) is not MISSING:
            return value, holder
        if holder is not None and found[2] is not None:
            raise LoaderError(_text(found[2]))
        return MISSING, None if found[1] is None else _text(found[1])

    def _filled(self, stored: object) -> bool:
        if not stored:
            self._c.stats.incr("stale_fills_rejected")
        return bool(stored)


class CacheAside(_CacheAsideBase):
    """Cache-aside over a synchronous ``redis.Redis``; safe to share between threads."""

    _flight_type = SingleFlight
    _bind_script = staticmethod(lua.Script.bind)

    def get(self, key: Any) -> Any:
        """The value for ``key``: from Redis, else from the loader (then cached)."""
        c = self._c
        if c.health.down_until and c.health.bypassing():
            return self._without_redis(key, None)
        try:
            raw = self.redis.get(c.value_key(key))
        except RedisError as exc:
            return self._without_redis(key, exc)
        if c.health.down_until:
            c.health.recovered()
        if raw is not None:
            value, refresh = c.wants_early_refresh(raw) if c.xfetch else (c.decode(raw), False)
            if value is not MISSING:
                c.stats.incr("hits")
                return self._refresh_early(key, value) if refresh else value
        c.stats.incr("misses")
        if self._flight is None:
            return self._miss(key)
        miss = self._miss_locked if c.distributed else self._miss
        try:
            # Keyed by the Redis key: 1, 1.0 and True are equal in Python but name different
            # Redis keys, so they must not share a load.
            return self._flight.do(c.value_key(key), lambda: miss(key))
        except FlightTimeout:
            c.stats.incr("lock_timeouts")
            return self._miss(key)

    def invalidate(self, key: Any) -> int:
        """Delete ``key`` and refuse any fill from a load that began before; 1 if a value
        was cached."""
        return int(self._scripts["invalidate"](**self._invalidate_call(key)))

    # The two halves of a miss, public so that an interleaving can be scripted step by step.
    def reserve(self, key: Any) -> Ticket:
        """First half of a miss: note the server time before the load begins."""
        return Ticket(key, _text(self._scripts["reserve"](keys=[self._c.value_key(key)])[1]))

    def fill(self, ticket: Ticket, value: Any, *, delta: float = 0.0) -> bool:
        """Second half: cache ``value`` unless ``ticket.key`` was invalidated since reserve."""
        return self._filled(self._scripts["fill"](**self._fill_call(ticket, value, delta)))

    def _without_redis(self, key: Any, exc: BaseException | None) -> Any:
        c = self._c
        if exc is not None:
            c.health.failed(exc)
        c.stats.incr("fail_open")
        if self._flight is None:
            return c.load(key)[0]
        return self._flight.do(("fail-open", c.value_key(key)), lambda: c.load(key)[0])

    def _fill_quietly(self, ticket: Ticket, value: Any, delta: float) -> None:
        try:
            self.fill(ticket, value, delta=delta)
        except RedisError as exc:
            self._c.health.failed(exc)

    def _miss(self, key: Any) -> Any:
        try:
            ticket = self.reserve(key)
        except RedisError as exc:
            return self._without_redis(key, exc)
        value, delta = self._c.load(key)
        self._fill_quietly(ticket, value, delta)
        return value

    def _miss_locked(self, key: Any) -> Any:
        c = self._c
        lock_key = c.lock_key(key)
        deadline = time.monotonic() + c.wait_timeout
        seen: str | None = None
        waited = False
        pause = FIRST_POLL
        while True:
            token = new_token()
            try:
                acquired = self.redis.set(lock_key, token, nx=True, px=c.lock_ms)
            except RedisError as exc:
                return self._without_redis(key, exc)
            if acquired:
                return self._lead(key, token)
            if not waited:
                waited = True
                c.stats.incr("lock_waits")
            while True:
                try:
                    found = self.redis.mget(self._poll_keys(key, seen))
                except RedisError as exc:
                    return self._without_redis(key, exc)
                value, seen = self._after_poll(found, seen)
                if value is not MISSING:
                    return value
                if seen is None:
                    break  # released without a value (rejected fill, expiry): compete again
                if time.monotonic() >= deadline:
                    c.stats.incr("lock_timeouts")
                    return self._miss(key)
                time.sleep(pause)
                pause = min(pause * 1.5, MAX_POLL)

    def _lead(self, key: Any, token: str) -> Any:
        c = self._c
        try:
            try:
                raw, started = self._scripts["reserve"](keys=[c.value_key(key)])
            except RedisError as exc:
                return self._without_redis(key, exc)
            # Filled by another process while we took the lock?
            if raw is not None and (value := c.decode(raw, count=False)) is not MISSING:
                return value
            ticket = Ticket(key, _text(started))
            try:
                value, delta = c.load(key)
            except Exception as exc:
                with contextlib.suppress(RedisError):
                    self.redis.set(c.error_key(key, token), describe(exc), px=ERROR_TTL_MS)
                raise
            self._fill_quietly(ticket, value, delta)
            return value
        finally:
            with contextlib.suppress(RedisError):
                self._scripts["release"](keys=[c.lock_key(key)], args=[token])

    def _refresh_early(self, key: Any, current: Any) -> Any:
        """XFetch chose this caller: reload now if no one else is, else serve ``current``."""
        c = self._c
        token = new_token()
        try:
            if not self.redis.set(c.lock_key(key), token, nx=True, px=c.lock_ms):
                return current
        except RedisError as exc:
            c.health.failed(exc)
            return current
        c.stats.incr("early_refreshes")
        try:
            ticket = self.reserve(key)
            value, delta = c.load(key)
            self.fill(ticket, value, delta=delta)
            return value
        except Exception:
            # The cached value is still valid: an optional refresh must not fail the read.
            return current
        finally:
            with contextlib.suppress(RedisError):
                self._scripts["release"](keys=[c.lock_key(key)], args=[token])


class AsyncCacheAside(_CacheAsideBase):
    """The same over ``redis.asyncio.Redis``: ``await cache.get(key)``.

    ``loader`` may be a coroutine function or a plain function. Use one instance per event
    loop (its single-flight and the client's connections belong to that loop).
    """

    _flight_type = AsyncSingleFlight
    _bind_script = staticmethod(lua.Script.abind)

    @property
    def namespace(self) -> str:
        return self._c.namespace

    @property
    def stats(self) -> dict[str, int]:
        return self._c.stats.snapshot()

    def key(self, key: Any) -> str:
        return self._c.value_key(key)

    async def _load(self, key: Any) -> tuple[Any, float]:
        c = self._c
        c.stats.incr("loads")
        start = time.perf_counter()
        try:
            value = c.loader(key)
            if inspect.isawaitable(value):
                value = await value
        except Exception:
            c.stats.incr("load_errors")
            raise
        return value, time.perf_counter() - start

    async def get(self, key: Any) -> Any:
        c = self._c
        if c.health.down_until and c.health.bypassing():
            return await self._without_redis(key, None)
        try:
            raw = await self.redis.get(c.value_key(key))
        except RedisError as exc:
            return await self._without_redis(key, exc)
        if c.health.down_until:
            c.health.recovered()
        if raw is not None:
            value, refresh = c.wants_early_refresh(raw) if c.xfetch else (c.decode(raw), False)
            if value is not MISSING:
                c.stats.incr("hits")
                return await self._refresh_early(key, value) if refresh else value
        c.stats.incr("misses")
        if self._flight is None:
            return await self._miss(key)
        miss = self._miss_locked if c.distributed else self._miss
        try:
            return await self._flight.do(c.value_key(key), lambda: miss(key))
        except FlightTimeout:
            c.stats.incr("lock_timeouts")
            return await self._miss(key)

    async def invalidate(self, key: Any) -> int:
        return int(await self._scripts["invalidate"](**self._invalidate_call(key)))

    async def reserve(self, key: Any) -> Ticket:
        reply = await self._scripts["reserve"](keys=[self._c.value_key(key)])
        return Ticket(key, _text(reply[1]))

    async def fill(self, ticket: Ticket, value: Any, *, delta: float = 0.0) -> bool:
        return self._filled(await self._scripts["fill"](**self._fill_call(ticket, value, delta)))

    async def _without_redis(self, key: Any, exc: BaseException | None) -> Any:
        c = self._c
        if exc is not None:
            c.health.failed(exc)
        c.stats.incr("fail_open")

        async def load() -> Any:
            return (await self._load(key))[0]

        if self._flight is None:
            return await load()
        return await self._flight.do(("fail-open", c.value_key(key)), load)

    async def _fill_quietly(self, ticket: Ticket, value: Any, delta: float) -> None:
        try:
            await self.fill(ticket, value, delta=delta)
        except RedisError as exc:
            self._c.health.failed(exc)

    async def _miss(self, key: Any) -> Any:
        try:
            ticket = await self.reserve(key)
        except RedisError as exc:
            return await self._without_redis(key, exc)
        value, delta = await self._load(key)
        await self._fill_quietly(ticket, value, delta)
        return value

    async def _miss_locked(self, key: Any) -> Any:
        c = self._c
        lock_key = c.lock_key(key)
        deadline = time.monotonic() + c.wait_timeout
        seen: str | None = None
        waited = False
        pause = FIRST_POLL
        while True:
            token = new_token()
            try:
                acquired = await self.redis.set(lock_key, token, nx=True, px=c.lock_ms)
            except RedisError as exc:
                return await self._without_redis(key, exc)
            if acquired:
                return await self._lead(key, token)
            if not waited:
                waited = True
                c.stats.incr("lock_waits")
            while True:
                try:
                    found = await self.redis.mget(self._poll_keys(key, seen))
                except RedisError as exc:
                    return await self._without_redis(key, exc)
                value, seen = self._after_poll(found, seen)
                if value is not MISSING:
                    return value
                if seen is None:
                    break  # released without a value (rejected fill, expiry): compete again
                if time.monotonic() >= deadline:
                    c.stats.incr("lock_timeouts")
                    return await self._miss(key)
                await asyncio.sleep(pause)
                pause = min(pause * 1.5, MAX_POLL)

    async def _lead(self, key: Any, token: str) -> Any:
        c = self._c
        try:
            try:
                raw, started = await self._scripts["reserve"](keys=[c.value_key(key)])
            except RedisError as exc:
                return await self._without_redis(key, exc)
            if raw is not None and (value := c.decode(raw, count=False)) is not MISSING:
                return value
            ticket = Ticket(key, _text(started))
            try:
                value, delta = await self._load(key)
            except Exception as exc:
                with contextlib.suppress(RedisError):
                    await self.redis.set(c.error_key(key, token), describe(exc), px=ERROR_TTL_MS)
                raise
            await self._fill_quietly(ticket, value, delta)
            return value
        finally:
            with contextlib.suppress(RedisError):
                await self._scripts["release"](keys=[c.lock_key(key)], args=[token])

    async def _refresh_early(self, key: Any, current: Any) -> Any:
        c = self._c
        token = new_token()
        try:
            if not await self.redis.set(c.lock_key(key), token, nx=True, px=c.lock_ms):
                return current
        except RedisError as exc:
            c.health.failed(exc)
            return current
        c.stats.incr("early_refreshes")
        try:
            ticket = await self.reserve(key)
            value, delta = await self._load(key)
            await self.fill(ticket, value, delta=delta)
            return value
        except Exception:
            return current
        finally:
            with contextlib.suppress(RedisError):
                await self._scripts["release"](keys=[c.lock_key(key)], args=[token])
