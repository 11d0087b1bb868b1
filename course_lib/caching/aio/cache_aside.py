"""Cache-aside over ``redis.asyncio``: ``await cache.get(key)``.

The asyncio shell of :class:`~course_lib.caching.core.cache_aside.CacheAsideCore`: same
algorithm, settings and guarantees as :class:`course_lib.caching.CacheAside` (see
:mod:`course_lib.caching.cache_aside`), only the I/O differs.
"""

from __future__ import annotations

import inspect
from typing import Any

from ..core import steps
from ..core.cache_aside import CacheAsideShell, Ticket
from ..single_flight import AsyncSingleFlight
from .redis_lock import AsyncRedisLock

__all__ = ["AsyncCacheAside"]


class AsyncCacheAside(CacheAsideShell):
    """``loader`` may be a coroutine function or a plain function. Use one instance per
    event loop (its single-flight and the client's connections belong to that loop)."""

    flight_type = AsyncSingleFlight

    async def get(self, key: Any) -> Any:
        """The value for ``key``: from Redis, else from the loader (then cached)."""
        return await self._run(self.core.get(key))

    async def invalidate(self, key: Any) -> int:
        """Delete ``key`` and refuse any fill from a load that began before; 1 if cached."""
        return await self._run(self.core.invalidate(key))

    async def reserve(self, key: Any) -> Ticket:
        """First half of a miss: note the server time before the load begins."""
        return await self._run(self.core.reserve(key))

    async def fill(self, ticket: Ticket, value: Any, *, delta: float = 0.0) -> bool:
        """Second half: cache ``value`` unless ``ticket.key`` was invalidated since reserve."""
        return await self._run(self.core.fill(ticket, value, delta))

    def mutex(self, key: Any) -> AsyncRedisLock:
        """The Redis lock a miss of ``key`` takes (no waiting: its waiters poll the value)."""
        return AsyncRedisLock(self.redis, self.core.lock_key(key), ttl=self.core.lock_ttl, wait=0)

    async def _run(self, algorithm: steps.Steps[Any]) -> Any:
        return await steps.arun(algorithm, self._perform)

    async def _perform(self, step: steps.Step) -> Any:
        match step:
            case steps.Command() | steps.Eval() | steps.Pause():
                return await steps.aperform_redis(self.redis, step)
            case steps.Load():
                value = self.loader(step.key)
                return await value if inspect.isawaitable(value) else value
            case steps.Shared():
                return await self.flight.do(step.key, lambda: self._run(step.algorithm()))
            case steps.TryLock():
                return await self.mutex(step.key).try_acquire()
            case steps.Unlock():
                return await self.mutex(step.key).release(step.token)
