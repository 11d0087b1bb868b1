"""``course_lib.measure``: percentiles, the concurrency harnesses and the round-trip counter."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import sys
import threading
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from course_lib import services
from course_lib.measure import (
    QueryCounter,
    RoundTripCounter,
    collector_paused,
    percentiles,
    run_processes,
    run_tasks,
    run_threads,
    summarize,
    time_calls,
)


@pytest.mark.one_pass
def test_percentiles_are_nearest_rank() -> None:
    samples = list(range(1, 101))
    assert percentiles(samples) == {"p50": 50, "p95": 95, "p99": 99}
    assert percentiles([7.0]) == {"p50": 7.0, "p95": 7.0, "p99": 7.0}
    assert percentiles([3, 1, 2], ps=(100,)) == {"p100": 3}


@pytest.mark.one_pass
def test_percentiles_reject_no_samples() -> None:
    with pytest.raises(ValueError, match="samples"):
        percentiles([])


@pytest.mark.one_pass
def test_percentile_outside_range_is_rejected() -> None:
    with pytest.raises(ValueError, match="ps must"):
        percentiles([1, 2], ps=(0,))


@pytest.mark.one_pass
def test_summarize_scales() -> None:
    summary = summarize([0.001, 0.002, 0.003], scale=1e3)
    assert summary["n"] == 3 and summary["p50"] == pytest.approx(2.0)
    assert summary["max"] == pytest.approx(3.0)


@pytest.mark.one_pass
def test_time_calls_counts_calls() -> None:
    calls = []
    samples = time_calls(lambda: calls.append(1), 5, warmup=2)
    assert len(samples) == 5 and len(calls) == 7 and all(s >= 0 for s in samples)
    with pytest.raises(ValueError, match=r"^n must be >= 1"):
        time_calls(lambda: None, 0)
    with pytest.raises(TypeError, match=r"^n must be an integer"):
        time_calls(lambda: None, 2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^warmup must be >= 0"):
        time_calls(lambda: None, 1, warmup=-1)


@pytest.mark.one_pass
def test_collector_paused_restores_the_state_it_found() -> None:
    assert gc.isenabled()
    with pytest.raises(RuntimeError), collector_paused():
        assert not gc.isenabled()
        raise RuntimeError("the block failed")
    assert gc.isenabled()  # back on, even after a raise
    gc.disable()
    try:
        with collector_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # off before, left off
    finally:
        gc.enable()


@pytest.mark.one_pass
def test_threads_really_run_together() -> None:
    # Each call waits for all the others: it only completes if the 8 threads overlap.
    rendezvous = threading.Barrier(8, timeout=10)
    result = run_threads(rendezvous.wait, 8)
    # Barrier.wait gives each of the 8 parties a distinct index once all 8 have arrived.
    assert result.errors == [] and sorted(result.values) == list(range(8))


@pytest.mark.one_pass
def test_threads_record_exceptions_and_workers() -> None:
    def fn(worker: int, index: int) -> int:
        if worker == 1:
            raise KeyError("boom")
        return worker * 10 + index

    result = run_threads(fn, 3, calls=2, pass_worker=True)
    assert sorted(result.values) == [0, 1, 20, 21]
    assert result.errors == ["KeyError: 'boom'"] * 2
    frame = result.to_frame()
    assert list(frame.columns) == ["worker", "index", "start", "end", "latency", "value", "error"]
    assert frame["start"].min() == 0.0


@pytest.mark.one_pass
def test_threads_time_out_instead_of_hanging() -> None:
    never = threading.Event()
    with pytest.raises(TimeoutError):
        run_threads(lambda: never.wait(), 2, timeout=0.3)


@pytest.mark.one_pass
@pytest.mark.parametrize("runner", [run_threads, run_processes, run_tasks])
def test_bad_counts_are_rejected(runner) -> None:
    with pytest.raises(ValueError, match="workers"):
        runner(lambda: None, 0)
    with pytest.raises(ValueError, match="calls"):
        runner(lambda: None, 1, calls=0)
    with pytest.raises(TypeError, match="workers"):
        runner(lambda: None, True)
    with pytest.raises(ValueError, match="timeout"):
        runner(lambda: None, 1, timeout=0)
    with pytest.raises(TypeError, match=r"^timeout must be a number"):
        runner(lambda: None, 1, timeout="1")


def _pid() -> int:
    return os.getpid()


@pytest.mark.one_pass
def test_processes_are_distinct_processes() -> None:
    result = run_processes(_pid, 4, calls=3)
    assert len(result) == 12 and result.errors == []
    assert len(set(result.values)) == 4 and os.getpid() not in result.values


@pytest.mark.one_pass
def test_processes_time_out() -> None:
    with pytest.raises(TimeoutError):
        run_processes(lambda: time.sleep(30), 2, timeout=1)


@pytest.mark.one_pass
def test_tasks_run_concurrently_on_one_loop() -> None:
    async def fn() -> int:
        await rendezvous.wait()
        return threading.get_ident()

    rendezvous = asyncio.Barrier(20)
    result = run_tasks(fn, 20)
    assert len(result) == 20 and result.errors == [] and len(set(result.values)) == 1


@pytest.mark.one_pass
def test_tasks_time_out() -> None:
    async def forever() -> None:
        await asyncio.sleep(60)

    with pytest.raises(TimeoutError):
        run_tasks(forever, 3, timeout=0.2)


def test_round_trip_counter_counts_requests_not_commands(ns: str) -> None:
    counter = RoundTripCounter(services.redis_url())
    client = counter.client
    client.set(f"{ns}:a", 1)
    client.get(f"{ns}:a")
    assert counter.count == 2
    counter.reset()
    pipe = client.pipeline(transaction=False)
    for i in range(50):
        pipe.incr(f"{ns}:n{i}")
    pipe.execute()
    client.mget([f"{ns}:n{i}" for i in range(50)])
    assert counter.count == 2
    client.close()


@pytest.mark.one_pass
@given(
    st.lists(st.floats(allow_nan=False, allow_infinity=False), min_size=1, max_size=200),
    st.floats(min_value=0.001, max_value=100),
    st.floats(min_value=0.001, max_value=100),
)
def test_percentiles_are_observed_values_and_monotonic(samples, p, q) -> None:
    low, high = sorted((p, q))
    values = [percentiles(samples, ps=(x,))[f"p{x:g}"] for x in (low, high, 100)]
    assert all(v in samples for v in values)
    assert values[0] <= values[1] <= values[2] == max(samples)


@pytest.mark.one_pass
def test_sys_exit_in_a_thread_is_recorded_not_lost() -> None:
    result = run_threads(lambda: sys.exit(3), 2)
    assert len(result) == 2 and result.errors == ["SystemExit: 3", "SystemExit: 3"]


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _unpicklable() -> object:
    return threading.Lock()


@pytest.mark.one_pass
@pytest.mark.parametrize(
    ("fn", "message"), [(_die, "died with exit code -9"), (_unpicklable, "without reporting")]
)
def test_processes_that_cannot_report_are_named_quickly(fn, message: str) -> None:
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=message):
        run_processes(fn, 2, timeout=60)
    assert time.monotonic() - start < 20  # well before the timeout


@pytest.mark.one_pass
def test_tasks_need_an_awaitable() -> None:
    with pytest.raises(TypeError, match="awaitable"):
        run_tasks(lambda: 42, 2)


@pytest.mark.one_pass
def test_tasks_blocking_the_loop_time_out() -> None:
    async def blocking() -> None:
        time.sleep(3)

    start = time.monotonic()
    with pytest.raises(TimeoutError):
        run_tasks(blocking, 1, timeout=0.3)
    assert time.monotonic() - start < 2.5


def test_round_trip_counter_does_not_count_the_connection_handshake(ns: str) -> None:
    # redis-py 8 opens a connection with HELLO, CLIENT MAINT_NOTIFICATIONS and two CLIENT
    # SETINFO: one GET on a fresh connection once counted 5, 20 GETs from 4 threads 32.
    counter = RoundTripCounter(services.redis_url())
    pool = counter.client.connection_pool
    pool.disconnect()  # every connection reconnects, handshake included
    counter.client.get(f"{ns}:k")
    assert counter.count == 1
    pool.disconnect()
    counter.reset()
    start = threading.Barrier(4)
    holding = threading.Barrier(4)

    def worker() -> None:
        start.wait()
        held = pool.get_connection()  # 4 connections at once: 4 handshakes
        holding.wait()
        pool.release(held)
        for _ in range(5):
            counter.client.get(f"{ns}:k")

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert counter.count == 20
    counter.client.close()


def test_query_counter_entered_twice_keeps_counting_until_the_outer_exit(pg_engine) -> None:
    from sqlalchemy import text

    def select(value: int) -> None:
        with pg_engine.connect() as conn:
            conn.execute(text("SELECT :v"), {"v": value})

    counter = QueryCounter(pg_engine)
    with counter:
        select(1)
        with counter:  # re-entered: the inner exit once removed the only listener
            select(2)
        select(3)
    select(4)  # after the outer exit: not counted
    assert counter.count == 3
    # and from two threads at once: each exit ends only its own entry
    counter = QueryCounter(pg_engine)
    entered, leave = threading.Barrier(2), threading.Event()

    def inner() -> None:
        with counter:
            entered.wait()
            leave.wait(10)

    thread = threading.Thread(target=inner)
    thread.start()
    with counter:
        entered.wait()
        leave.set()
        thread.join()
        select(5)  # the thread's exit came first
    assert counter.count == 1
