"""The asyncio shell of the Redis lock: ``async with AsyncRedisLock(redis, name): ...``.

Same core, same guarantees as :class:`course_lib.caching.RedisLock`
(:mod:`course_lib.caching.redis_lock`), over ``redis.asyncio``.
"""

from __future__ import annotations

import asyncio
import functools
from types import TracebackType
from typing import Any

from ..core.lock import LockShell
from ..core.steps import Steps, aperform_redis, arun

__all__ = ["AsyncRedisLock"]


class AsyncRedisLock(LockShell):
    """The lock over ``redis.asyncio``; safe to share between tasks (each acquisition has its
    own token, kept per task)."""

    holder = "task"

    def __init__(self, redis: Any, name: str, *, ttl: float = 10.0, wait: float = 10.0) -> None:
        super().__init__(redis, name, ttl=ttl, wait=wait)
        self._tokens: dict[asyncio.Task[Any] | None, str] = {}

    @property
    def token(self) -> str | None:
        """The token of the current task's acquisition, if any."""
        return self._tokens.get(asyncio.current_task())

    def _remember(self, token: str | None) -> None:
        task = asyncio.current_task()
        if token is None:
            self._tokens.pop(task, None)
        else:
            self._tokens[task] = token

    async def try_acquire(self) -> str | None:
        return self._kept(await self._run(self.core.try_acquire()))

    async def acquire(self) -> str | None:
        return self._kept(await self._run(self.core.acquire()))

    async def release(self, token: str | None = None) -> None:
        await self._run(self.core.release(self._take(token)))

    async def extend(self, ttl: float | None = None, token: str | None = None) -> None:
        await self._run(self.core.extend(self._mine(token), ttl))

    async def __aenter__(self) -> AsyncRedisLock:
        if await self.acquire() is None:
            raise self.core.not_acquired()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._run(self.core.exit(self._take(None), exc))

    async def _run(self, steps: Steps[Any]) -> Any:
        return await arun(steps, functools.partial(aperform_redis, self.redis))
