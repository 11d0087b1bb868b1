"""Guarantees of the caching docstrings that an adversarial review broke, each reproduced
against the real Redis (issue: reliability)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import redis.asyncio as aredis
from ordering import async_until, flight_waiters, until

from course_lib import services
from course_lib.caching import AsyncCacheAside, CacheAside
from course_lib.caching.single_flight import AsyncSingleFlight, FlightTimeout, SingleFlight
from course_lib.measure import run_threads


def test_a_load_older_than_the_invalidation_memory_is_not_cached(redis, ns) -> None:
    # The invalidation record expires; a counter-based generation would then restart and
    # hand the late reader a matching ticket (ABA). A time-based ticket never matches, and a
    # load that outlived the record is refused outright.
    # remembered 0.3 s so the test does not wait 60 s
    cache = CacheAside(redis, lambda key: "v1", ttl=60, namespace=ns, invalidation_ttl=0.3)
    ticket = cache.reserve("k")  # the reader starts loading v1
    assert cache.invalidate("k") == 0  # the writer commits v2 and invalidates
    time.sleep(0.4)  # the record is gone
    assert redis.get(cache.core.invalidation_key("k")) is None
    cache.invalidate("k")  # a later invalidation must not revive the old ticket either
    assert cache.fill(ticket, "v1") is False
    redis.delete(cache.core.invalidation_key("k"))
    time.sleep(0.35)
    assert cache.fill(ticket, "v1") is False  # no record, but the load is older than memory
    assert redis.get(cache.key("k")) is None
    assert cache.stats["stale_fills_rejected"] == 2
    fresh = cache.reserve("k")
    assert cache.fill(fresh, "v2") is True


def test_a_load_that_began_after_the_invalidation_is_cached(redis, ns) -> None:
    cache = CacheAside(redis, lambda key: "v", ttl=60, namespace=ns)
    cache.invalidate("k")
    ticket = cache.reserve("k")
    assert cache.fill(ticket, "v") is True
    assert cache.get("k") == "v"


@pytest.mark.parametrize("reader_mode", [None, "local", "lock"])
def test_a_plain_cache_never_returns_an_xfetch_envelope(redis, ns, reader_mode) -> None:
    xfetch = CacheAside(redis, lambda key: {"name": "ada"}, ttl=60, namespace=ns, stampede="xfetch")
    plain = CacheAside(
        redis, lambda key: {"name": "plain"}, ttl=60, namespace=ns, stampede=reader_mode
    )
    assert xfetch.get(1) == {"name": "ada"}
    assert plain.get(1) == {"name": "plain"}
    assert plain.stats["decode_errors"] == 1
    # and the other way round: a plain value shaped like an envelope is not one
    redis.set(plain.key(2), b'{"v": 1, "d": 0.1, "x": 99999999999}')
    assert xfetch.get(2) == {"name": "ada"}
    assert xfetch.stats["decode_errors"] == 1


def test_python_equal_keys_do_not_share_a_load(redis, ns) -> None:
    started, true_loaded = threading.Event(), threading.Event()

    def loader(key: object) -> str:
        if key is True:
            true_loaded.set()
        else:  # key 1's load lasts until True's load ran: were they shared, it never would
            started.set()
            true_loaded.wait(10)
        return f"value of {key!r}"

    cache = CacheAside(redis, loader, ttl=60, namespace=ns, stampede="local")
    out: dict[str, object] = {}
    first = threading.Thread(target=lambda: out.__setitem__("1", cache.get(1)))
    first.start()
    assert started.wait(10)
    out["True"] = cache.get(True)
    first.join()
    assert out == {"1": "value of 1", "True": "value of True"}
    assert redis.get(cache.key(True)) == b'"value of True"'


@pytest.mark.parametrize("mode", ["local", "lock"])
def test_same_process_waiters_load_themselves_after_their_wait(redis, ns, mode) -> None:
    calls: list[float] = []
    lock = threading.Lock()

    def slow(key: object) -> str:
        with lock:
            calls.append(time.monotonic())
            first = len(calls) == 1
        # The first load outlasts the waiters' wait: it ends only once one of them gave up
        # and loaded itself (a state polled for, not a sleep long enough "usually").
        deadline = time.monotonic() + 20
        while first and len(calls) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        return "v"

    cache = CacheAside(
        redis, slow, ttl=60, namespace=ns, stampede=mode, wait_timeout=0.3, lock_ttl=0.3
    )
    result = run_threads(lambda: cache.get("k"), 4, timeout=30)
    assert result.errors == []
    assert result.values == ["v"] * 4
    assert len(calls) >= 2  # waiters gave up on the slow leader and loaded themselves
    assert cache.stats["lock_timeouts"] >= 1


@pytest.mark.one_pass
def test_thread_flight_timeout_is_not_the_leaders_timeout_error() -> None:
    flight: SingleFlight[str] = SingleFlight(timeout=5)
    gate = threading.Event()

    def leader() -> str:
        gate.wait(5)
        raise TimeoutError("the loader's own timeout")

    errors: list[BaseException] = []

    def follower() -> None:
        try:
            flight.do("k", lambda: "never")
        except BaseException as exc:
            errors.append(exc)

    lead = threading.Thread(target=lambda: errors.append(_catch(lambda: flight.do("k", leader))))
    lead.start()
    while flight.in_flight() == 0:
        time.sleep(0.001)
    follow = threading.Thread(target=follower)
    follow.start()
    until(lambda: flight_waiters(flight, "k") == 1, "the follower waits for the leader")
    gate.set()
    lead.join()
    follow.join()
    assert all(type(e) is TimeoutError for e in errors) and len(errors) == 2
    assert not any(isinstance(e, FlightTimeout) for e in errors)


def _catch(fn):  # type: ignore[no-untyped-def]
    try:
        fn()
    except BaseException as exc:
        return exc
    return None


@pytest.mark.one_pass
def test_async_waiters_take_over_when_the_leader_is_cancelled() -> None:
    async def scenario() -> tuple[list[object], int]:
        flight: AsyncSingleFlight[str] = AsyncSingleFlight(timeout=5)
        runs = 0
        leading = asyncio.Event()
        joined = 0

        async def work() -> str:
            nonlocal runs
            runs += 1
            if runs == 1:  # the leader's run: it lasts until it is cancelled
                leading.set()
                await asyncio.Event().wait()
            # The take-over run yields once: the other waiters, woken by the cancellation in
            # the same loop iteration, run first and join its flight (asyncio runs ready
            # tasks in order; no wall-clock time is involved).
            await asyncio.sleep(0)
            return "v"

        async def join() -> str:
            nonlocal joined
            joined += 1  # do() registers a waiter before its first await
            return await flight.do("k", work)

        leader = asyncio.create_task(flight.do("k", work))
        await asyncio.wait_for(leading.wait(), 10)
        waiters = [asyncio.create_task(join()) for _ in range(5)]
        await async_until(lambda: joined == 5, "the 5 waiters joined the flight")
        leader.cancel()
        results = await asyncio.gather(*waiters, return_exceptions=True)
        assert leader.cancelled()
        return results, runs

    results, runs = asyncio.run(scenario())
    assert results == ["v"] * 5
    assert runs == 2  # the cancelled leader's run, then one waiter's


@pytest.mark.parametrize("mode", ["local", "lock"])
def test_async_cache_survives_a_cancelled_leading_request(ns, mode) -> None:
    async def scenario() -> tuple[list[object], dict[str, int]]:
        client = aredis.Redis.from_url(services.redis_url())
        loads = 0
        loading = asyncio.Event()

        async def loader(key: object) -> str:
            nonlocal loads
            loads += 1
            if loads == 1:  # the leader's load: it lasts until the leader is cancelled
                loading.set()
                await asyncio.Event().wait()
            return "v"

        cache = AsyncCacheAside(client, loader, ttl=60, namespace=ns, stampede=mode)
        try:
            leader = asyncio.create_task(cache.get("k"))
            await asyncio.wait_for(loading.wait(), 10)  # the leader is inside its load
            waiters = [asyncio.create_task(cache.get("k")) for _ in range(10)]
            # a miss is counted right before the flight is joined, with no await between
            await async_until(lambda: cache.stats["misses"] == 11, "the 10 waiters joined")
            leader.cancel()
            results = await asyncio.gather(*waiters, return_exceptions=True)
            return results, {"loads": loads}
        finally:
            await client.aclose()

    results, counts = asyncio.run(scenario())
    assert results == ["v"] * 10
    assert 2 <= counts["loads"] <= 3  # the cancelled load, the take-over (and, with "lock",
    # at most one more once the cancelled leader's Redis lock is released)
