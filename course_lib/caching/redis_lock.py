"""A distributed lock on one Redis: ``SET key token NX PX ttl``, released by compare-and-delete.

Guarantees:

- Acquire is one atomic ``SET ... NX PX``: at most one holder at a time, and the lock expires
  by itself after ``ttl`` seconds if its holder dies, so a crash cannot block others forever.
- Each acquisition has its own random token, kept per acquisition (returned by ``acquire``,
  and remembered per thread, or per asyncio task, for ``with``), so threads or tasks sharing
  one lock object never release or extend each other's acquisition.
- :meth:`RedisLock.release` and :meth:`RedisLock.extend` act only if the key still holds
  our token (``release.lua``, ``extend.lua``): a holder whose lock expired cannot release
  the lock someone else took meanwhile. Either raises :class:`LockNotOwned` when the lock
  is no longer ours (expired, or taken over), as redis-py's ``Lock`` raises
  ``LockNotOwnedError``: losing a lock is something the caller must see. When the block of
  a ``with`` raised, that exception is the one the caller gets, with the lost lock added as
  a note.
- Waiting is bounded: ``acquire`` gives up after ``wait`` seconds and returns ``None``.

Not guaranteed: mutual exclusion if the holder runs longer than ``ttl`` (the lock expires under
it), or across a Redis failover (see Kleppmann's critique of Redlock). Use it to avoid
duplicate work, as the cache does, not to protect correctness; for that, use the database.

Redis Cluster: ``redis`` may be a ``redis.cluster.RedisCluster`` (or the asyncio one): a lock
is one key, so every script touches one slot whatever the name. A failover promoting a
replica the ``SET`` had not reached yet frees the lock: a second holder can then acquire it.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from types import TracebackType
from typing import Any

from course_lib import lua
from course_lib.validation import non_negative_number, positive_number

__all__ = ["AsyncRedisLock", "LockNotAcquired", "LockNotOwned", "RedisLock", "new_token"]

_FIRST_POLL = 0.001
_MAX_POLL = 0.02


class LockNotAcquired(TimeoutError):
    """``with lock:`` could not acquire the lock within its ``wait``."""


class LockNotOwned(RuntimeError):
    """The lock was released or extended by a holder that no longer owns it (it expired, or
    another client took it over): the work done under it was not exclusive."""


def new_token() -> str:
    """A random lock token (128 bits): unguessable, so no other client can forge ours."""
    return secrets.token_hex(16)


def _check(name: str, ttl: float, wait: float) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    if not positive_number("ttl", ttl) >= 0.001:
        raise ValueError(f"ttl must be >= 0.001 seconds (Redis counts whole ms), got {ttl!r}")
    non_negative_number("wait", wait)


def _ttl_ms(ttl: float | None, default: float) -> int:
    seconds = default if ttl is None else positive_number("ttl", ttl)
    return max(1, int(seconds * 1000))


def _not_owned(name: str, action: str) -> LockNotOwned:
    return LockNotOwned(f"cannot {action} lock {name!r}: it is no longer ours (expired or taken)")


def _exit(lock_name: str, released: bool, exc: BaseException | None) -> None:
    if released:
        return
    if exc is not None:
        exc.add_note(f"and the lock {lock_name!r} was lost before the block ended")
        return
    raise _not_owned(lock_name, "release")


class RedisLock:
    """``with RedisLock(redis, "lock:report", ttl=10, wait=5): ...``; safe to share between
    threads (each acquisition has its own token)."""

    def __init__(self, redis: Any, name: str, *, ttl: float = 10.0, wait: float = 10.0) -> None:
        _check(name, ttl, wait)
        self.redis = redis
        self.name = name
        self.ttl = float(ttl)
        self.wait = float(wait)
        self._held = threading.local()
        self._release = lua.load(__package__, "release").bind(redis)
        self._extend = lua.load(__package__, "extend").bind(redis)

    @property
    def token(self) -> str | None:
        """The token of this thread's current acquisition, if any."""
        return getattr(self._held, "token", None)

    def try_acquire(self) -> str | None:
        """One ``SET NX PX`` attempt, no waiting: the acquisition's token, or ``None``."""
        token = new_token()
        if self.redis.set(self.name, token, nx=True, px=int(self.ttl * 1000)):
            self._held.token = token
            return token
        return None

    def acquire(self) -> str | None:
        """Try until acquired or ``wait`` seconds have passed: the token, or ``None``."""
        deadline = time.monotonic() + self.wait
        pause = _FIRST_POLL
        while (token := self.try_acquire()) is None:
            if time.monotonic() >= deadline:
                return None
            time.sleep(pause)
            pause = min(pause * 2, _MAX_POLL)
        return token

    def release(self, token: str | None = None) -> None:
        """Delete the lock if it is still ours (``token``, default this thread's);
        :class:`LockNotOwned` if it is not, ``RuntimeError`` if nothing was acquired."""
        token = self._take(token)
        if not self._release(keys=[self.name], args=[token]):
            raise _not_owned(self.name, "release")

    def extend(self, ttl: float | None = None, token: str | None = None) -> None:
        """Give the lock a fresh ``ttl`` (default the lock's) if it is still ours;
        :class:`LockNotOwned` if it is not."""
        token = token or self.token
        if token is None:
            raise RuntimeError(f"lock {self.name!r} was not acquired by this thread")
        if not self._extend(keys=[self.name], args=[token, _ttl_ms(ttl, self.ttl)]):
            raise _not_owned(self.name, "extend")

    def _take(self, token: str | None) -> str:
        if token is None:
            token = self.token
            if token is None:
                raise RuntimeError(f"lock {self.name!r} was not acquired by this thread")
        if token == self.token:
            self._held.token = None
        return token

    def __enter__(self) -> RedisLock:
        if self.acquire() is None:
            raise LockNotAcquired(f"lock {self.name!r} still held by another after {self.wait} s")
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        token = self._take(None)
        _exit(self.name, bool(self._release(keys=[self.name], args=[token])), exc)


class AsyncRedisLock:
    """The same over ``redis.asyncio``: ``async with AsyncRedisLock(redis, name): ...``; safe
    to share between tasks (each acquisition has its own token, kept per task)."""

    def __init__(self, redis: Any, name: str, *, ttl: float = 10.0, wait: float = 10.0) -> None:
        _check(name, ttl, wait)
        self.redis = redis
        self.name = name
        self.ttl = float(ttl)
        self.wait = float(wait)
        self._tokens: dict[asyncio.Task[Any] | None, str] = {}
        self._release = lua.load(__package__, "release").abind(redis)
        self._extend = lua.load(__package__, "extend").abind(redis)

    @property
    def token(self) -> str | None:
        """The token of the current task's acquisition, if any."""
        return self._tokens.get(asyncio.current_task())

    async def try_acquire(self) -> str | None:
        token = new_token()
        if await self.redis.set(self.name, token, nx=True, px=int(self.ttl * 1000)):
            self._tokens[asyncio.current_task()] = token
            return token
        return None

    async def acquire(self) -> str | None:
        deadline = time.monotonic() + self.wait
        pause = _FIRST_POLL
        while (token := await self.try_acquire()) is None:
            if time.monotonic() >= deadline:
                return None
            await asyncio.sleep(pause)
            pause = min(pause * 2, _MAX_POLL)
        return token

    def _take(self, token: str | None) -> str:
        task = asyncio.current_task()
        if token is None:
            token = self._tokens.get(task)
            if token is None:
                raise RuntimeError(f"lock {self.name!r} was not acquired by this task")
        if self._tokens.get(task) == token:
            del self._tokens[task]
        return token

    async def release(self, token: str | None = None) -> None:
        token = self._take(token)
        if not await self._release(keys=[self.name], args=[token]):
            raise _not_owned(self.name, "release")

    async def extend(self, ttl: float | None = None, token: str | None = None) -> None:
        token = token or self.token
        if token is None:
            raise RuntimeError(f"lock {self.name!r} was not acquired by this task")
        if not await self._extend(keys=[self.name], args=[token, _ttl_ms(ttl, self.ttl)]):
            raise _not_owned(self.name, "extend")

    async def __aenter__(self) -> AsyncRedisLock:
        if await self.acquire() is None:
            raise LockNotAcquired(f"lock {self.name!r} still held by another after {self.wait} s")
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        token = self._take(None)
        _exit(self.name, bool(await self._release(keys=[self.name], args=[token])), exc)
