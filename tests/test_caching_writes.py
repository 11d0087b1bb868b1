"""Write-through and write-behind against real PostgreSQL, with a real worker process killed."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time

import pytest
import redis as redis_lib
from ordering import until
from redis import Redis
from sqlalchemy import create_engine

from course_lib.caching import (
    WorkerProcess,
    WriteBehind,
    WriteBehindConsumer,
    WriteBehindMonitor,
    WriteBehindProducer,
    WriteThrough,
)
from course_lib.caching.core.write_behind import NotReplicated, database_unavailable, entry_version
from course_lib.caching.lesson.demos import count_lost, write_behind_crash
from course_lib.caching.lesson.users import UserStore, seed_users
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
    # One set of rules (course_lib.validation): a wrong type is a TypeError.
    with pytest.raises(TypeError, match="batch"):
        WriteBehind(redis, store, stream=f"{ns}:s", group="g", batch="x")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="group"):
        WriteBehindConsumer(redis, store, stream=f"{ns}:s", group=7)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="ttl"):
        WriteThrough(redis, store, ttl="60", namespace="x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="name"):
        WorkerProcess(WriteBehindConsumer(redis, store, stream=f"{ns}:s", group="g"), " ")


def test_write_behind_parts_do_no_io_until_used(store):
    """Each part is built without a round trip (a client to nowhere is fine), and the
    stream and group are declared by the first write or read that needs them."""
    nowhere = redis_lib.Redis(port=1, socket_connect_timeout=0.1)
    WriteBehindProducer(nowhere, store, stream="s", group="g")
    WriteBehindConsumer(nowhere, store, stream="s", group="g")
    WriteBehindMonitor(nowhere, stream="s")
    WriteBehind(nowhere, store, stream="s", group="g")


def test_write_behind_consumer_declares_a_missing_group(redis, ns, store):
    """A worker may start before any write, or outlive its stream: it declares the stream
    and its group itself, from the stream's first entry, and loses nothing."""
    consumer = WriteBehindConsumer(redis, store, stream=f"{ns}:wb", group="db")
    assert consumer.process("c1").entries == 0  # no stream yet: declared, nothing to do
    assert redis.xinfo_groups(f"{ns}:wb")[0]["name"] == b"db"
    producer = WriteBehindProducer(redis, store, stream=f"{ns}:wb", group="db")
    producer.write(3, {"score": 33})
    redis.delete(f"{ns}:wb")  # the stream and its group are gone...
    producer.write(3, {"score": 34})  # ...a producer that declared them writes again
    assert consumer.process("c1").db_writes == 1 and store.load(3)["score"] == 34


def test_write_behind_with_replicas_refuses_to_confirm_on_a_lone_primary(any_redis, ns, store):
    redis = any_redis  # the plain Redis, then a cluster of primaries without replicas
    if isinstance(redis, Redis) and redis.info("replication")["connected_slaves"]:
        pytest.skip("the course's Redis has replicas")
    wb = WriteBehind(redis, store, stream=f"{ns}:s", group="g", replicas=1, replica_timeout=0.05)
    with pytest.raises(NotReplicated, match="reached 0 of 1 replicas") as refused:
        wb.write(3, {"plan": "pro"})
    # Queued all the same (the primary ran the script): only its durability is unknown.
    assert redis.xrange(wb.stream)[0][0].decode() == refused.value.entry


@pytest.mark.one_pass
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
    assert worker.name == "w1" and worker.stop() == 0
    assert not worker.is_alive() and worker.stop() == 0  # stopping again changes nothing
    with pytest.raises(RuntimeError, match="already running"), wb.start_worker("w2") as again:
        again.start()
    assert not again.is_alive()
    plan = [(key, -key) for key in range(1, 101)]
    assert count_lost(store.engine, plan).lost == 0


@pytest.mark.timeout(60)
def test_write_behind_on_embedded_redis(embedded_dir, store):
    """The embedded fallback (Redis 6.2): XAUTOCLAIM and the Lua script work there too."""
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


def test_write_through_reads_through_and_refuses_what_it_cannot_cache(redis, ns, store):
    wt = WriteThrough(redis, store, ttl=60, namespace=ns)
    assert wt.read(5) == store.load(5) == json.loads(redis.get(wt.key(5)))  # cached on the way
    assert wt.read(5) == store.load(5) and wt.read(999) is None
    assert (wt.stats["hits"], wt.stats["misses"], wt.stats["cache_sets"]) == (1, 2, 1)
    with pytest.raises(ValueError, match="version"):
        wt.publish(5, {"id": 5, "score": 1})
    # A versioned write the store skips (it has a newer row) is not cached either.
    with pytest.raises(RuntimeError, match="skipped"):
        wt.write(5, {"score": 1, "version": 0})


def test_a_refused_last_entry_does_not_hold_back_the_earlier_ones_of_its_row(redis, ns, store):
    wb = WriteBehind(redis, store, stream=f"{ns}:wb", group="db")
    wb.write(6, {"score": 60})
    _bad_entry(redis, wb, 6)  # the row's last entry, which the store refuses
    result = wb.process("c1")
    assert (result.entries, result.db_writes, result.failed, result.coalesced) == (2, 1, 1, 0)
    assert store.load(6)["score"] == 60
    assert redis.pttl(wb.key(6)) > 0  # its latest write() landed: the record expires again


def test_a_malformed_entry_is_dead_lettered_and_the_batch_goes_on(redis, ns, store):
    wb = WriteBehind(redis, store, stream=f"{ns}:wb", group="db", max_deliveries=1)
    redis.xadd(wb.stream, {"c:score": "1"})  # no key field
    wb.write(7, {"score": 70})
    result = wb.process("c1")
    assert (result.entries, result.db_writes, result.dead_lettered) == (2, 1, 1)
    [(_, dead)] = redis.xrange(wb.dead_letter)
    assert dead[b"error"].startswith(b"malformed entry: KeyError")
    assert wb.backlog() == 0 and store.load(7)["score"] == 70


def test_drain_waits_for_entries_pending_on_another_consumer_then_gives_up(redis, ns, store):
    wb = WriteBehind(redis, store, stream=f"{ns}:wb", group="db", claim_idle=60)
    wb.write(8, {"score": 80})
    redis.xreadgroup("db", "other", {wb.stream: ">"}, count=1)  # held, not idle long enough
    with pytest.raises(TimeoutError, match="1 writes still queued"):
        wb.drain("c1", timeout=0.2)
    assert wb.claim_idle == 60.0 and wb.backlog() == 1


def test_a_stream_name_held_by_another_type_raises(redis, ns, store):
    """Declaring the group ignores only "it exists already"; any other refusal is raised."""
    redis.set(f"{ns}:taken", "a string")
    with pytest.raises(redis_lib.ResponseError, match="WRONGTYPE"):
        WriteBehindProducer(redis, store, stream=f"{ns}:taken", group="g").write(1, {"score": 1})
    with pytest.raises(redis_lib.ResponseError, match="WRONGTYPE"):
        WriteBehindConsumer(redis, store, stream=f"{ns}:taken", group="g").process("c1")


class MemoryStore:
    """A store with no ``validate``: the producer then checks only the mapping's shape."""

    def __init__(self) -> None:
        self.rows: dict[str, dict] = {}

    def load(self, key):
        return self.rows.get(str(key))

    def save(self, key, value):
        self.rows[str(key)] = dict(value)
        return self.rows[str(key)]


def test_write_behind_with_a_store_that_does_not_validate(redis, ns):
    store = MemoryStore()
    wb = WriteBehind(redis, store, stream=f"{ns}:wb", group="db")
    with pytest.raises(TypeError, match="mapping"):
        wb.write(1, ["score", 1])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="invalid column name"):
        wb.write(1, {"__entry": "1-1"})
    wb.write(1, {"score": 1})
    assert wb.process("c1").db_writes == 1 and store.load(1)["score"] == 1


@pytest.mark.timeout(60)
def test_worker_process_stop_kills_a_worker_that_does_not_exit(redis, ns, store):
    consumer = WriteBehindConsumer(redis, store, stream=f"{ns}:wb", group="db")
    idle = WorkerProcess(consumer, "never-started")
    assert idle.pid is None and idle.stop() is None and idle.kill() is None
    worker = WorkerProcess(consumer, "frozen").start()
    # Its first batch declares the stream: by then it takes SIGTERM as "finish and exit".
    until(lambda: redis.exists(f"{ns}:wb"), "the worker ran its first batch")
    os.kill(worker.pid, signal.SIGSTOP)  # SIGTERM stays pending: it cannot finish in time
    assert worker.stop(timeout=0.2) == -signal.SIGKILL
    assert not worker.is_alive()


@pytest.mark.one_pass
def test_database_unavailable_tells_an_absent_database_from_a_refused_entry():
    """By PEP 249's names, whichever driver or wrapper raised: an absent database is
    retried later, a refused entry is kept pending (then dead-lettered)."""
    import psycopg
    from sqlalchemy import exc as sa

    absent = [
        psycopg.OperationalError("server closed the connection"),
        psycopg.InterfaceError("connection already closed"),
        sa.OperationalError("SELECT 1", {}, Exception()),
        sa.TimeoutError("QueuePool limit reached"),
        sa.DisconnectionError(),
        ConnectionRefusedError(),
    ]
    refused = [
        psycopg.errors.UniqueViolation("duplicate key"),
        sa.IntegrityError("INSERT", {}, Exception()),
        ValueError("score must be an integer"),
    ]
    assert [database_unavailable(e) for e in absent] == [True] * len(absent)
    assert [database_unavailable(e) for e in refused] == [False] * len(refused)
