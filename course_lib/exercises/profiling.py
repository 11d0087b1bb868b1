"""Exercises of notebook 05 (profiling); each checker runs the student's code for real.

- :func:`check_query_budget`: a guard for tests that fails a block running more SQL
  statements than its budget, naming the repeated statement (the N+1's signature); checked
  on PostgreSQL against the blog's lazy and eager page loads.
- :func:`check_sampler`: a sampling profiler in a few lines (a thread reading the profiled
  thread's stack with ``sys._current_frames()``); checked on a workload whose true shares
  the checker knows, drawn at random so no fixed answer passes.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine, text

from course_lib import services
from course_lib.profiling.lesson.service import Blog, seed_blog

from .result import CheckResult, failed, not_attempted, passed

__all__ = ["check_query_budget", "check_sampler"]


class _Workloads:
    """The blog's two page loads on a schema of their own, for the budget checker."""

    def __init__(self) -> None:
        self.schema = services.unique_schema("ex05")
        self.engine = services.schema_engine(self.schema)
        self.other = services.schema_engine(self.schema)  # a second engine, same tables
        seed_blog(self.engine, seed=11)
        self.redis = services.redis_client()  # the blog's limiter; the page loads skip it
        self.blog = Blog(self.engine, self.redis, f"{self.schema}:blog")

    def close(self) -> None:
        self.redis.close()
        self.engine.dispose()
        self.other.dispose()
        services.drop_schema(self.schema)


def _raises_assertion(block: Callable[[], Any], guard: Any) -> AssertionError | None:
    try:
        with guard:
            block()
    except AssertionError as exc:
        return exc
    return None


def check_query_budget(query_budget: Callable[[Engine, int], Any]) -> CheckResult:
    """``query_budget(engine, max_statements)`` is a context manager: it counts the SQL
    statements ``engine`` sends inside the block and, on leaving it, raises
    ``AssertionError`` if there were more than ``max_statements``, with a message that names
    the statement sent most often (its text, parameters left out) and how many times.

    Checked: the eager page (1 statement) passes a budget of 2; the lazy page (51: the
    N+1) fails it, and the message names the authors query and 50; statements before and
    after the block, and on another engine, are not counted; a second block counts from
    zero; an exception raised in the block comes out unchanged (not an AssertionError)."""
    name = "check_query_budget"
    work = _Workloads()
    try:
        try:
            guard = query_budget(work.engine, 2)
        except NotImplementedError:
            return not_attempted(name, "implement query_budget")
        if _raises_assertion(work.blog.load_page_joined, guard) is not None:
            return failed(name, "the eager page sends 1 statement: a budget of 2 must pass")
        error = _raises_assertion(work.blog.load_page_n_plus_1, query_budget(work.engine, 2))
        if error is None:
            return failed(name, "the lazy page sent 51 statements under a budget of 2: no error")
        message = str(error)
        if "authors" not in message or "50" not in message:
            return failed(
                name,
                "the error must name the statement sent most often and its count "
                f"(the authors lookup, 50 times); it said: {message[:160]!r}",
            )
        # Only the block: a statement after the guard is made but before the block starts.
        listeners = len(work.engine.dispatch.before_cursor_execute)
        guard = query_budget(work.engine, 0)
        _select(work.engine)
        if error := _raises_assertion(lambda: None, guard):
            return failed(name, f"a statement sent before the block was counted: {error}")
        # Only its engine: a statement on another engine inside the block.
        if error := _raises_assertion(lambda: _select(work.other), query_budget(work.engine, 0)):
            return failed(name, f"a statement on another engine was counted: {error}")
        if len(work.engine.dispatch.before_cursor_execute) != listeners:
            return failed(name, "the guard left its event listener on the engine after the block")
        try:
            with query_budget(work.engine, 100):
                raise KeyError("from the block")
        except KeyError:
            pass
        except Exception as exc:
            return failed(name, f"the block's KeyError came out as {type(exc).__name__}")
        else:
            return failed(name, "the block's KeyError was swallowed")
    finally:
        work.close()
    return passed(
        name,
        "eager page within 2; the N+1 fails 2 naming the authors query x50; "
        "counts only its block and its engine",
    )


def _select(engine: Engine) -> None:
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))


def _spin(seconds: float) -> None:
    """Busy work for ``seconds`` of wall time (a frame of its own, under each caller)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        sum(range(200))
        time.sleep(0)  # lets the sampler's thread take the GIL when its tick is due


def parse_orders(seconds: float) -> None:
    """One of the two stages of the checker's workload."""
    _spin(seconds)


def price_orders(seconds: float) -> None:
    """The other stage."""
    _spin(seconds)


def check_sampler(sample: Callable[..., Counter]) -> CheckResult:
    """``sample(fn, interval)`` calls ``fn()`` in the calling thread while another thread,
    every ``interval`` seconds, reads the calling thread's stack; it returns a ``Counter``:
    for each function name, the number of samples in which that function was on the stack
    (anywhere, not only innermost). When it returns, its sampling thread has stopped.

    Checked on a workload of two stages whose durations the checker draws at random (so a
    fixed answer cannot pass): each stage's share of the samples within 15 points of its
    share of the time; at least 10 samples of the calling thread; no
    thread left running."""
    name = "check_sampler"
    rng = random.Random()
    share = rng.uniform(0.3, 0.7)  # parse_orders' share of the time, unknown to the student
    spent = {"parse_orders": 0.0, "price_orders": 0.0}

    def timed(stage: Callable[[float], None], seconds: float) -> None:
        start = time.perf_counter()
        stage(seconds)
        spent[stage.__name__] += time.perf_counter() - start

    def workload() -> None:
        # The stages alternate, so a sampler that starts late or stalls for a moment on a
        # busy machine loses samples of both alike, not of the first stage only.
        for _ in range(8):
            timed(parse_orders, 0.1 * share)
            timed(price_orders, 0.1 * (1 - share))

    before = set(threading.enumerate())
    try:
        counts = sample(workload, 0.005)
    except NotImplementedError:
        return not_attempted(name, "implement sample")
    if not isinstance(counts, Counter):
        return failed(name, f"sample must return a Counter, got {type(counts).__name__}")
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline and set(threading.enumerate()) - before:
        time.sleep(0.01)  # polling for a state: the sampler's thread finishing its last tick
    if set(threading.enumerate()) - before:
        return failed(name, "a sampling thread is still running after sample returned")
    total = counts.get("workload", 0)
    if total < 10:  # of about 160 ticks: room for a busy machine, none for the wrong thread
        return failed(
            name,
            f"{total} samples with workload on the stack over 0.8 s at 5 ms: the sampler "
            "does not see the calling thread (sys._current_frames()[its thread id])",
        )
    busy = sum(spent.values())
    shares = {
        stage: (counts.get(stage, 0) / total, seconds / busy) for stage, seconds in spent.items()
    }
    for stage, (seen, true) in shares.items():
        if abs(seen - true) > 0.15:
            return failed(
                name,
                f"{stage}: {seen:.0%} of the samples for {true:.0%} of the time; count every "
                "function on the stack (walk f_back), not only the innermost one",
            )
    return passed(
        name,
        "each stage's share of the samples within 15 points of its share of the time; "
        "the sampling thread stopped",
    )
