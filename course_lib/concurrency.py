"""Drive a decision (a limiter, a lock, a balancer) from many threads and processes at once
and count what it let through; make races show up on demand.

These are the experiments behind the course's concurrency claims: the harnesses of
:mod:`course_lib.measure` release all workers together, so races show up and the counts
are exact. :func:`fast_switching` makes CPython switch threads far more often, so a race
window between two Python statements is hit on most runs instead of rarely;
:func:`switch_between_bytecodes` puts a switch point between every two bytecodes of chosen
code, so an unlocked read-modify-write in it is interleaved on every run.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import FrameType
from typing import Any

from course_lib.measure import run_processes, run_threads

__all__ = [
    "Admission",
    "TimedRun",
    "admission_count",
    "fast_switching",
    "hammer_threads",
    "run_for",
    "switch_between_bytecodes",
]

Decide = Callable[[], object]


@dataclass(frozen=True)
class Admission:
    """``allowed`` of ``attempts`` were admitted over ``elapsed`` wall-clock seconds."""

    allowed: int
    attempts: int
    elapsed: float


def _raise_errors(errors: list[str]) -> None:
    if errors:
        raise RuntimeError(f"{len(errors)} call(s) failed, first: {errors[0]}")


def admission_count(
    make_decide: Callable[[], Decide],
    *,
    processes: int = 2,
    threads: int = 8,
    attempts: int = 800,
    timeout: float = 60.0,
) -> Admission:
    """``attempts`` decisions spread over ``processes`` x ``threads`` workers started together.

    ``make_decide()`` runs once in each process (open connections there, never before the
    fork) and returns a function whose truthiness is "allowed". Any error is raised.
    """
    workers = processes * threads
    if attempts % workers:
        raise ValueError(f"attempts must be a multiple of processes * threads = {workers}")
    per_worker = attempts // workers

    def in_process() -> int:
        decide = make_decide()
        calls = run_threads(lambda: bool(decide()), threads, calls=per_worker, timeout=timeout)
        _raise_errors(calls.errors)
        return sum(calls.values)

    start = time.perf_counter()
    result = run_processes(in_process, processes, timeout=timeout)
    elapsed = time.perf_counter() - start
    _raise_errors(result.errors)
    return Admission(sum(result.values), attempts, elapsed)


@contextlib.contextmanager
def fast_switching(interval: float = 1e-6) -> Iterator[None]:
    """Make CPython switch threads every ``interval`` seconds instead of every 5 ms.

    A race between Python statements needs a thread switch to land inside it; switching
    far more often makes a rare interleaving common, so a test or a demo sees it reliably.
    """
    previous = sys.getswitchinterval()
    sys.setswitchinterval(interval)
    try:
        yield
    finally:
        sys.setswitchinterval(previous)


def hammer_threads(decide: Decide, *, threads: int = 8, calls: int = 200) -> int:
    """How many of ``threads * calls`` concurrent in-process decisions were allowed."""
    result = run_threads(lambda: bool(decide()), threads, calls=calls)
    _raise_errors(result.errors)
    return sum(result.values)


@dataclass(frozen=True)
class TimedRun:
    """What :func:`run_for` saw: ``allowed`` per process (ascending) and ``span``, seconds
    from the first process's first decision to the last one's end."""

    allowed: list[int]
    span: float


def run_for(
    make_decide: Callable[[], Decide],
    *,
    processes: int,
    seconds: float,
    pause: float = 0.001,
) -> TimedRun:
    """Each of ``processes`` processes asks ``make_decide()``'s function every ``pause``
    seconds for ``seconds``. Processes do not start in the same instant; ``span`` measures
    how long the whole run really took (``time.monotonic`` is one clock for every process
    of a machine), so a claim about a rate can use the real duration."""

    def in_process() -> tuple[int, float, float]:
        decide = make_decide()
        allowed = 0
        start = time.monotonic()
        deadline = start + seconds
        while time.monotonic() < deadline:
            allowed += bool(decide())
            time.sleep(pause)
        return allowed, start, time.monotonic()

    result = run_processes(in_process, processes, timeout=seconds + 60)
    _raise_errors(result.errors)
    runs = result.values
    span = max(end for _, _, end in runs) - min(start for _, start, _ in runs)
    return TimedRun(sorted(allowed for allowed, _, _ in runs), span)


@contextlib.contextmanager
def switch_between_bytecodes(*filenames: str) -> Iterator[None]:
    """In threads started inside this block, give up the GIL (``time.sleep(0)``) before every
    bytecode of code whose source file is one of ``filenames``.

    CPython switches threads only at some bytecodes (calls, loop jumps) once a thread's slice
    is over, so a read-modify-write without a lock loses an update only when a switch happens
    to land inside it. This offers a switch between every two bytecodes of the chosen code,
    whatever types it works on: an unlocked read-check-write there is interleaved on every run,
    while code that holds a lock only makes the other threads queue on it. Threads already
    running are not traced; the hook is removed on exit.
    """
    if not filenames:
        raise ValueError("filenames: give at least one source file to trace")
    traced = frozenset(filenames)

    def local(frame: FrameType, event: str, arg: object) -> Any:
        if event == "opcode":
            time.sleep(0)
        return local

    def global_trace(frame: FrameType, event: str, arg: object) -> Any:
        if frame.f_code.co_filename not in traced:
            return None
        frame.f_trace_opcodes = True
        return local

    threading.settrace(global_trace)
    try:
        yield
    finally:
        threading.settrace(None)  # type: ignore[arg-type]
