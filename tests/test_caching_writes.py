"""Write-through and write-behind against real PostgreSQL, with a real worker process killed."""

from __future__ import annotations

import json
import logging
import threading
import time

import pytest
from ordering import until
from redis import Redis
from sqlalchemy import create_engine

from course_lib.caching import WriteBehind, WriteThrough
from course_lib.caching.lesson.demos import count_lost, write_behind_crash
from course_lib.caching.lesson.users import UserStore, seed_users
from course_lib.caching.write_behind import NotReplicated, entry_version
from course_lib.measure import run_threads
from course_lib.services import EmbeddedPostgres, EmbeddedRedis

COLUMNS = ("id", "name", "email", "plan", "score")


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
    with pytest.raises(ValueError, match="replicas"):
        WriteBehind(redis, store, stream=f"{ns}:s", group="g", replicas=-1)
    with pytest.raises(ValueError, match="replica_timeout"):
        WriteBehind(redis, store, stream=f"{ns}:s", group="g", replicas=1, replica_timeout=0)
    # Braces would replace the hash tag that keeps one stream's keys in one cluster slot.
    with pytest.raises(ValueError, match="stream"):
        WriteBehind(redis, store, stream=f"{ns}:{{s}}", group="g")
    with pytest.raises(ValueError, match="namespace"):
        WriteBehind(redis, store, stream=f"{ns}:s", group="g", namespace="u{")
    with pytest.raises(ValueError, match="namespace"):
        WriteThrough(redis, store, ttl=1, namespace="user}")


def test_write_behind_with_replicas_refuses_to_confirm_on_a_lone_primary(any_redis, ns, store):
    redis = any_redis  # the plain Redis, then a cluster of primaries without replicas
    if isinstance(redis, Redis) and redis.info("replication")["connected_slaves"]:
        pytest.skip("the course's Redis has replicas")
    wb = WriteBehind(redis, store, stream=f"{ns}:s", group="g", replicas=1, replica_timeout=0.05)
    with pytest.raises(NotReplicated, match="reached 0 of 1 replicas") as refused:
        wb.write(3, {"plan": "pro"})
    # Queued all the same (the primary ran the script): only its durability is unknown.
    assert redis.xrange(wb.stream)[0][0].decode() == refused.value.entry


def test_entry_version_orders_stream_ids():
    assert entry_version("5-1") < entry_version("5-2") < entry_version("6-0")


def test_write_behind_coalesces_and_acks_after_commit(redis, ns, store):
    wb = WriteBehind(redis, store, stream=f"{ns}:wb", group="db", batch=100)
    for score in range(10):
        wb.write(7, {"score": score})
    wb.write(8, {"score": 1})
    row = {k: v for k, v in store.load(7).items() if k != "version"}
    assert wb.read(7) == {**row, "score": 9}  # the cache answers before the database has it
    assert store.load(7)["score"] != 9
    assert wb.backlog() == 11
    result = wb.process("c1")
    assert (result.entries, result.db_writes, result.coalesced) == (11, 2, 9)
    assert store.load(7)["score"] == 9 and store.load(8)["score"] == 1
    assert wb.backlog() == 0
    assert redis.xpending(wb.stream, "db")["pending"] == 0


def test_write_behind_merges_partial_writes_of_one_row(redis, ns, store):
    """Two writes of different columns of one row: both land, and the cache holds the row."""
    wb = WriteBehind(redis, store, stream=f"{ns}:wb", group="db")
    before = store.load(7)
    wb.write(7, {"name": "Renamed"})
    wb.write(7, {"score": 999})
    expected = {**{k: before[k] for k in COLUMNS}, "name": "Renamed", "score": 999}
    assert wb.read(7) == expected  # the whole row, not just the last write's fields
    result = wb.process("c1")
    assert (result.entries, result.db_writes, result.coalesced) == (2, 1, 1)
    after = store.load(7)
    assert {k: after[k] for k in COLUMNS} == expected
    assert wb.read(7) == expected


def test_write_behind_record_keeps_no_ttl_until_its_write_landed(any_redis, ns, store):
    redis = any_redis
    wb = WriteBehind(redis, store, stream=f"{ns}:wb", group="db", ttl=60)
    wb.write(2, {"score": 5})
    assert redis.pttl(wb.key(2)) == -1  # cannot expire while the database lacks the write
    wb.process("c1")
    assert 55_000 < redis.pttl(wb.key(2)) <= 60_000


def test_write_behind_rejects_unknown_columns_at_write(redis, ns, store):
    wb = WriteBehind(redis, store, stream=f"{ns}:wb", group="db")
    with pytest.raises(ValueError, match="is_admin"):
        wb.write(3, {"score": 1, "is_admin": True})
    with pytest.raises(ValueError, match="at least one column"):
        wb.write(3, {})
    with pytest.raises(TypeError, match="mapping"):
        wb.write(3, ["score", 1])  # type: ignore[arg-type]
    assert wb.backlog() == 0 and redis.exists(wb.key(3)) == 0


def _bad_entry(redis, wb, key):
    """An entry the store refuses (a text score), added behind write()'s checks."""
    return redis.xadd(wb.stream, {"key": str(key), "c:score": json.dumps("not a number")})


def test_refused_entry_stays_pending_then_goes_to_dead_letter(any_redis, ns, store):
    redis = any_redis
    wb = WriteBehind(redis, store, stream=f"{ns}:wb", group="db", claim_idle=0.05, max_deliveries=3)
    bad = _bad_entry(redis, wb, 3)
    wb.write(4, {"score": 4444})
    first = wb.process("c1")
    assert (first.entries, first.db_writes, first.failed, first.dead_lettered) == (2, 1, 1, 0)
    assert store.load(4)["score"] == 4444  # the good entry was not held back
    assert redis.xpending(wb.stream, "db")["pending"] == 1
    results = []
    for _ in range(2):
        time.sleep(0.1)
        results.append(wb.process("c1"))
    assert [(r.failed, r.dead_lettered) for r in results] == [(1, 0), (0, 1)]
    assert wb.backlog() == 0 and redis.xpending(wb.stream, "db")["pending"] == 0
    [(_, dead)] = redis.xrange(wb.dead_letter)
    assert dead[b"entry"] == bad and dead[b"deliveries"] == b"3"
    assert b"score must be an integer" in dead[b"error"]  # refused by the store's check
    assert wb.worker_stats()["dead_lettered"] == 1


@pytest.mark.timeout(60)
def test_worker_outlives_a_refused_entry(redis, ns, store, caplog):
    """The worker of the review: one refused entry used to end it (exit code 1)."""
    wb = WriteBehind(redis, store, stream=f"{ns}:wb", group="db", claim_idle=0.05, max_deliveries=2)
    _bad_entry(redis, wb, 3)
    stop = threading.Event()
    with caplog.at_level(logging.WARNING, logger="course_lib.caching"):
        worker = threading.Thread(target=wb.run, args=("w1", stop), kwargs={"block": 0.02})
        worker.start()
        wb.write(4, {"score": 4444})
        deadline = time.monotonic() + 20
        while (wb.backlog() or store.load(4)["score"] != 4444) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert worker.is_alive()
        stop.set()
        worker.join(10)
    assert store.load(4)["score"] == 4444
    assert wb.backlog() == 0 and redis.xlen(wb.dead_letter) == 1
    assert any("dead-lettered" in r.message for r in caplog.records)


@pytest.mark.timeout(120)
def test_worker_survives_postgres_restart(redis, ns, embedded_dir, caplog):
    """PostgreSQL goes away under a running worker: it backs off, and every write lands
    after PostgreSQL is back."""
    postgres = EmbeddedPostgres(embedded_dir / "postgres")
    engine = create_engine(postgres.start(), pool_pre_ping=True)
    try:
        seed_users(engine, 20)
        store = UserStore(engine)
        wb = WriteBehind(redis, store, stream=f"{ns}:wb", group="db", claim_idle=0.2)
        for key in range(1, 12):  # cached: later writes need no read of the database
            wb.write(key, {"score": 1})
        stop = threading.Event()
        with caplog.at_level(logging.WARNING, logger="course_lib.caching"):
            worker = threading.Thread(target=wb.run, args=("w1", stop), kwargs={"block": 0.02})
            worker.start()
            deadline = time.monotonic() + 20
            while wb.backlog() and time.monotonic() < deadline:
                time.sleep(0.02)
            assert [store.load(k)["score"] for k in range(1, 12)] == [1] * 11
            postgres.stop()
            for key in range(2, 12):
                wb.write(key, {"score": key * 100})
            # the worker fails against the stopped database and says it retries
            until(
                lambda: any("retrying" in r.message for r in caplog.records),
                "the worker failed against the stopped database",
            )
            assert worker.is_alive() and wb.backlog() == 10
            postgres.start()
            deadline = time.monotonic() + 30
            while wb.backlog() and time.monotonic() < deadline:
                time.sleep(0.05)
            stop.set()
            worker.join(10)
        assert not worker.is_alive() and wb.backlog() == 0
        assert [store.load(k)["score"] for k in range(2, 12)] == [k * 100 for k in range(2, 12)]
        messages = [r.message for r in caplog.records]
        assert sum("retrying" in m for m in messages) >= 1
        assert any("writing again" in m for m in messages)
    finally:
        engine.dispose()


def test_write_through_after_write_behind_versions_above_2_53(redis, ns, store):
    """Write-behind versions (~2^60) must not freeze write-through: Lua doubles would."""
    wb = WriteBehind(redis, store, stream=f"{ns}:wb", group="db")
    wb.write(8, {"plan": "pro"})
    wb.process("c1")
    assert store.load(8)["version"] > 2**53
    wt = WriteThrough(redis, store, ttl=60, namespace=f"{ns}:wt")
    for plan in ("team", "enterprise", "free"):
        wt.write(8, {"plan": plan})
        assert wt.read(8)["plan"] == plan == store.load(8)["plan"]
    assert wt.stats["stale_sets_rejected"] == 0


@pytest.mark.timeout(120)
def test_worker_killed_mid_run_then_restarted_loses_nothing(redis, ns, pg_engine, store):
    wb = WriteBehind(redis, store, stream=f"{ns}:wb", group="db", claim_idle=0.3, batch=50)
    result, lag, events = write_behind_crash(
        wb, pg_engine, updates=1500, keys=40, kill_after=0.1, down_for=0.3, timeout=90
    )
    assert {"killed", "restarted"} <= events.keys()
    assert result.issued == 1500
    assert result.lost == 0 and result.keys_stale == 0
    stats = wb.worker_stats()
    assert stats["reclaimed"] > 0  # killed holding entries: the new worker took them over
    assert stats["entries"] == 1500  # each acknowledged once (the dead worker acked none)
    assert stats["db_writes"] < 1500  # coalesced
    assert wb.backlog() == 0
    assert lag["lag"].max() > 0
    for key in range(1, 41):
        row = store.load(key)
        assert wb.read(key) == {k: row[k] for k in COLUMNS}


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
    # An entry deleted from the stream while pending on a dead consumer: 6.2's XAUTOCLAIM
    # returns it without its id; it must be acknowledged, not crash the worker.
    gone = wb.write(2, {"score": 7})
    client.xreadgroup("db", "dead", {"wb": ">"}, count=10)
    client.xdel("wb", gone)
    time.sleep(0.15)
    assert wb.process("alive").entries == 0
    assert client.xpending("wb", "db")["pending"] == 0
    wb.write(3, {"score": 9})
    assert wb.process("alive").db_writes == 1 and store.load(3)["score"] == 9
    client.close()


@pytest.mark.parametrize("base", [10**19, 10**20, 2**64, 10**40])
def test_write_through_compares_versions_of_any_length_exactly(redis, ns, pg_engine, base):
    wt = WriteThrough(redis, UserStore(pg_engine), ttl=60, namespace=ns)
    assert wt.publish(1, {"id": 1, "version": base - 1})
    assert wt.publish(1, {"id": 1, "version": base})  # one more digit, or the same length
    assert not wt.publish(1, {"id": 1, "version": base - 1})
    assert not wt.publish(1, {"id": 1, "version": 9})
    assert wt.publish(1, {"id": 1, "version": base + 1})
    assert redis.get(wt.version_key(1)) == str(base + 1).encode()


def test_write_behind_refuses_a_value_the_column_cannot_hold_and_keeps_other_writes(
    redis, ns, pg_engine
):
    seed_users(pg_engine, 3, seed=1)
    store = UserStore(pg_engine)
    wb = WriteBehind(redis, store, stream=f"{ns}:wb", group="db")
    for bad, error, message in (
        ({"score": 2**40}, ValueError, "score must be in"),
        ({"score": "7"}, TypeError, "score must be an integer"),
        ({"name": None}, ValueError, "name must not be None"),
        ({"plan": 3}, TypeError, "plan must be a string"),
    ):
        with pytest.raises(error, match=message):
            wb.write(2, bad)
    wb.write(2, {"name": "Valid"})
    result = wb.process("c1")
    assert result.db_writes == 1 and result.dead_lettered == 0
    assert store.load(2)["name"] == "Valid"
    assert redis.xlen(wb.dead_letter) == 0
