"""The Redis lock without I/O: its rules, its steps and the one polling backoff of the package.

:class:`~course_lib.caching.RedisLock` (threads) and
:class:`~course_lib.caching.aio.AsyncRedisLock` (asyncio) drive these steps; the cache-aside
takes its per-key mutex through them, so the package has one lock with one set of rules.
"""

from __future__ import annotations

import abc
import secrets
import time
from typing import Any

from course_lib import lua
from course_lib.validation import non_negative_number, redis_ttl, text

from .steps import Command, Eval, Pause, Steps

__all__ = ["Backoff", "LockCore", "LockNotAcquired", "LockNotOwned", "LockShell", "new_token"]

RELEASE = lua.load("course_lib.caching", "release")
EXTEND = lua.load("course_lib.caching", "extend")


class LockNotAcquired(TimeoutError):
    """``with lock:`` could not acquire the lock within its ``wait``."""


class LockNotOwned(RuntimeError):
    """The lock was released or extended by a holder that no longer owns it (it expired, or
    another client took it over): the work done under it was not exclusive."""


def new_token() -> str:
    """A random lock token (128 bits): unguessable, so no other client can forge ours."""
    return secrets.token_hex(16)


class Backoff:
    """The pauses between two polls of something another client holds, until ``wait``
    seconds have passed: 1 ms, doubling up to 20 ms (short at first, as most holders finish
    quickly; bounded, so a freed lock or a stored value is seen within 20 ms)."""

    FIRST = 0.001
    LONGEST = 0.02

    def __init__(self, wait: float) -> None:
        self.deadline = time.monotonic() + wait
        self.pause = self.FIRST

    def next_pause(self) -> float | None:
        """How long to pause before polling again; ``None`` once the wait is over."""
        if time.monotonic() >= self.deadline:
            return None
        pause, self.pause = self.pause, min(self.pause * 2, self.LONGEST)
        return pause


class LockCore:
    """``SET name token NX PX ttl`` to acquire, compare-and-delete to release: validated
    settings and the steps of each operation (see :mod:`course_lib.caching.redis_lock` for
    the guarantees)."""

    def __init__(self, name: str, *, ttl: float, wait: float) -> None:
        self.name = text("name", name)
        self.ttl = redis_ttl("ttl", ttl)
        self.wait = non_negative_number("wait", wait)

    def try_acquire(self) -> Steps[str | None]:
        """One attempt, no waiting: the acquisition's token, or ``None`` if held by another."""
        token = new_token()
        acquired = yield Command("set", (self.name, token), {"nx": True, "px": _ms(self.ttl)})
        return token if acquired else None

    def acquire(self) -> Steps[str | None]:
        """Attempts until acquired or ``wait`` seconds have passed: the token, or ``None``."""
        backoff = Backoff(self.wait)
        while (token := (yield from self.try_acquire())) is None:
            pause = backoff.next_pause()
            if pause is None:
                return None
            yield Pause(pause)
        return token

    def release(self, token: str) -> Steps[None]:
        """Delete the lock if ``token`` still holds it; :class:`LockNotOwned` if not."""
        if not (yield Eval(RELEASE, [self.name], [token])):
            raise self.not_owned("release")

    def extend(self, token: str, ttl: float | None) -> Steps[None]:
        """A fresh ``ttl`` (default the lock's) if ``token`` still holds it; else
        :class:`LockNotOwned`."""
        seconds = self.ttl if ttl is None else redis_ttl("ttl", ttl)
        if not (yield Eval(EXTEND, [self.name], [token, _ms(seconds)])):
            raise self.not_owned("extend")

    def exit(self, token: str, exc: BaseException | None) -> Steps[None]:
        """The end of a ``with`` block: release; a lost lock is raised, or added as a note to
        the exception the block raised (that one is what the caller must see)."""
        if (yield Eval(RELEASE, [self.name], [token])):
            return
        if exc is None:
            raise self.not_owned("release")
        exc.add_note(f"and the lock {self.name!r} was lost before the block ended")

    def not_acquired(self) -> LockNotAcquired:
        return LockNotAcquired(f"lock {self.name!r} still held by another after {self.wait} s")

    def not_owned(self, action: str) -> LockNotOwned:
        return LockNotOwned(
            f"cannot {action} lock {self.name!r}: it is no longer ours (expired or taken)"
        )


class LockShell(abc.ABC):
    """What both lock shells keep besides the connection: the settings and the token of the
    caller's current acquisition (per thread, or per asyncio task: ``holder`` names which),
    so callers sharing one lock object never release each other's acquisition."""

    holder = "caller"

    def __init__(self, redis: Any, name: str, *, ttl: float = 10.0, wait: float = 10.0) -> None:
        self.core = LockCore(name, ttl=ttl, wait=wait)
        self.redis = redis
        self.name, self.ttl, self.wait = self.core.name, self.core.ttl, self.core.wait

    @property
    @abc.abstractmethod
    def token(self) -> str | None:
        """The token of this caller's current acquisition, if any."""

    @abc.abstractmethod
    def _remember(self, token: str | None) -> None:
        """Keep ``token`` as this caller's current acquisition (``None``: forget it)."""

    def _kept(self, token: str | None) -> str | None:
        if token is not None:
            self._remember(token)
        return token

    def _mine(self, token: str | None) -> str:
        """``token``, or this caller's current one."""
        token = token or self.token
        if token is None:
            raise RuntimeError(f"lock {self.name!r} was not acquired by this {self.holder}")
        return token

    def _take(self, token: str | None) -> str:
        """:meth:`_mine`, forgotten if it is this caller's current one (it is being released)."""
        mine = self._mine(token)
        if mine == self.token:
            self._remember(None)
        return mine


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))
