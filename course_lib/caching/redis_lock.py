"""A distributed lock on one Redis: ``SET key token NX PX ttl``, released by compare-and-delete.

Guarantees:

- Acquire is one atomic ``SET ... NX PX``: at most one holder at a time, and the lock expires
  by itself after ``ttl`` seconds if its holder dies, so a crash cannot block others forever.
- Each acquisition has a random token; :meth:`RedisLock.release` deletes the key only if it
  still holds that token (``release.lua``), so a holder whose lock expired cannot release
  the lock someone else took meanwhile.
- Waiting is bounded: ``acquire`` gives up after ``wait`` seconds and returns ``False``.

Not guaranteed: mutual exclusion if the holder runs longer than ``ttl`` (the lock expires under
it), or across a Redis failover (see Kleppmann's critique of Redlock). Use it to avoid
duplicate work, as the cache does, not to protect correctness; for that, use the database.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any

from course_lib import lua
from course_lib.validation import non_negative_number, positive_number

__all__ = ["AsyncRedisLock", "LockNotAcquired", "RedisLock", "new_token"]

_FIRST_POLL = 0.001
_MAX_POLL = 0.02


class LockNotAcquired(TimeoutError):
    """``with lock:`` could not acquire the lock within its ``wait``."""


def new_token() -> str:
    """A random lock token (128 bits): unguessable, so no other client can forge ours."""
    return secrets.token_hex(16)


def _check(name: str, ttl: float, wait: float) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    if not positive_number("ttl", ttl) >= 0.001:
        raise ValueError(f"ttl must be >= 0.001 seconds (Redis counts whole ms), got {ttl!r}")
    non_negative_number("wait", wait)


class RedisLock:
    """``with RedisLock(redis, "lock:report", ttl=10, wait=5): ...``"""

    def __init__(self, redis: Any, name: str, *, ttl: float = 10.0, wait: float = 10.0) -> None:
        _check(name, ttl, wait)
        self.redis = redis
        self.name = name
        self.ttl = ttl
        self.wait = wait
        self.token: str | None = None
        self._release = lua.load(__package__, "release").bind(redis)

    def try_acquire(self) -> bool:
        """One ``SET NX PX`` attempt, no waiting."""
        token = new_token()
        if self.redis.set(self.name, token, nx=True, px=int(self.ttl * 1000)):
            self.token = token
            return True
        return False

    def acquire(self) -> bool:
        """Try until acquired or ``wait`` seconds have passed; ``True`` if we hold the lock."""
        deadline = time.monotonic() + self.wait
        pause = _FIRST_POLL
        while not self.try_acquire():
            if time.monotonic() >= deadline:
                return False
            time.sleep(pause)
            pause = min(pause * 2, _MAX_POLL)
        return True

    def release(self) -> bool:
        """Delete the lock if it is still ours; ``False`` if it expired or was never held."""
        if self.token is None:
            return False
        token, self.token = self.token, None
        return bool(self._release(keys=[self.name], args=[token]))

    def __enter__(self) -> RedisLock:
        if not self.acquire():
            raise LockNotAcquired(f"lock {self.name!r} still held by another after {self.wait} s")
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class AsyncRedisLock:
    """The same over ``redis.asyncio``: ``async with AsyncRedisLock(redis, name): ...``"""

    def __init__(self, redis: Any, name: str, *, ttl: float = 10.0, wait: float = 10.0) -> None:
        _check(name, ttl, wait)
        self.redis = redis
        self.name = name
        self.ttl = ttl
        self.wait = wait
        self.token: str | None = None
        self._release = lua.load(__package__, "release").bind(redis)

    async def try_acquire(self) -> bool:
        token = new_token()
        if await self.redis.set(self.name, token, nx=True, px=int(self.ttl * 1000)):
            self.token = token
            return True
        return False

    async def acquire(self) -> bool:
        deadline = time.monotonic() + self.wait
        pause = _FIRST_POLL
        while not await self.try_acquire():
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(pause)
            pause = min(pause * 2, _MAX_POLL)
        return True

    async def release(self) -> bool:
        if self.token is None:
            return False
        token, self.token = self.token, None
        return bool(await self._release(keys=[self.name], args=[token]))

    async def __aenter__(self) -> AsyncRedisLock:
        if not await self.acquire():
            raise LockNotAcquired(f"lock {self.name!r} still held by another after {self.wait} s")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.release()
