"""Single-flight, the Redis lock, XFetch and serialisation on their own."""

from __future__ import annotations

import asyncio
import datetime as dt
import random
import threading
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from types import MappingProxyType

import pytest
import redis.asyncio as aredis
import rq
from ordering import flight_waiters, until

from course_lib import services
from course_lib.caching import (
    AsyncRedisLock,
    AsyncSingleFlight,
    CacheAside,
    LockNotAcquired,
    LockNotOwned,
    RedisLock,
    SingleFlight,
    dumps,
    loads,
    to_jsonable,
)
from course_lib.caching.lesson import as_written
from course_lib.caching.lesson.users import User
from course_lib.caching.xfetch import should_refresh
from course_lib.measure import run_threads


@pytest.mark.one_pass
@pytest.mark.timeout(30)
def test_single_flight_shares_result_and_exception():
    flight: SingleFlight = SingleFlight(timeout=5)
    calls = {"n": 0}

    def all_joined() -> None:
        # The call lasts until the 39 other threads wait on it: a polled state, so a busy
        # machine that starts them slowly cannot make one of them lead a second call.
        until(lambda: flight_waiters(flight, "k") == 39, "the 39 others joined the flight")

    def work():
        calls["n"] += 1
        all_joined()
        return "v"

    assert run_threads(lambda: flight.do("k", work), 40, timeout=30).values == ["v"] * 40
    assert calls["n"] == 1

    def broken():
        calls["n"] += 1
        all_joined()
        raise KeyError("gone")

    out = run_threads(lambda: flight.do("k", broken), 40, timeout=30)
    assert len(out.errors) == 40 and calls["n"] == 2
    assert all(error.startswith("KeyError: 'gone'") for error in out.errors), out.errors[:3]
    assert flight.in_flight() == 0
    assert flight.do("k", lambda: "again") == "again"


@pytest.mark.one_pass
@pytest.mark.timeout(10)
def test_single_flight_waiter_timeout():
    flight: SingleFlight = SingleFlight(timeout=0.2)
    started, finish = threading.Event(), threading.Event()

    def slow():
        started.set()
        finish.wait(10)  # the leader's call lasts until the waiter timed out
        return 1

    leader = threading.Thread(target=lambda: flight.do("k", slow))
    leader.start()
    started.wait()
    with pytest.raises(TimeoutError):
        flight.do("k", slow)
    finish.set()
    leader.join()


@pytest.mark.one_pass
@pytest.mark.timeout(10)
def test_async_single_flight_shares_exception_and_recovers():
    async def scenario():
        flight: AsyncSingleFlight = AsyncSingleFlight(timeout=5)
        calls = {"n": 0}

        async def broken():
            calls["n"] += 1
            await asyncio.sleep(0.1)
            raise ValueError("boom")

        results = await asyncio.gather(
            *(flight.do("k", broken) for _ in range(30)), return_exceptions=True
        )

        async def fine():
            calls["n"] += 1
            return 7

        return results, await flight.do("k", fine), calls["n"]

    results, after, calls = asyncio.run(scenario())
    assert all(isinstance(r, ValueError) for r in results)
    assert (after, calls) == (7, 2)


def test_redis_lock_release_is_compare_and_delete(any_redis, ns):
    redis = any_redis
    lock = RedisLock(redis, f"{ns}:lock", ttl=0.2, wait=0)
    assert lock.acquire()
    time.sleep(0.3)  # expired under us; someone else takes it
    other = RedisLock(redis, f"{ns}:lock", ttl=5, wait=0)
    assert other.acquire()
    with pytest.raises(LockNotOwned):
        lock.release()
    with pytest.raises(LockNotOwned):
        lock.extend(token=lock.token or "gone")
    assert redis.get(f"{ns}:lock") == other.token.encode()  # type: ignore[union-attr]
    other.extend(10)
    assert 5000 < redis.pttl(f"{ns}:lock") <= 10000
    other.release()
    assert redis.get(f"{ns}:lock") is None
    with pytest.raises(RuntimeError, match="not acquired"):
        other.release()


def test_redis_lock_shared_by_threads_keeps_one_token_per_acquisition(any_redis, ns):
    redis = any_redis
    # Two threads share one lock object. A's acquisition expires and B takes the lock: A's
    # release must not delete B's lock (it would with one token per object).
    lock = RedisLock(redis, f"{ns}:shared", ttl=0.2, wait=2)
    a_token = lock.acquire()
    assert a_token is not None
    seen: dict[str, object] = {}

    def b() -> None:
        seen["b"] = lock.acquire()  # waits for A's lock to expire, then takes it

    thread = threading.Thread(target=b)
    thread.start()
    thread.join()
    assert seen["b"] not in (None, a_token) and lock.token == a_token
    with pytest.raises(LockNotOwned):
        lock.release()  # A's (this thread's) acquisition, long expired
    assert redis.get(f"{ns}:shared") == str(seen["b"]).encode()
    lock.release(str(seen["b"]))
    assert redis.get(f"{ns}:shared") is None


def test_redis_lock_block_error_wins_over_the_lost_lock(redis, ns):
    with pytest.raises(KeyError) as caught, RedisLock(redis, f"{ns}:lost", ttl=0.05, wait=0):
        time.sleep(0.1)
        raise KeyError("the block's own error")
    assert any("was lost" in note for note in caught.value.__notes__)
    with pytest.raises(LockNotOwned), RedisLock(redis, f"{ns}:lost", ttl=0.05, wait=0):
        time.sleep(0.1)


def test_async_redis_lock_like_the_sync_one(ns):
    async def scenario() -> dict[str, object]:
        client = aredis.Redis.from_url(services.redis_url())
        out: dict[str, object] = {}
        try:
            lock = AsyncRedisLock(client, f"{ns}:alock", ttl=0.2, wait=2)
            mine = await lock.acquire()
            other = asyncio.create_task(lock.acquire())  # another task, same object
            out["other"] = await other
            out["mine_is_different"] = out["other"] not in (None, mine)
            try:
                await lock.release()
            except LockNotOwned:
                out["lost"] = True
            await lock.release(str(out["other"]))
            async with AsyncRedisLock(client, f"{ns}:alock", ttl=5, wait=0) as held:
                await held.extend(10)
                out["pttl"] = await client.pttl(f"{ns}:alock")
            out["after"] = await client.get(f"{ns}:alock")
            blocked = AsyncRedisLock(client, f"{ns}:busy", ttl=5, wait=0.1)
            await client.set(f"{ns}:busy", "someone")
            out["blocked"] = await blocked.acquire()
        finally:
            await client.aclose()
        return out

    out = asyncio.run(scenario())
    assert out["mine_is_different"] and out["lost"]
    assert 5000 < out["pttl"] <= 10000  # type: ignore[operator]
    assert out["after"] is None and out["blocked"] is None


@pytest.mark.timeout(10)
def test_redis_lock_bounded_wait(redis, ns):
    holder = RedisLock(redis, f"{ns}:lock", ttl=5)
    assert holder.acquire()
    start = time.monotonic()
    assert RedisLock(redis, f"{ns}:lock", ttl=5, wait=0.3).acquire() is None
    assert 0.25 < time.monotonic() - start < 2
    holder.release()


def test_redis_lock_counts_mutual_exclusion(redis, ns):
    inside = {"now": 0, "max": 0}
    guard = threading.Lock()

    def critical():
        with RedisLock(redis, f"{ns}:mutex", ttl=5, wait=10):
            with guard:
                inside["now"] += 1
                inside["max"] = max(inside["max"], inside["now"])
            time.sleep(0.005)
            with guard:
                inside["now"] -= 1

    assert run_threads(critical, 20, timeout=20).errors == []
    assert inside["max"] == 1


def test_lock_validation(redis):
    with pytest.raises(ValueError, match="ttl"):
        RedisLock(redis, "x", ttl=0)
    with pytest.raises(ValueError, match="ttl"):
        RedisLock(redis, "x", ttl=0.0004)  # PX 0 would be refused by Redis
    with pytest.raises(ValueError, match="name"):
        RedisLock(redis, "", ttl=1)
    with pytest.raises(TypeError, match="ttl"):
        RedisLock(redis, "x", ttl="5")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="wait"):
        RedisLock(redis, "x", ttl=5, wait=None)  # type: ignore[arg-type]


@pytest.mark.one_pass
def test_single_flight_validation():
    with pytest.raises(TypeError, match="timeout"):
        SingleFlight(timeout="x")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="timeout"):
        AsyncSingleFlight(timeout="x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timeout"):
        SingleFlight(timeout=0)
    assert SingleFlight(timeout=None).timeout is None


@pytest.fixture
def as_written_restored() -> Iterator[None]:
    """Put back the module-level globals ``as_written.bind`` sets, whatever the test did."""
    names = ("cache", "db", "task_queue", "_fetch", "PREFIX")
    saved = {name: vars(as_written)[name] for name in names if name in vars(as_written)}
    yield
    for name in names:
        if name in saved:
            setattr(as_written, name, saved[name])
        elif name in vars(as_written):
            delattr(as_written, name)


def test_seed_bind_keeps_its_rq_queue_unless_given_one(redis, pg_engine, as_written_restored):
    first, second = (rq.Queue(name, connection=redis) for name in ("first", "second"))
    as_written.bind(redis, pg_engine, queue=first)
    as_written.bind(redis, pg_engine)
    assert as_written.task_queue is first
    with as_written.bound(redis, pg_engine, queue=second):
        assert as_written.task_queue is second
    assert as_written.task_queue is first


def test_seed_bound_restores_the_previous_binding(redis, pg_engine, as_written_restored):
    as_written.bind(redis, pg_engine, prefix="outer")
    outer_db = as_written.db
    with as_written.bound(redis, pg_engine, prefix="inner"):
        assert as_written.PREFIX == "inner" and as_written.db is not outer_db
    assert as_written.PREFIX == "outer" and as_written.db is outer_db


@pytest.mark.one_pass
def test_xfetch_probability_grows_near_expiry():
    rng = random.Random(0)
    far = sum(should_refresh(now=0, delta=0.1, expiry=10, rng=rng) for _ in range(1000))
    near = sum(should_refresh(now=9.9, delta=0.1, expiry=10, rng=rng) for _ in range(1000))
    past = sum(should_refresh(now=10, delta=0.1, expiry=10, rng=rng) for _ in range(1000))
    assert far == 0 and 300 < near < 450 and past == 1000  # P = exp(-1) ~ 0.37 one delta early


@pytest.mark.timeout(30)
def test_xfetch_refreshes_before_expiry(redis, ns):
    loads = {"n": 0}

    def loader(key):
        loads["n"] += 1
        time.sleep(0.05)
        return loads["n"]

    cache = CacheAside(
        redis, loader, ttl=0.4, namespace=ns, stampede="xfetch", beta=2.0, rng=random.Random(1)
    )
    cache.get("k")
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        cache.get("k")
    stats = cache.stats
    assert stats["early_refreshes"] >= 2
    assert stats["misses"] == 1  # only the cold start: every expiry was pre-empted


@pytest.mark.one_pass
def test_serialisation_is_json_only():
    value = {
        "when": dt.datetime(2024, 1, 2, 3, 4, 5),
        "price": Decimal("9.90"),
        "id": uuid.UUID(int=1),
    }
    assert to_jsonable(value) == {
        "when": "2024-01-02T03:04:05",
        "price": "9.90",
        "id": "00000000-0000-0000-0000-000000000001",
    }
    assert loads(dumps([1, None, "a"])) == [1, None, "a"]
    with pytest.raises(TypeError, match="set"):
        dumps({1, 2})
    with pytest.raises(ValueError):
        loads(b"\x80\x04K\x01.")  # a pickle is rejected, never executed


def test_with_a_busy_lock_raises_lock_not_acquired(redis, ns):
    redis.set(f"{ns}:busy", "someone")
    busy = RedisLock(redis, f"{ns}:busy", ttl=5, wait=0)
    with pytest.raises(LockNotAcquired, match="still held"), busy:
        pass
    assert busy.token is None and redis.get(f"{ns}:busy") == b"someone"


@pytest.mark.one_pass
def test_orm_objects_and_mappings_are_cached_as_their_columns():
    user = User(id=1, name="Ana", email="ana@example.com", plan="pro", score=3, version=0)
    assert to_jsonable([user, MappingProxyType({"a": 1})]) == [
        {
            "id": 1,
            "name": "Ana",
            "email": "ana@example.com",
            "plan": "pro",
            "score": 3,
            "version": 0,
        },
        {"a": 1},
    ]
