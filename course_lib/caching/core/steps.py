"""The steps a sans-I/O core asks its shell to take, and the loop that drives a core.

A core algorithm (:mod:`.cache_aside`, :mod:`.lock`) is a generator: it ``yield``\\ s a step
(a Redis command, a Lua script, a pause, a call of the loader, ...) and receives its result,
or has its exception raised at the ``yield``. It never does I/O itself, so it reads like the
algorithm, one ``yield`` per round trip, and is tested by sending it replies by hand. A sync
shell drives it with :func:`run`, an asyncio shell with :func:`arun` (as psycopg 3 drives
one protocol generator with ``wait`` and ``wait_async``); a shell only says how to take each
step. Every exception of a step, ``BaseException`` included, goes back into the core, so it
can still clean up (release a lock) when the caller is cancelled.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Generator, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from course_lib import lua

__all__ = [
    "Command",
    "Eval",
    "Load",
    "Pause",
    "Shared",
    "Step",
    "Steps",
    "TryLock",
    "Unlock",
    "aperform_redis",
    "arun",
    "perform_redis",
    "run",
]

T = TypeVar("T")


@dataclass(slots=True)
class Command:
    """Call the redis-py client's method ``name`` (``get``, ``mget``, ``set``); its reply."""

    name: str
    args: tuple[Any, ...]
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Eval:
    """Run a Lua script (``EVALSHA``, see :mod:`course_lib.lua`); its reply."""

    script: lua.Script
    keys: Sequence[Any]
    args: Sequence[Any] = ()


@dataclass(slots=True)
class Pause:
    """Wait ``seconds`` (between two polls)."""

    seconds: float


@dataclass(slots=True)
class Load:
    """Call the cache's loader for ``key`` (the database); its value."""

    key: Any


@dataclass(slots=True)
class Shared:
    """Run the core ``algorithm()`` once for every concurrent caller of this process asking for
    ``key`` (single-flight); the result, or a ``FlightTimeout`` for a waiter that gave up."""

    key: Hashable
    algorithm: Callable[[], Steps[Any]]


@dataclass(slots=True)
class TryLock:
    """One attempt at the Redis lock of ``key``'s load: the acquisition's token, or ``None``."""

    key: Any


@dataclass(slots=True)
class Unlock:
    """Release the lock of ``key`` taken with ``token`` (``LockNotOwned`` if it expired)."""

    key: Any
    token: str


Step = Command | Eval | Pause | Load | Shared | TryLock | Unlock
Steps = Generator[Step, Any, T]
"""A core algorithm: yields steps, receives their results, returns a ``T``."""


def run(steps: Steps[T], perform: Callable[[Any], Any]) -> T:
    """Drive a core algorithm to its result with ``perform(step)`` taking each step."""
    finished, step = _advance(steps)
    while not finished:
        finished, step = _advance(steps, *_outcome(perform, step))
    return step


async def arun(steps: Steps[T], perform: Callable[[Any], Awaitable[Any]]) -> T:
    """:func:`run` for an asyncio shell: ``await perform(step)`` takes each step."""
    finished, step = _advance(steps)
    while not finished:
        finished, step = _advance(steps, *await _aoutcome(perform, step))
    return step


def _advance(steps: Steps[Any], reply: Any = None, error: BaseException | None = None) -> Any:
    """Resume the core with the last step's reply, or raise its error at the core's
    ``yield``: ``(True, the core's result)`` once it returned, else ``(False, next step)``."""
    try:
        return False, (steps.send(reply) if error is None else steps.throw(error))
    except StopIteration as done:
        return True, done.value


def _outcome(perform: Callable[[Any], Any], step: Any) -> tuple[Any, BaseException | None]:
    try:
        return perform(step), None
    except BaseException as exc:  # handed back to the core, which re-raises what it can't handle
        return None, exc


async def _aoutcome(
    perform: Callable[[Any], Awaitable[Any]], step: Any
) -> tuple[Any, BaseException | None]:
    try:
        return await perform(step), None
    except BaseException as exc:
        return None, exc


def perform_redis(client: Any, step: Command | Eval | Pause) -> Any:
    """Take a Redis step (or a pause) with a sync ``redis.Redis`` or ``RedisCluster``."""
    match step:
        case Command():
            return getattr(client, step.name)(*step.args, **step.options)
        case Eval():
            return step.script(client, step.keys, step.args)
        case Pause():
            return time.sleep(step.seconds)
    raise TypeError(f"not a Redis step: {step!r}")


async def aperform_redis(client: Any, step: Command | Eval | Pause) -> Any:
    """:func:`perform_redis` for a ``redis.asyncio`` client."""
    match step:
        case Command():
            return await getattr(client, step.name)(*step.args, **step.options)
        case Eval():
            return await step.script.acall(client, step.keys, step.args)
        case Pause():
            return await asyncio.sleep(step.seconds)
    raise TypeError(f"not a Redis step: {step!r}")
