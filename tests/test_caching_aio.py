"""AsyncCacheAside against a real Redis, with asyncio tasks and exact counts: every path of
the asyncio shell (stampede, waiting on another process's lock, early refresh, invalidation
fencing, failing open) runs here, as the sync shell's do in test_caching_cache_aside.

"Another process" is a second cache object on the same namespace: it shares Redis (the lock,
the values) but not the first one's single-flight, exactly as a second process would.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aredis
from ordering import async_until

from course_lib import services
from course_lib.caching import (
    AsyncCacheAside,
    AsyncRedisLock,
    LoaderError,
    LockNotAcquired,
    XFetch,
)

Scenario = Callable[[aredis.Redis], Awaitable[Any]]


def play(scenario: Scenario) -> Any:
    """Run ``scenario(client)`` on a fresh event loop with its own asyncio client."""

    async def main() -> Any:
        client = aredis.Redis.from_url(services.redis_url())
        try:
            return await asyncio.wait_for(scenario(client), 20)
        finally:
            await client.aclose()

    return asyncio.run(main())


class Loader:
    """A coroutine loader that counts its calls and, when ``gate`` is set, waits for it."""

    def __init__(self, value: Any = "v") -> None:
        self.value = value
        self.calls = 0
        self.started = asyncio.Event()
        self.gate: asyncio.Event | None = None
        self.error: Exception | None = None

    async def __call__(self, key: Any) -> Any:
        self.calls += 1
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.error is not None:
            raise self.error
        return self.value


@pytest.mark.timeout(30)
def test_fifty_tasks_missing_one_key_load_it_once(ns: str) -> None:
    async def scenario(client: aredis.Redis) -> tuple[list[Any], dict[str, int], int]:
        loader = Loader({"id": 1})
        loader.gate = asyncio.Event()
        cache = AsyncCacheAside(client, loader, ttl=60, namespace=ns)
        tasks = [asyncio.create_task(cache.get(1)) for _ in range(50)]
        # a miss is counted right before the flight is joined, with no await between
        await async_until(lambda: cache.stats["misses"] == 50, "the 50 misses")
        loader.gate.set()
        return await asyncio.gather(*tasks), cache.stats, loader.calls

    values, stats, calls = play(scenario)
    assert values == [{"id": 1}] * 50
    assert calls == 1 and (stats["misses"], stats["loads"], stats["hits"]) == (50, 1, 0)


@pytest.mark.timeout(30)
def test_a_task_waits_on_another_process_lock_and_gets_its_value(ns: str) -> None:
    async def scenario(client: aredis.Redis) -> tuple[Any, dict[str, int], int, int]:
        holder_loader, waiter_loader = Loader("from the holder"), Loader("never")
        holder_loader.gate = asyncio.Event()
        holder = AsyncCacheAside(client, holder_loader, ttl=60, namespace=ns)
        waiter = AsyncCacheAside(client, waiter_loader, ttl=60, namespace=ns)
        leading = asyncio.create_task(holder.get("k"))
        await asyncio.wait_for(holder_loader.started.wait(), 10)  # it holds the lock
        waiting = asyncio.create_task(waiter.get("k"))
        await async_until(lambda: waiter.stats["lock_waits"] == 1, "the waiter polls")
        holder_loader.gate.set()
        value = await waiting
        await leading
        return value, waiter.stats, holder_loader.calls, waiter_loader.calls

    value, stats, holder_calls, waiter_calls = play(scenario)
    assert value == "from the holder"
    assert (holder_calls, waiter_calls) == (1, 0)
    assert (stats["lock_waits"], stats["loads"], stats["lock_timeouts"]) == (1, 0, 0)


class Watching(aredis.Redis):
    """A client that says when it has polled (``MGET``) a key another process is loading."""

    polled: asyncio.Event

    async def mget(self, *args: Any, **kwargs: Any) -> Any:
        found = await super().mget(*args, **kwargs)
        self.polled.set()
        return found


@pytest.mark.timeout(30)
def test_the_holders_failure_reaches_the_waiting_process(ns: str) -> None:
    async def scenario(client: aredis.Redis) -> tuple[BaseException, BaseException, Any]:
        failing = Loader()
        failing.gate, failing.error = asyncio.Event(), ConnectionError("database unavailable")
        watching = Watching.from_url(services.redis_url())
        watching.polled = asyncio.Event()
        holder = AsyncCacheAside(client, failing, ttl=60, namespace=ns)
        waiter = AsyncCacheAside(watching, Loader("never"), ttl=60, namespace=ns)
        try:
            leading = asyncio.create_task(holder.get("k"))
            await asyncio.wait_for(failing.started.wait(), 10)  # it holds the lock
            waiting = asyncio.create_task(waiter.get("k"))
            # once it has polled, the waiter knows the holder: it will see its error (a
            # waiter arriving after the failure would load again, as it must)
            await asyncio.wait_for(watching.polled.wait(), 10)
            failing.gate.set()
            own, other = await asyncio.gather(leading, waiting, return_exceptions=True)
            return own, other, await client.get(waiter.mutex("k").name)
        finally:
            await watching.aclose()

    own, other, lock_left = play(scenario)
    assert isinstance(own, ConnectionError)
    assert isinstance(other, LoaderError) and "database unavailable" in str(other)
    assert lock_left is None  # released


@pytest.mark.timeout(30)
def test_a_task_past_wait_timeout_loads_itself(ns: str) -> None:
    async def scenario(client: aredis.Redis) -> tuple[Any, dict[str, int], int]:
        loader = Loader()
        cache = AsyncCacheAside(client, loader, ttl=60, namespace=ns, wait_timeout=0.1)
        await client.set(cache.mutex("k").name, "a slow holder", px=20_000)
        return await cache.get("k"), cache.stats, loader.calls

    value, stats, calls = play(scenario)
    assert value == "v" and calls == 1
    assert (stats["lock_waits"], stats["lock_timeouts"], stats["loads"]) == (1, 1, 1)


@pytest.mark.timeout(30)
def test_a_lock_freed_without_a_value_is_taken_by_a_waiter(ns: str) -> None:
    async def scenario(client: aredis.Redis) -> tuple[Any, dict[str, int], Any]:
        loader = Loader()
        cache = AsyncCacheAside(client, loader, ttl=60, namespace=ns)
        lock = cache.mutex("k").name
        await client.set(lock, "a holder that will give up", px=20_000)
        getting = asyncio.create_task(cache.get("k"))
        await async_until(lambda: cache.stats["lock_waits"] == 1, "the task polls")
        await client.delete(lock)  # released without filling (a refused fill, a crash)
        return await getting, cache.stats, await client.get(cache.key("k"))

    value, stats, cached = play(scenario)
    assert value == "v" and cached == b'"v"'
    assert (stats["loads"], stats["lock_timeouts"]) == (1, 0)


@pytest.mark.timeout(30)
def test_early_refresh_reloads_a_hot_key_once_and_never_fails_a_read(ns: str) -> None:
    class Always(random.Random):
        def random(self) -> float:  # U close to 0: every read volunteers to refresh
            return 1 - 1e-12

    async def scenario(client: aredis.Redis) -> list[Any]:
        loader = Loader("v1")
        mode = XFetch(beta=1e9, rng=Always())
        cache = AsyncCacheAside(client, loader, ttl=60, namespace=ns, stampede=mode)
        seen = [await cache.get("k")]  # the miss
        loader.value = "v2"
        seen.append(await cache.get("k"))  # a hit, refreshed early
        loader.error = ValueError("database unavailable")
        seen.append(await cache.get("k"))  # the refresh fails: the cached value is served
        await client.set(cache.mutex("k").name, "another refresher", px=20_000)
        seen.append(await cache.get("k"))  # someone else is refreshing: served as is
        seen.append((loader.calls, cache.stats))
        return seen

    *values, (calls, stats) = play(scenario)
    assert values == ["v1", "v2", "v2", "v2"]
    assert calls == 3  # the miss, the refresh, the failed refresh
    assert (stats["misses"], stats["hits"], stats["early_refreshes"]) == (1, 3, 2)
    assert stats["load_errors"] == 1


def test_invalidation_fences_a_fill_that_began_before_it(ns: str) -> None:
    async def scenario(client: aredis.Redis) -> tuple[Any, ...]:
        cache = AsyncCacheAside(client, Loader("new"), ttl=60, namespace=ns)
        ticket = await cache.reserve("k")  # a reader starts loading the old row
        nothing_cached = await cache.invalidate("k")  # the writer commits and invalidates
        stale_stored = await cache.fill(ticket, "old")
        fresh = await cache.get("k")
        was_cached = await cache.invalidate("k")
        return nothing_cached, stale_stored, fresh, was_cached, cache.stats

    nothing_cached, stale_stored, fresh, was_cached, stats = play(scenario)
    assert (nothing_cached, stale_stored, fresh, was_cached) == (0, False, "new", 1)
    assert stats["stale_fills_rejected"] == 1


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once it is closed


def test_redis_down_fails_open_flagged_and_skips_redis(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario(_: aredis.Redis) -> tuple[list[Any], dict[str, int], int]:
        down = services.fail_fast_async_redis(f"redis://127.0.0.1:{_closed_port()}", timeout=1)
        loader = Loader("from the database")
        cache = AsyncCacheAside(down, loader, ttl=60, namespace="down", retry_after=30)
        try:
            values = [await cache.get("k")]  # asks Redis, fails open: an outage begins
            loader.gate = asyncio.Event()
            calls = [asyncio.create_task(cache.get("k")) for _ in range(3)]
            # within retry_after Redis is not asked; the three share one load
            await async_until(lambda: cache.stats["fail_open"] == 4, "the 3 failed open")
            loader.gate.set()
            values += await asyncio.gather(*calls)
            return values, cache.stats, loader.calls
        finally:
            await down.aclose()

    with caplog.at_level(logging.WARNING, logger="course_lib.caching"):
        values, stats, calls = play(scenario)
    assert values == ["from the database"] * 4
    assert stats["fail_open"] == 4 and stats["redis_errors"] == 1  # only the first asked
    assert calls == 2  # the first call's load, then one shared by the three
    assert sum("unreachable" in r.message for r in caplog.records) == 1


def test_the_shells_settings_and_a_busy_lock_in_async_with(ns: str) -> None:
    async def scenario(client: aredis.Redis) -> tuple[AsyncCacheAside, Any]:
        cache = AsyncCacheAside(client, Loader(), ttl=30, namespace=ns, stampede="xfetch")
        with pytest.raises(TypeError, match="loader must be callable"):
            AsyncCacheAside(client, "not a loader", ttl=30, namespace=ns)
        busy = AsyncRedisLock(client, cache.mutex("k").name, ttl=5, wait=0)
        await client.set(busy.name, "someone")
        with pytest.raises(LockNotAcquired, match="still held"):
            async with busy:
                pass
        return cache, busy.token

    cache, token = play(scenario)
    assert (cache.namespace, cache.ttl, cache.stampede) == (ns, 30, "xfetch")
    assert isinstance(cache.mode, XFetch) and cache.invalidation_ttl == 60
    assert token is None
