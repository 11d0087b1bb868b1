"""Single-flight: concurrent calls for one key share one execution of the work.

The first caller for a key (the leader) runs ``fn``; callers that arrive while it runs
(waiters) block until it finishes and receive the same result, or the same exception.

Guarantees, for :class:`SingleFlight` (threads) and :class:`AsyncSingleFlight` (tasks of one
event loop):

- at most one ``fn`` runs per key at a time within the object;
- the leader's exception reaches the leader and every waiter of that call;
- the key is released before waiters are woken, whatever ``fn`` did, so the next call after
  a failure runs ``fn`` again (nothing stays stuck, unlike a lock that is never released);
- a waiter waits at most ``timeout`` seconds, then raises :class:`FlightTimeout` (a
  ``TimeoutError``); the leader is not interrupted. An exception the leader's ``fn`` raised
  is never mistaken for that timeout, even if it is a ``TimeoutError`` itself;
- (asyncio) if the leading task is cancelled, its waiters are not failed: the first of them
  takes over and runs ``fn`` as the new leader, the others wait for it.

It protects one process only; :mod:`course_lib.caching.redis_lock` extends it across
processes.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, Generic, TypeVar

from course_lib.validation import optional_positive_number

__all__ = ["AsyncSingleFlight", "FlightTimeout", "SingleFlight"]

T = TypeVar("T")


class FlightTimeout(TimeoutError):
    """A waiter gave up waiting for the in-flight call after the flight's ``timeout``."""


class _LeaderCancelled(RuntimeError):
    """Set on an asyncio flight whose leader was cancelled: its waiters take over."""


class _Flight:
    __slots__ = ("done", "error", "value")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: Any = None
        self.error: BaseException | None = None


def _check_timeout(timeout: float | None) -> None:
    optional_positive_number("timeout", timeout)


class SingleFlight(Generic[T]):
    """Thread version: ``flight.do(key, fn)`` returns ``fn()``'s result, shared per key."""

    def __init__(self, *, timeout: float | None = 30.0) -> None:
        _check_timeout(timeout)
        self.timeout = timeout
        self._lock = threading.Lock()
        self._flights: dict[Hashable, _Flight] = {}

    def in_flight(self) -> int:
        """Number of keys whose ``fn`` is running now."""
        with self._lock:
            return len(self._flights)

    def do(self, key: Hashable, fn: Callable[[], T]) -> T:
        with self._lock:
            flight = self._flights.get(key)
            leader = flight is None
            if flight is None:
                flight = self._flights[key] = _Flight()
        if not leader:
            if not flight.done.wait(self.timeout):
                raise FlightTimeout(f"waited {self.timeout} s for the in-flight call of {key!r}")
            if flight.error is not None:
                raise flight.error
            return flight.value
        try:
            flight.value = fn()
            return flight.value
        except BaseException as exc:
            flight.error = exc
            raise
        finally:
            with self._lock:
                del self._flights[key]
            flight.done.set()


class AsyncSingleFlight(Generic[T]):
    """asyncio version: ``await flight.do(key, fn)`` with ``fn`` a coroutine function.

    If the leader is cancelled, the cancellation stays with the leader: a waiter takes over
    and runs ``fn`` itself (one waiter does; the others wait for it).
    """

    def __init__(self, *, timeout: float | None = 30.0) -> None:
        _check_timeout(timeout)
        self.timeout = timeout
        self._flights: dict[Hashable, asyncio.Future[T]] = {}

    def in_flight(self) -> int:
        return len(self._flights)

    async def do(self, key: Hashable, fn: Callable[[], Awaitable[T]]) -> T:
        while (future := self._flights.get(key)) is not None:
            try:
                return await asyncio.wait_for(asyncio.shield(future), self.timeout)
            except _LeaderCancelled:
                continue  # the leader is gone: the first waiter here becomes the next one
            except TimeoutError as exc:
                if future.done():
                    raise  # the leader's own TimeoutError, shared like any other error
                raise FlightTimeout(
                    f"waited {self.timeout} s for the in-flight call of {key!r}"
                ) from exc
        future = asyncio.get_running_loop().create_future()
        # Nobody may be waiting: mark the exception as retrieved so asyncio does not log it.
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._flights[key] = future
        try:
            value = await fn()
        except asyncio.CancelledError:
            del self._flights[key]
            future.set_exception(_LeaderCancelled(f"the in-flight call of {key!r} was cancelled"))
            raise
        except BaseException as exc:
            del self._flights[key]
            future.set_exception(exc)
            raise
        del self._flights[key]
        future.set_result(value)
        return value
