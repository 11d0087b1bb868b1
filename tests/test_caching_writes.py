"""Write-through and write-behind against real PostgreSQL, with a real worker process killed."""

from __future__ import annotations

import json
import time

import pytest

from course_lib.caching import UserStore, WriteBehind, WriteThrough, seed_users
from course_lib.caching.demos import count_lost, write_behind_crash
from course_lib.caching.write_behind import entry_version
from course_lib.measure import run_threads
from course_lib.services import EmbeddedRedis


@pytest.fixture
def store(pg_engine):
    seed_users(pg_engine, 300, seed=1)
    return UserStore(pg_engine)


def test_seed_is_deterministic(pg_engine, store):
    first = [store.load(k) for k in (1, 150, 300)]
    seed_users(pg_engine, 300, seed=1)
    assert [store.load(k) for k in (1, 150, 300)] == first
    assert store.load(301) is None


def test_store_rejects_unknown_columns(store):
    with pytest.raises(ValueError, match="unknown columns"):
        store.save(1, {"is_admin": True})
    with pytest.raises(TypeError):
        store.save(1, ["plan", "pro"])  # type: ignore[arg-type]


def test_versioned_save_is_idempotent_and_ordered(store):
    assert store.save(5, {"score": 10, "version": 100})["score"] == 10
    assert store.save(5, {"score": 10, "version": 100}) is None  # replay: no change
    assert store.save(5, {"score": 9, "version": 99}) is None  # older: refused
    assert store.load(5)["score"] == 10


def test_write_through_caches_whole_committed_row(redis, ns, store):
    wt = WriteThrough(redis, store, ttl=60, namespace=ns)
    row = wt.write(4, {"plan": "team"})
    cached = json.loads(redis.get(wt.key(4)))
    assert cached == row == store.load(4)
    assert set(cached) == {"id", "name", "email", "plan", "score", "version"}


def test_write_through_validation(redis, store):
    with pytest.raises(ValueError, match="ttl"):
        WriteThrough(redis, store, ttl=0, namespace="x")
    with pytest.raises(ValueError, match="namespace"):
        WriteThrough(redis, store, ttl=1, namespace="")
    with pytest.raises(TypeError, match="store"):
        WriteThrough(redis, object(), ttl=1, namespace="x")  # type: ignore[arg-type]


@pytest.mark.timeout(60)
def test_write_through_concurrent_writers_leave_newest_row(redis, ns, store):
    wt = WriteThrough(redis, store, ttl=60, namespace=ns)
    run_threads(lambda w, i: wt.write(9, {"score": w * 100 + i}), 8, calls=10, pass_worker=True)
    cached = json.loads(redis.get(wt.key(9)))
    assert cached == store.load(9)
    assert cached["version"] == 80


def test_write_behind_validation(redis, ns, store):
    with pytest.raises(ValueError, match="stream"):
        WriteBehind(redis, store, stream="", group="g")
    with pytest.raises(ValueError, match="group"):
        WriteBehind(redis, store, stream=f"{ns}:s", group=" ")
    with pytest.raises(ValueError, match="batch"):
        WriteBehind(redis, store, stream=f"{ns}:s", group="g", batch=0)


def test_entry_version_orders_stream_ids():
    assert entry_version("5-1") < entry_version("5-2") < entry_version("6-0")


def test_write_behind_coalesces_and_acks_after_commit(redis, ns, store):
    wb = WriteBehind(redis, store, stream=f"{ns}:wb", group="db", batch=100)
    for score in range(10):
        wb.write(7, {"score": score})
    wb.write(8, {"score": 1})
    assert wb.read(7) == {"score": 9}  # the cache answers before the database has it
    assert store.load(7)["score"] != 9
    assert wb.backlog() == 11
    result = wb.process("c1")
    assert (result.entries, result.db_writes, result.coalesced) == (11, 2, 9)
    assert store.load(7)["score"] == 9 and store.load(8)["score"] == 1
    assert wb.backlog() == 0
    assert redis.xpending(wb.stream, "db")["pending"] == 0


def test_write_behind_failed_commit_is_not_acked(redis, ns, store):
    wb = WriteBehind(redis, store, stream=f"{ns}:wb", group="db", claim_idle=0.1)
    wb.write(3, {"score": 1, "is_admin": True})  # the store refuses this column
    with pytest.raises(ValueError):
        wb.process("c1")
    assert redis.xpending(wb.stream, "db")["pending"] == 1
    assert wb.backlog() == 1


@pytest.mark.timeout(120)
def test_worker_killed_mid_run_then_restarted_loses_nothing(redis, ns, pg_engine, store):
    wb = WriteBehind(redis, store, stream=f"{ns}:wb", group="db", claim_idle=0.3, batch=50)
    result, lag, events = write_behind_crash(
        wb, pg_engine, updates=1500, keys=40, kill_after=0.3, down_for=0.3, timeout=90
    )
    assert {"killed", "restarted"} <= events.keys()
    assert result.issued == 1500
    assert result.lost == 0 and result.keys_stale == 0
    stats = wb.worker_stats()
    assert stats["entries"] >= 1500  # replays of committed-but-unacked entries are allowed
    assert stats["db_writes"] < 1500  # coalesced
    assert wb.backlog() == 0
    assert lag["lag"].max() > 0
    for key in range(1, 41):
        assert wb.read(key)["score"] == store.load(key)["score"]


@pytest.mark.timeout(60)
def test_worker_stop_finishes_its_batch(redis, ns, store):
    wb = WriteBehind(redis, store, stream=f"{ns}:wb", group="db")
    for key in range(1, 101):
        wb.write(key, {"score": -key})
    worker = wb.start_worker("w1")
    deadline = time.monotonic() + 30
    while wb.backlog() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert worker.stop() == 0
    assert not worker.is_alive()
    plan = [(key, -key) for key in range(1, 101)]
    assert count_lost(store.engine, plan).lost == 0


@pytest.mark.timeout(60)
def test_write_behind_on_embedded_redis(embedded_dir, store):
    """The embedded fallback (Redis 6.2): XAUTOCLAIM and the Lua script work there too."""
    import redis as redis_lib

    client = redis_lib.Redis.from_url(EmbeddedRedis(embedded_dir / "redis").start())
    wb = WriteBehind(client, store, stream="wb", group="db", claim_idle=0.1)
    wb.write(1, {"score": 42})
    client.xreadgroup("db", "dead", {"wb": ">"}, count=10)  # read, never acked: a crash
    time.sleep(0.15)
    result = wb.process("alive")
    assert (result.reclaimed, result.db_writes) == (1, 1)
    assert store.load(1)["score"] == 42
    client.close()
