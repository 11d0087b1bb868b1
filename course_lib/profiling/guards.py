"""What every profiler of the package refuses, because its numbers would silently be wrong.

- A second profiler in a thread that already runs one: a thread has one profile hook, so on
  Python 3.11 the inner profiler takes it over and the outer one loses every row from then on
  (3.12 refuses a second cProfile with a bare ``ValueError``). Refused with ``RuntimeError``.
- A function whose work runs after the call returns (a coroutine, an awaitable, a generator):
  only the creation of that object would be measured. Refused with ``TypeError``.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["another_profiler_running", "refuse_async", "refuse_deferred_work", "refuse_nested"]


def another_profiler_running() -> bool:
    """Whether a profiler already holds this thread's profile hook (``sys.setprofile``; on
    3.12+ also the profiler slot of ``sys.monitoring``, which cProfile takes there)."""
    if sys.getprofile() is not None:
        return True
    monitoring = getattr(sys, "monitoring", None)
    return monitoring is not None and monitoring.get_tool(monitoring.PROFILER_ID) is not None


def refuse_nested(what: str) -> None:
    """``RuntimeError`` naming ``what`` if another profiler is running in this thread."""
    if another_profiler_running():
        raise RuntimeError(
            f"{what}: another profiler is already running in this thread; profilers do not "
            "nest (the inner one would take the outer one's hook, which would lose rows)"
        )


def refuse_async(fn: Callable[..., Any], what: str) -> None:
    """``TypeError`` if ``fn`` is an ``async`` function or an async generator function."""
    if inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn):
        raise TypeError(
            f"fn must be a synchronous function, got the async {fn.__qualname__}: {what} "
            "would time the creation of a coroutine; pass a function that runs it, e.g. "
            "lambda: asyncio.run(main())"
        )


def refuse_deferred_work(value: object, what: str) -> None:
    """``TypeError`` if ``value``, what ``fn`` returned, holds work that has not run yet."""
    if inspect.isawaitable(value) or inspect.isgenerator(value) or inspect.isasyncgen(value):
        if inspect.iscoroutine(value):
            value.close()  # never started: closed, it does not warn "never awaited"
        raise TypeError(
            f"fn returned a {type(value).__name__}: its work runs after {what} stopped; pass "
            "a function that runs it, e.g. lambda: asyncio.run(main()) or lambda: list(rows())"
        )
