"""Timing and concurrency harnesses shared by every notebook, test and benchmark.

- :func:`percentiles` / :func:`summarize`: p50/p95/p99 of latency samples (nearest-rank on
  sorted samples; no interpolation, so a reported p99 is a latency that really happened).
- :func:`time_calls`: wall-clock timing of each call with ``time.perf_counter``.
- :func:`collector_paused`: the cyclic garbage collector off for a measured block, as
  ``timeit`` does.
- :func:`run_async`: run a coroutine to completion from synchronous code, Jupyter included.
- :func:`run_threads`, :func:`run_processes`, :func:`run_tasks`: run one function from N
  threads / N processes / N asyncio tasks that start together (a barrier releases them at
  once, which is what makes races and stampedes reproducible) and collect one
  :class:`Call` per invocation: worker, start/end time, value or exception.
- :class:`RoundTripCounter` (Redis requests sent) and :class:`QueryCounter` (SQL statements
  executed): what a pattern costs in round trips, counted on the real client.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import math
import multiprocessing
import os
import queue as queue_module
import threading
import time
import traceback
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from course_lib.validation import non_negative_int, optional_positive_number, positive_int

__all__ = [
    "Call",
    "Calls",
    "QueryCounter",
    "RoundTripCounter",
    "collector_paused",
    "percentiles",
    "run_async",
    "run_processes",
    "run_tasks",
    "run_threads",
    "summarize",
    "time_calls",
]

DEFAULT_PERCENTILES = (50.0, 95.0, 99.0)


def percentiles(
    samples: Iterable[float], ps: Sequence[float] = DEFAULT_PERCENTILES
) -> dict[str, float]:
    """Nearest-rank percentiles, keyed ``"p50"``, ``"p95"``, ...; raises on no samples."""
    ordered = sorted(samples)
    if not ordered:
        raise ValueError("samples must not be empty")
    result = {}
    for p in ps:
        if not 0 < p <= 100:
            raise ValueError(f"ps must be percentiles in (0, 100], got {p}")
        rank = max(1, math.ceil(p / 100 * len(ordered)))
        result[f"p{p:g}"] = ordered[rank - 1]
    return result


def summarize(samples: Iterable[float], *, scale: float = 1.0) -> dict[str, float]:
    """Count, mean, p50/p95/p99 and max of ``samples`` multiplied by ``scale`` (e.g. 1e3 for ms)."""
    values = [s * scale for s in samples]
    spread = percentiles(values)  # raises ValueError on no samples
    return {
        "n": float(len(values)),
        "mean": sum(values) / len(values),
        **spread,
        "max": max(values),
    }


def time_calls(fn: Callable[[], Any], n: int, *, warmup: int = 0) -> list[float]:
    """Call ``fn`` ``warmup`` times untimed, then ``n`` times; return each call's seconds."""
    positive_int("n", n)
    non_negative_int("warmup", warmup)
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return samples


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Run the block with Python's cyclic garbage collector off, then restore its state.

    A full collection stops every thread of the process for as long as it walks the heap:
    in a process holding pandas and matplotlib and a few million objects, 0.4-0.6 s on a
    busy machine. A load generator stalled that long sends the requests it owed in one
    burst, and the run then measures the collector. ``timeit`` turns the collector off
    while it times, for the same reason. Reference counting still frees everything that
    is not in a cycle, so a bounded block grows memory only by the cycles it creates.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@dataclass(frozen=True)
class Call:
    """One invocation made by a harness. Times are ``time.perf_counter()`` seconds."""

    worker: int
    index: int
    start: float
    end: float
    value: Any = None
    error: str | None = None

    @property
    def latency(self) -> float:
        return self.end - self.start

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class Calls:
    """Everything one harness run collected, in completion order per worker."""

    calls: list[Call] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.calls)

    def __iter__(self):
        return iter(self.calls)

    @property
    def values(self) -> list[Any]:
        return [c.value for c in self.calls if c.ok]

    @property
    def errors(self) -> list[str]:
        return [c.error for c in self.calls if c.error is not None]

    @property
    def latencies(self) -> list[float]:
        return [c.latency for c in self.calls]

    def summary(self, *, scale: float = 1e3) -> dict[str, float]:
        """Latency summary, in milliseconds by default."""
        return summarize(self.latencies, scale=scale)

    def to_frame(self) -> pd.DataFrame:
        """One row per call; ``start``/``end`` relative to the first start, in seconds."""
        origin = min((c.start for c in self.calls), default=0.0)
        return pd.DataFrame(
            {
                "worker": [c.worker for c in self.calls],
                "index": [c.index for c in self.calls],
                "start": [c.start - origin for c in self.calls],
                "end": [c.end - origin for c in self.calls],
                "latency": [c.latency for c in self.calls],
                "value": [c.value for c in self.calls],
                "error": [c.error for c in self.calls],
            }
        )


def _describe(exc: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(exc), exc)).strip()


def _check_counts(workers: int, calls: int, timeout: float | None) -> None:
    positive_int("workers", workers)
    positive_int("calls", calls)
    optional_positive_number("timeout", timeout)


def _worker_loop(fn: Callable[..., Any], worker: int, calls: int, pass_worker: bool) -> list[Call]:
    out = []
    for index in range(calls):
        start = time.perf_counter()
        try:
            value = fn(worker, index) if pass_worker else fn()
            out.append(Call(worker, index, start, time.perf_counter(), value))
        except BaseException as exc:  # sys.exit() in a worker is a result too, not a lost call
            out.append(Call(worker, index, start, time.perf_counter(), error=_describe(exc)))
    return out


def run_threads(
    fn: Callable[..., Any],
    workers: int,
    *,
    calls: int = 1,
    pass_worker: bool = False,
    timeout: float | None = 60.0,
) -> Calls:
    """Run ``fn`` ``calls`` times in each of ``workers`` threads released together.

    With ``pass_worker`` it is called as ``fn(worker, index)``. Exceptions are recorded, not
    raised. Raises ``TimeoutError`` if a thread is still running after ``timeout`` seconds
    (the threads are daemons, so a hung call cannot keep the interpreter alive).
    """
    _check_counts(workers, calls, timeout)
    barrier = threading.Barrier(workers)
    results: list[list[Call]] = [[] for _ in range(workers)]

    def body(worker: int) -> None:
        barrier.wait()
        results[worker] = _worker_loop(fn, worker, calls, pass_worker)

    threads = [threading.Thread(target=body, args=(w,), daemon=True) for w in range(workers)]
    for thread in threads:
        thread.start()
    deadline = None if timeout is None else time.monotonic() + timeout
    for thread in threads:
        thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            raise TimeoutError(f"a thread was still running after {timeout} s")
    return Calls([c for chunk in results for c in chunk])


def _process_body(
    fn: Callable[..., Any],
    worker: int,
    calls: int,
    pass_worker: bool,
    barrier: Any,
    queue: Any,
) -> None:
    try:
        barrier.wait()
        queue.put((worker, _worker_loop(fn, worker, calls, pass_worker), None))
    except BaseException as exc:
        queue.put((worker, [], _describe(exc)))


def _context() -> multiprocessing.context.BaseContext:
    # fork lets notebooks pass functions defined in a cell; spawn would need them importable.
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def run_processes(
    fn: Callable[..., Any],
    workers: int,
    *,
    calls: int = 1,
    pass_worker: bool = False,
    timeout: float | None = 120.0,
) -> Calls:
    """Like :func:`run_threads`, with ``workers`` OS processes.

    Each process must open its own connections (a client created before the fork must not be
    shared). ``perf_counter`` is system-wide on Linux and macOS, so times are comparable
    across processes. Values travel back pickled between these processes only (never from
    Redis). Raises ``TimeoutError`` after ``timeout`` (the processes are killed) and
    ``RuntimeError`` naming the worker if one dies (killed, crashed) or exits without
    reporting (e.g. a value that cannot be pickled).
    """
    _check_counts(workers, calls, timeout)
    ctx = _context()
    barrier = ctx.Barrier(workers)
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_process_body, args=(fn, w, calls, pass_worker, barrier, queue))
        for w in range(workers)
    ]
    for proc in procs:
        proc.start()
    collected: list[Call] = []
    failures: list[str] = []
    reported: set[int] = set()
    deadline = None if timeout is None else time.monotonic() + timeout
    exited_at: dict[int, float] = {}
    grace = 5.0
    try:
        while len(reported) < workers:
            if deadline is not None and time.monotonic() > deadline:
                grace = 0.0
                raise TimeoutError(f"a process was still running after {timeout} s")
            try:
                worker, chunk, failure = queue.get(timeout=0.05)
            except queue_module.Empty:
                _check_dead(procs, reported, exited_at)
                continue
            reported.add(worker)
            collected.extend(chunk)
            if failure:
                failures.append(f"worker {worker}: {failure}")
    except BaseException:
        grace = 0.0
        raise
    finally:
        for proc in procs:
            proc.join(timeout=grace)
            if proc.is_alive():
                proc.kill()
                proc.join()
    if failures:
        raise RuntimeError("; ".join(failures))
    return Calls(sorted(collected, key=lambda c: (c.worker, c.index)))


def _check_dead(procs: list[Any], reported: set[int], exited_at: dict[int, float]) -> None:
    """Raise if a worker ended without reporting (its result may still be in the pipe briefly)."""
    now = time.monotonic()
    for worker, proc in enumerate(procs):
        if worker in reported or proc.exitcode is None:
            continue
        first_seen = exited_at.setdefault(worker, now)
        if proc.exitcode != 0:
            raise RuntimeError(f"worker {worker} died with exit code {proc.exitcode}")
        if now - first_seen > 2.0:
            raise RuntimeError(f"worker {worker} exited without reporting (unpicklable value?)")


async def _run_tasks_async(
    fn: Callable[..., Awaitable[Any]], workers: int, calls: int, pass_worker: bool
) -> list[Call]:
    start_gate = asyncio.Event()
    results: list[list[Call]] = [[] for _ in range(workers)]

    async def body(worker: int) -> None:
        await start_gate.wait()
        for index in range(calls):
            start = time.perf_counter()
            pending = fn(worker, index) if pass_worker else fn()
            if not inspect.isawaitable(pending):
                raise TypeError(f"fn must return an awaitable, got {type(pending).__name__}")
            try:
                value = await pending
                results[worker].append(Call(worker, index, start, time.perf_counter(), value))
            except Exception as exc:
                results[worker].append(
                    Call(worker, index, start, time.perf_counter(), error=_describe(exc))
                )

    tasks = [asyncio.create_task(body(w)) for w in range(workers)]
    await asyncio.sleep(0)
    start_gate.set()
    await asyncio.gather(*tasks)
    return [c for chunk in results for c in chunk]


def run_async(coro: Coroutine[Any, Any, Any], *, timeout: float | None = None) -> Any:
    """Run ``coro`` on a fresh event loop in a helper thread and return its result.

    Works where an event loop is already running (Jupyter). Exceptions propagate. With a
    ``timeout``, ``TimeoutError`` if the loop has not finished after that many seconds
    (blocking code can keep it from even cancelling its tasks: the daemon thread is then
    abandoned).
    """
    outcome: dict[str, Any] = {}

    def runner() -> None:
        try:
            outcome["value"] = asyncio.run(coro)
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=runner, name=f"run_async-{os.getpid()}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"the event loop was still running after {timeout} s (blocking code?)")
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def run_tasks(
    fn: Callable[..., Awaitable[Any]],
    workers: int,
    *,
    calls: int = 1,
    pass_worker: bool = False,
    timeout: float | None = 60.0,
) -> Calls:
    """Like :func:`run_threads`, with ``workers`` asyncio tasks on one event loop.

    ``fn`` returns an awaitable (``TypeError`` otherwise). Runs its own event loop in a
    helper thread, so it also works inside Jupyter, where a loop is already running. Raises
    ``TimeoutError`` after ``timeout`` seconds: the tasks are cancelled, and if blocking code
    keeps the loop from even cancelling them, the (daemon) loop thread is abandoned.
    """
    _check_counts(workers, calls, timeout)

    async def bounded() -> list[Call]:
        return await asyncio.wait_for(
            _run_tasks_async(fn, workers, calls, pass_worker), timeout=timeout
        )

    try:
        return Calls(run_async(bounded(), timeout=None if timeout is None else timeout + 1.0))
    except TimeoutError as error:
        raise TimeoutError(f"asyncio tasks were still running after {timeout} s") from error


class RoundTripCounter:
    """A new ``redis.Redis`` on ``url`` (``.client``) that counts the requests it sends.

    One command is one round trip; a pipeline or a ``MGET`` is one round trip however many
    keys it carries. The pool's connection class is a subclass that counts
    ``send_packed_command`` calls, so it observes the real client talking to the real
    server. The connection handshake is not counted: what a connection sends while it
    connects (``HELLO``, ``AUTH``, ``CLIENT SETINFO``, ``CLIENT MAINT_NOTIFICATIONS``,
    ``SELECT``) is skipped, so N commands count N whichever thread sends them and however
    many connections the pool opens for them. Thread-safe.
    """

    def __init__(self, url: str, **kwargs: Any) -> None:
        import redis

        self._lock = threading.Lock()
        self.count = 0
        pool = redis.ConnectionPool.from_url(url, **kwargs)
        counter = self

        class Counting(pool.connection_class):  # type: ignore[name-defined, misc]
            # Set while this connection connects; a connection serves one thread at a time.
            _handshake = False

            def connect_check_health(self, *args: Any, **kwargs: Any) -> None:
                self._handshake = True
                try:
                    super().connect_check_health(*args, **kwargs)
                finally:
                    self._handshake = False

            def send_packed_command(self, command: Any, check_health: bool = True) -> None:
                if not self._handshake:
                    with counter._lock:
                        counter.count += 1
                super().send_packed_command(command, check_health)

        pool.connection_class = Counting
        self.client = redis.Redis(connection_pool=pool)
        self.client.ping()
        self.reset()

    def reset(self) -> None:
        """Start counting from zero."""
        with self._lock:
            self.count = 0


class QueryCounter:
    """``with QueryCounter(engine) as q: ...``: every SQL statement ``engine`` runs inside the
    block, counted (``q.count``) and kept in order (``q.statements``).

    Counted at SQLAlchemy's ``before_cursor_execute`` event, so it sees what is really sent
    to the database: lazy loads, eager-load batches, flushes. An ``executemany`` is one
    statement. ``where`` keeps only the statements for which it returns true (e.g.
    ``lambda sql: sql.startswith("SELECT")``). Thread-safe. Re-entrant: the same counter
    may be entered again (nested, or from another thread); it listens from the first entry
    to the last exit.
    """

    def __init__(self, engine: Any, *, where: Callable[[str], bool] | None = None) -> None:
        if where is not None and not callable(where):
            raise TypeError(f"where must be callable or None, got {type(where).__name__}")
        self.engine = engine
        self.where = where
        self.statements: list[str] = []
        self._lock = threading.Lock()
        self._entries = 0  # SQLAlchemy keeps one listener per function: count the entries

    @property
    def count(self) -> int:
        """Statements seen so far."""
        return len(self.statements)

    def _on_execute(self, conn: Any, cursor: Any, statement: str, *rest: Any) -> None:
        sql = " ".join(statement.split())
        if self.where is None or self.where(sql):
            with self._lock:
                self.statements.append(sql)

    def __enter__(self) -> QueryCounter:
        from sqlalchemy import event

        with self._lock:
            self._entries += 1
            if self._entries == 1:
                event.listen(self.engine, "before_cursor_execute", self._on_execute)
        return self

    def __exit__(self, *exc: object) -> None:
        from sqlalchemy import event

        with self._lock:
            self._entries -= 1
            if self._entries == 0:
                event.remove(self.engine, "before_cursor_execute", self._on_execute)
