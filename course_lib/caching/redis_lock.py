"""A distributed lock on one Redis: ``SET key token NX PX ttl``, released by compare-and-delete.

:class:`RedisLock` is the thread shell of :class:`~course_lib.caching.core.lock.LockCore`;
:class:`~course_lib.caching.aio.AsyncRedisLock` is its asyncio twin.

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
- Waiting is bounded: ``acquire`` gives up after ``wait`` seconds and returns ``None``
  (polling with the package's one :class:`~course_lib.caching.core.lock.Backoff`).

Not guaranteed: mutual exclusion if the holder runs longer than ``ttl`` (the lock expires under
it), or across a Redis failover (see Kleppmann's critique of Redlock). Use it to avoid
duplicate work, as the cache does, not to protect correctness; for that, use the database.

Redis Cluster: ``redis`` may be a ``redis.cluster.RedisCluster`` (or the asyncio one): a lock
is one key, so every script touches one slot whatever the name. A failover promoting a
replica the ``SET`` had not reached yet frees the lock: a second holder can then acquire it.
"""

from __future__ import annotations

import functools
import threading
from types import TracebackType
from typing import Any

from .core.lock import LockNotAcquired, LockNotOwned, LockShell, new_token
from .core.steps import Steps, perform_redis, run

__all__ = ["LockNotAcquired", "LockNotOwned", "RedisLock", "new_token"]


class RedisLock(LockShell):
    """``with RedisLock(redis, "lock:report", ttl=10, wait=5): ...``; safe to share between
    threads (each acquisition has its own token)."""

    holder = "thread"

    def __init__(self, redis: Any, name: str, *, ttl: float = 10.0, wait: float = 10.0) -> None:
        super().__init__(redis, name, ttl=ttl, wait=wait)
        self._held = threading.local()

    @property
    def token(self) -> str | None:
        """The token of this thread's current acquisition, if any."""
        return getattr(self._held, "token", None)

    def _remember(self, token: str | None) -> None:
        self._held.token = token

    def try_acquire(self) -> str | None:
        """One ``SET NX PX`` attempt, no waiting: the acquisition's token, or ``None``."""
        return self._kept(self._run(self.core.try_acquire()))

    def acquire(self) -> str | None:
        """Try until acquired or ``wait`` seconds have passed: the token, or ``None``."""
        return self._kept(self._run(self.core.acquire()))

    def release(self, token: str | None = None) -> None:
        """Delete the lock if it is still ours (``token``, default this thread's);
        :class:`LockNotOwned` if it is not, ``RuntimeError`` if nothing was acquired."""
        self._run(self.core.release(self._take(token)))

    def extend(self, ttl: float | None = None, token: str | None = None) -> None:
        """Give the lock a fresh ``ttl`` (default the lock's) if it is still ours;
        :class:`LockNotOwned` if it is not."""
        self._run(self.core.extend(self._mine(token), ttl))

    def __enter__(self) -> RedisLock:
        if self.acquire() is None:
            raise self.core.not_acquired()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._run(self.core.exit(self._take(None), exc))

    def _run(self, steps: Steps[Any]) -> Any:
        return run(steps, functools.partial(perform_redis, self.redis))
