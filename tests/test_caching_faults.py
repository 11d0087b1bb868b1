"""Redis going away under a running cache: it keeps serving (fail-open) and recovers."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
import redis as redis_lib
import redis.asyncio as aredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff

from course_lib.caching import AsyncCacheAside, CacheAside, WriteThrough
from course_lib.caching.aio import AsyncWriteThrough
from course_lib.caching.lesson.users import UserStore, seed_users
from course_lib.measure import run_threads
from course_lib.services import EmbeddedRedis, fail_fast_redis


def _client(url: str) -> redis_lib.Redis:
    return fail_fast_redis(url, timeout=1)


@pytest.mark.timeout(60)
def test_cache_serves_while_redis_is_stopped_and_resumes(embedded_dir, ns, caplog):
    server = EmbeddedRedis(embedded_dir / "redis")
    client = _client(server.start())
    loads = {"n": 0}

    def loader(key):
        loads["n"] += 1
        return {"key": key}

    cache = CacheAside(client, loader, ttl=60, namespace=ns, retry_after=0.2)
    assert [cache.get(k) for k in (1, 2, 1, 2)] == [{"key": 1}, {"key": 2}] * 2
    assert loads["n"] == 2
    server.stop()
    with caplog.at_level(logging.WARNING, logger="course_lib.caching"):
        during = run_threads(lambda: cache.get(1), 20, calls=5, timeout=30)
    assert during.errors == []
    assert during.values == [{"key": 1}] * 100
    stats = cache.stats
    assert stats["fail_open"] == 100
    assert stats["redis_errors"] >= 1
    assert sum("Redis unreachable" in r.message for r in caplog.records) == 1  # logged once
    server.start()
    time.sleep(0.25)  # past retry_after: the next call tries Redis again
    assert cache.get(1) == {"key": 1}
    assert cache.get(1) == {"key": 1}
    assert cache.stats["hits"] > stats["hits"]
    client.close()


@pytest.mark.timeout(60)
def test_write_through_survives_redis_stop(embedded_dir, pg_engine):
    seed_users(pg_engine, 20)
    server = EmbeddedRedis(embedded_dir / "redis")
    client = _client(server.start())
    wt = WriteThrough(client, UserStore(pg_engine), ttl=60, namespace="wt")
    server.stop()
    row = wt.write(3, {"plan": "pro"})
    assert row["plan"] == "pro" and row["version"] == 1
    assert wt.read(3)["plan"] == "pro"
    assert wt.stats["redis_errors"] == 2
    client.close()


@pytest.mark.timeout(60)
def test_async_write_through_survives_redis_stop(embedded_dir, pg_engine):
    seed_users(pg_engine, 20)
    server = EmbeddedRedis(embedded_dir / "redis")
    url = server.start()

    async def scenario() -> tuple[dict, dict, dict]:
        client = aredis.Redis.from_url(url, retry=AsyncRetry(NoBackoff(), 0), socket_timeout=1)
        wt = AsyncWriteThrough(client, UserStore(pg_engine), ttl=60, namespace="wt")
        server.stop()
        row = await wt.write(3, {"plan": "pro"})
        read = await wt.read(3)
        await client.aclose()
        return row, read, wt.stats

    row, read, stats = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert row["plan"] == read["plan"] == "pro" and row["version"] == 1
    assert stats["redis_errors"] == 2 and stats["writes"] == 1


@pytest.mark.timeout(60)
def test_async_cache_serves_while_redis_is_stopped_and_resumes(embedded_dir, ns, caplog):
    server = EmbeddedRedis(embedded_dir / "redis")
    url = server.start()
    loads = {"n": 0}

    async def loader(key):
        loads["n"] += 1
        await asyncio.sleep(0.01)
        return {"key": key}

    async def scenario():
        client = aredis.Redis.from_url(url, retry=AsyncRetry(NoBackoff(), 0), socket_timeout=1)
        cache = AsyncCacheAside(client, loader, ttl=60, namespace=ns, retry_after=0.2)
        before = [await cache.get(k) for k in (1, 2, 1, 2)]
        server.stop()
        during = await asyncio.gather(*(cache.get(1) for _ in range(50)), return_exceptions=True)
        stats = cache.stats
        server.start()
        await asyncio.sleep(0.25)  # past retry_after
        after = [await cache.get(1) for _ in range(2)]
        await client.aclose()
        return before, during, stats, after, cache.stats

    with caplog.at_level(logging.WARNING, logger="course_lib.caching"):
        before, during, stats, after, final = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert before == [{"key": 1}, {"key": 2}] * 2
    assert during == [{"key": 1}] * 50  # no exception reached a caller
    assert stats["fail_open"] == 50 and stats["redis_errors"] >= 1
    assert sum("Redis unreachable" in r.message for r in caplog.records) == 1
    assert after == [{"key": 1}] * 2
    assert final["hits"] > stats["hits"]
