"""Each checker of notebook 05 passes the reference solution and fails planted wrong answers."""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter
from contextlib import contextmanager

from sqlalchemy import Engine, event

from course_lib.exercises.profiling import check_query_budget, check_sampler


@contextmanager
def reference_budget(engine: Engine, max_statements: int):
    seen: list[str] = []

    def on_execute(conn, cursor, statement, *rest):
        seen.append(" ".join(statement.split()))

    event.listen(engine, "before_cursor_execute", on_execute)
    try:
        yield
    finally:
        event.remove(engine, "before_cursor_execute", on_execute)
    if len(seen) > max_statements:
        statement, times = Counter(seen).most_common(1)[0]
        raise AssertionError(
            f"{len(seen)} statements for a budget of {max_statements}; "
            f"sent {times} times: {statement}"
        )


@contextmanager
def budget_without_the_culprit(engine: Engine, max_statements: int):
    seen: list[str] = []
    listener = lambda *args: seen.append(args[2])  # noqa: E731
    event.listen(engine, "before_cursor_execute", listener)
    try:
        yield
    finally:
        event.remove(engine, "before_cursor_execute", listener)
    assert len(seen) <= max_statements, f"{len(seen)} statements"


class BudgetFromConstruction:
    """Listens from construction, not from the start of the block."""

    def __init__(self, engine: Engine, max_statements: int) -> None:
        self.engine, self.max, self.seen = engine, max_statements, []
        event.listen(engine, "before_cursor_execute", self.on_execute)

    def on_execute(self, conn, cursor, statement, *rest):
        self.seen.append(statement)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        event.remove(self.engine, "before_cursor_execute", self.on_execute)
        if exc[0] is None and len(self.seen) > self.max:
            statement, times = Counter(self.seen).most_common(1)[0]
            raise AssertionError(f"sent {times} times: {statement}")


@contextmanager
def budget_on_every_engine(engine: Engine, max_statements: int):
    seen: list[str] = []

    def on_execute(conn, cursor, statement, *rest):
        seen.append(statement)

    event.listen(Engine, "before_cursor_execute", on_execute)
    try:
        yield
    finally:
        event.remove(Engine, "before_cursor_execute", on_execute)
    if len(seen) > max_statements:
        statement, times = Counter(seen).most_common(1)[0]
        raise AssertionError(f"sent {times} times: {statement}")


@contextmanager
def budget_that_hides_errors(engine: Engine, max_statements: int):
    seen: list[str] = []
    listener = lambda *args: seen.append(args[2])  # noqa: E731
    event.listen(engine, "before_cursor_execute", listener)
    try:
        yield
    except Exception:
        pass
    finally:
        event.remove(engine, "before_cursor_execute", listener)
    if len(seen) > max_statements:
        statement, times = Counter(seen).most_common(1)[0]
        raise AssertionError(f"sent {times} times: {statement}")


def not_attempted_budget(engine, max_statements):
    raise NotImplementedError


def test_budget_checker_passes_the_reference() -> None:
    assert check_query_budget(reference_budget)


def test_budget_checker_fails_planted_wrong_answers() -> None:
    result = check_query_budget(budget_without_the_culprit)
    assert not result and "name the statement" in result.message
    result = check_query_budget(BudgetFromConstruction)
    assert not result and "before the block" in result.message
    result = check_query_budget(budget_on_every_engine)
    assert not result and "another engine" in result.message
    result = check_query_budget(budget_that_hides_errors)
    assert not result and "swallowed" in result.message
    result = check_query_budget(not_attempted_budget)
    assert not result and "not attempted" in result.message


def reference_sample(fn, interval):
    target = threading.get_ident()
    counts: Counter = Counter()
    done = threading.Event()

    def sampler():
        while not done.wait(interval):
            frame = sys._current_frames().get(target)
            names = set()
            while frame is not None:
                names.add(frame.f_code.co_name)
                frame = frame.f_back
            counts.update(names)

    thread = threading.Thread(target=sampler)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    return counts


def innermost_only_sample(fn, interval):
    target = threading.get_ident()
    counts: Counter = Counter()
    done = threading.Event()

    def sampler():
        while not done.wait(interval):
            frame = sys._current_frames().get(target)
            if frame is not None:
                counts[frame.f_code.co_name] += 1
                counts["workload"] += 1  # pretends to see the caller
        # stopped

    thread = threading.Thread(target=sampler)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    return counts


def own_thread_sample(fn, interval):
    counts: Counter = Counter()
    done = threading.Event()

    def sampler():
        while not done.wait(interval):
            frame = sys._current_frames()[threading.get_ident()]  # its own stack
            while frame is not None:
                counts[frame.f_code.co_name] += 1
                frame = frame.f_back

    thread = threading.Thread(target=sampler)
    thread.start()
    fn()
    done.set()
    thread.join()
    return counts


def never_stops_sample(fn, interval):
    target = threading.get_ident()
    counts: Counter = Counter()
    stop = threading.Event()

    def sampler():
        while not stop.wait(interval):
            frame = sys._current_frames().get(target)
            while frame is not None:
                counts[frame.f_code.co_name] += 1
                frame = frame.f_back

    threading.Thread(target=sampler, daemon=True).start()
    fn()
    time.sleep(0)  # returns with the thread still sampling
    result = Counter(counts)
    _leaked_samplers.append(stop)
    return result


_leaked_samplers: list[threading.Event] = []


def test_sampler_checker_passes_the_reference() -> None:
    assert check_sampler(reference_sample)


def test_sampler_checker_fails_planted_wrong_answers() -> None:
    result = check_sampler(innermost_only_sample)
    assert not result and "walk f_back" in result.message
    result = check_sampler(own_thread_sample)
    assert not result and "does not see the calling thread" in result.message
    try:
        result = check_sampler(never_stops_sample)
        assert not result and "still running" in result.message
    finally:
        for stop in _leaked_samplers:
            stop.set()
    result = check_sampler(lambda fn, interval: dict(fn() or {}))
    assert not result and "must return a Counter" in result.message
