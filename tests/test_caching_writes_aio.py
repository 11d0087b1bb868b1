"""The asyncio shells of write-through and of the write-behind producer, with real asyncio
tasks on the course's Redis and PostgreSQL; the write-behind entries they queue are applied
by the sync consumer, as a worker process would."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aredis

from course_lib import services
from course_lib.caching import WriteBehindConsumer, WriteBehindMonitor
from course_lib.caching.aio import AsyncWriteBehindProducer, AsyncWriteThrough
from course_lib.caching.core.write_behind import NotReplicated, entry_version
from course_lib.caching.lesson.users import UserStore, seed_users

TASKS = 40  # concurrent tasks
CALLS = 10  # writes per task
KEYS = 8  # rows they share


@pytest.fixture
def store(pg_engine):
    seed_users(pg_engine, 60, seed=1)
    return UserStore(pg_engine)


def _run(scenario: Callable[[aredis.Redis], Awaitable[Any]]) -> Any:
    """Run ``scenario(client)`` on an asyncio client of the course's Redis, then close it."""

    async def main() -> Any:
        client = aredis.Redis.from_url(services.redis_url())
        try:
            return await scenario(client)
        finally:
            await client.aclose()

    return asyncio.run(asyncio.wait_for(main(), 60))


async def many_writes(producer: AsyncWriteBehindProducer) -> list[tuple[str, int, int]]:
    """``TASKS`` tasks, ``CALLS`` writes each, spread over ``KEYS`` rows: ``(entry, key,
    score)`` of every write."""

    async def task(t: int) -> list[tuple[str, int, int]]:
        out = []
        for i in range(CALLS):
            key, score = 1 + (t + i) % KEYS, t * 1000 + i
            out.append((await producer.write(key, {"score": score}), key, score))
        return out

    chunks = await asyncio.gather(*(task(t) for t in range(TASKS)))
    return [write for chunk in chunks for write in chunk]


def latest(writes: list[tuple[str, int, int]]) -> dict[int, tuple[str, int]]:
    """Each key's last write in stream order: ``key -> (entry, score)``."""
    return {key: (e, s) for e, key, s in sorted(writes, key=lambda w: entry_version(w[0]))}


def test_async_producer_with_many_tasks_queues_every_write_and_the_newest_lands(redis, ns, store):
    stream = f"{ns}:wb"

    async def scenario(client: aredis.Redis) -> tuple[list[Any], dict[int, Any]]:
        producer = AsyncWriteBehindProducer(client, store, stream=stream, group="db")
        writes = await many_writes(producer)
        return writes, {key: await producer.read(key) for key in range(1, KEYS + 1)}

    writes, cached = _run(scenario)
    assert len(writes) == len({entry for entry, _, _ in writes}) == TASKS * CALLS
    monitor = WriteBehindMonitor(redis, stream=stream)
    assert monitor.backlog() == TASKS * CALLS
    consumer = WriteBehindConsumer(redis, store, stream=stream, group="db", batch=50)
    assert consumer.drain("c1") == TASKS * CALLS
    stats = monitor.worker_stats()
    assert stats["entries"] == TASKS * CALLS and stats["reclaimed"] == 0
    assert stats["db_writes"] + stats["skipped"] < TASKS * CALLS  # coalesced in batches
    assert monitor.backlog() == 0 and monitor.lag() == 0.0
    for key, (entry, score) in latest(writes).items():
        row = store.load(key)
        assert row["score"] == score == cached[key]["score"]
        assert row["version"] == entry_version(entry)


def test_async_producer_merges_concurrent_first_writes_of_one_row(redis, ns, store):
    """Three tasks change three columns of a row not cached yet: each finds no record,
    reads the row in a thread, and the script merges all three into one whole record."""
    before = store.load(5)

    async def scenario(client: aredis.Redis) -> tuple[dict[str, Any], Any, Any]:
        producer = AsyncWriteBehindProducer(client, store, stream=f"{ns}:wb", group="db")
        changes = ({"name": "Merged"}, {"plan": "pro"}, {"score": 77})
        await asyncio.gather(*(producer.write(5, change) for change in changes))
        return await producer.read(5), await producer.read(6), await producer.read(999)

    merged, stored, absent = _run(scenario)
    expected = {k: v for k, v in before.items() if k != "version"}
    assert merged == {**expected, "name": "Merged", "plan": "pro", "score": 77}
    assert stored == {k: v for k, v in store.load(6).items() if k != "version"}
    assert absent is None
    consumer = WriteBehindConsumer(redis, store, stream=f"{ns}:wb", group="db")
    assert consumer.drain("c1") == 3
    assert {k: v for k, v in store.load(5).items() if k != "version"} == merged


def test_async_producer_with_replicas_refuses_to_confirm_on_a_lone_primary(redis, ns, store):
    if redis.info("replication")["connected_slaves"]:
        pytest.skip("the course's Redis has replicas")

    async def scenario(client: aredis.Redis) -> NotReplicated:
        producer = AsyncWriteBehindProducer(
            client, store, stream=f"{ns}:s", group="g", replicas=1, replica_timeout=0.05
        )
        with pytest.raises(NotReplicated, match="reached 0 of 1 replicas") as refused:
            await producer.write(3, {"plan": "pro"})
        return refused.value

    refused = _run(scenario)
    assert redis.xrange(f"{ns}:s")[0][0].decode() == refused.entry  # queued all the same


def test_async_producer_validation(store):
    client = aredis.Redis()  # not connected: constructors do no I/O
    with pytest.raises(TypeError, match="replicas"):
        AsyncWriteBehindProducer(client, store, stream="s", group="g", replicas="1")
    with pytest.raises(ValueError, match="group"):
        AsyncWriteBehindProducer(client, store, stream="s", group="")
    with pytest.raises(TypeError, match="store"):
        AsyncWriteBehindProducer(client, object(), stream="s", group="g")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ttl"):
        AsyncWriteThrough(client, store, ttl=0.0001, namespace="x")


def test_async_write_through_caches_committed_rows_and_never_goes_back(redis, ns, store):
    async def scenario(client: aredis.Redis) -> dict[str, Any]:
        wt = AsyncWriteThrough(client, store, ttl=60, namespace=ns)
        row = await wt.write(4, {"plan": "team"})
        hit = await wt.read(4)
        missed = await wt.read(5)  # loaded in a thread, cached on the way
        absent = await wt.read(999)
        older = await wt.publish(4, {**row, "version": row["version"] - 1, "plan": "old"})
        return {
            "row": row,
            "hit": hit,
            "missed": missed,
            "absent": absent,
            "older": older,
            "stats": wt.stats,
        }

    seen = _run(scenario)
    assert seen["row"] == seen["hit"] == store.load(4) and seen["row"]["plan"] == "team"
    assert seen["missed"] == store.load(5) == json.loads(redis.get(f"{ns}:{{5}}"))
    assert seen["absent"] is None and seen["older"] is False
    assert seen["stats"] == {
        "writes": 1,
        "hits": 1,
        "misses": 2,
        "cache_sets": 2,
        "stale_sets_rejected": 1,
        "redis_errors": 0,
    }


@pytest.mark.timeout(60)
def test_async_write_through_concurrent_tasks_leave_the_newest_row(redis, ns, store):
    async def scenario(client: aredis.Redis) -> dict[str, int]:
        wt = AsyncWriteThrough(client, store, ttl=60, namespace=ns)

        async def writer(t: int) -> None:
            for i in range(CALLS):
                await wt.write(9, {"score": t * 100 + i})

        await asyncio.gather(*(writer(t) for t in range(8)))
        return wt.stats

    stats = _run(scenario)
    cached = json.loads(redis.get(f"{ns}:{{9}}"))
    assert cached == store.load(9) and cached["version"] == 8 * CALLS
    assert stats["writes"] == 8 * CALLS
    assert stats["cache_sets"] + stats["stale_sets_rejected"] == 8 * CALLS


def test_async_producer_raises_when_the_stream_name_is_held_by_another_type(redis, ns, store):
    redis.set(f"{ns}:taken", "a string")

    async def scenario(client: aredis.Redis) -> None:
        producer = AsyncWriteBehindProducer(client, store, stream=f"{ns}:taken", group="g")
        with pytest.raises(aredis.ResponseError, match="WRONGTYPE"):
            await producer.write(1, {"score": 1})

    _run(scenario)
