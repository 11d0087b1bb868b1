"""Ordering concurrent steps in tests by polling for a state, never by a sleep that is
"usually long enough": the suite must pass on a machine whose cores are all busy."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Hashable
from typing import Any

DEADLINE = 20.0  # generous: a state that never comes fails the test, a slow one does not


def until(predicate: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
    """Return once ``predicate()`` is true; ``AssertionError`` naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.001)


async def async_until(predicate: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
    """:func:`until` for a coroutine: the event loop runs the other tasks meanwhile."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.001)


def flight_waiters(flight: Any, key: Hashable) -> int:
    """Threads waiting on a ``SingleFlight``'s in-flight call of ``key`` (0 if none runs)."""
    with flight._lock:
        call = flight._flights.get(key)
    # CPython's threading.Event keeps the threads waiting on it in its Condition's _waiters.
    return 0 if call is None else len(call.done._cond._waiters)
