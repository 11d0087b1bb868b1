"""The caches, write paths and locks on a real Redis Cluster, and a failover under load.

The clusters run on 127.0.0.1 (``course_lib.services.cluster.LocalCluster``, through the
``local_cluster`` fixture and ``start_cluster`` of clusters.py). Every ordering is a polled
state (a node's role, a replica's offset, a counter), never a fixed sleep. The clusters are
the tests' own, the same in both passes of ``make test``: one pass runs them.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from clusters import start_cluster
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry

from course_lib.caching import (
    AsyncCacheAside,
    AsyncRedisLock,
    CacheAside,
    RedisLock,
    WriteBehind,
    WriteThrough,
)
from course_lib.caching.aio import AsyncWriteBehindProducer, AsyncWriteThrough
from course_lib.caching.core.write_behind import NotReplicated, entry_version
from course_lib.caching.lesson.cluster import cluster_demo
from course_lib.caching.lesson.demos import write_behind_crash
from course_lib.caching.lesson.users import UserStore, seed_users
from course_lib.measure import run_processes, run_threads
from course_lib.rate_limiting import FixedWindow, aio
from course_lib.services.cluster import LocalCluster

pytestmark = pytest.mark.one_pass


def _ns() -> str:
    return f"c{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="module")
def cluster(local_cluster: LocalCluster) -> Iterator[RedisCluster]:
    client = local_cluster.client()
    yield client
    client.close()


@pytest.fixture
def store(pg_engine: Any) -> UserStore:
    seed_users(pg_engine, 60, seed=1)
    return UserStore(pg_engine)


def _wait_for(condition: Any, timeout: float = 20.0, what: str = "state") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} not reached in {timeout} s"
        time.sleep(0.01)


class Counting:
    def __init__(self, delay: float = 0.0) -> None:
        self.delay, self.calls, self._lock = delay, 0, threading.Lock()

    def __call__(self, key: object) -> object:
        with self._lock:
            self.calls += 1
        time.sleep(self.delay)  # the "database" work the stampede shares
        return {"key": key}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("stampede", [None, "local", "lock", "xfetch"])
def test_cache_aside_values_on_three_primaries(cluster, stampede):
    loader = Counting()
    cache = CacheAside(cluster, loader, ttl=60, namespace=_ns(), stampede=stampede)
    keys = list(range(24))
    assert [cache.get(k) for k in keys] == [{"key": k} for k in keys]
    assert [cache.get(k) for k in keys] == [{"key": k} for k in keys]
    assert loader.calls == 24 and cache.stats["hits"] == 24
    c = cache.core
    for k in keys:  # every key one script touches is in the value's slot
        slots = {cluster.keyslot(n) for n in (c.value_key(k), c.invalidation_key(k), c.lock_key(k))}
        assert len(slots | {cluster.keyslot(c.error_key(k, "t"))}) == 1
    assert len({cluster.get_node_from_key(cache.key(k)).name for k in keys}) == 3
    assert cache.invalidate(3) == 1 and cache.get(3) == {"key": 3} and loader.calls == 25


def test_invalidation_fences_a_stale_fill_on_a_cluster(cluster):
    cache = CacheAside(cluster, Counting(), ttl=60, namespace=_ns())
    ticket = cache.reserve(7)  # a reader read the row...
    assert cache.invalidate(7) == 0  # ...a writer changed it and invalidated...
    assert cache.fill(ticket, {"key": "stale"}) is False  # ...the reader's fill is refused
    assert cluster.get(cache.key(7)) is None and cache.stats["stale_fills_rejected"] == 1
    assert cache.fill(cache.reserve(7), {"key": 7}) is True


@pytest.mark.timeout(60)
def test_one_load_per_stampede_across_threads_and_processes(local_cluster, cluster):
    ns = _ns()
    threaded = Counting(delay=0.2)
    cache = CacheAside(cluster, threaded, ttl=60, namespace=ns)
    calls = run_threads(lambda: cache.get("hot"), 20, timeout=30)
    assert calls.errors == [] and calls.values == [{"key": "hot"}] * 20
    assert threaded.calls == 1
    counter = f"{ns}:loads"
    port = local_cluster.alive()[0]

    def body() -> list:
        client = RedisCluster(host="127.0.0.1", port=port)  # a client must not cross a fork

        def loader(key):
            client.incr(counter)
            time.sleep(0.2)
            return {"key": key}

        other = CacheAside(client, loader, ttl=60, namespace=f"{ns}p")
        return run_threads(lambda: other.get("hot"), 10, timeout=30).values

    results = run_processes(body, 3, timeout=60)
    assert results.errors == []
    assert [v for chunk in results.values for v in chunk] == [{"key": "hot"}] * 30
    assert int(cluster.get(counter)) == 1


@pytest.mark.timeout(30)
def test_async_cache_and_lock_on_a_cluster(local_cluster):
    ns = _ns()
    loads = {"n": 0}

    async def loader(key):
        loads["n"] += 1
        await asyncio.sleep(0.05)
        return {"key": key}

    async def main() -> tuple[list[Any], list[int]]:
        client = AsyncRedisCluster(host="127.0.0.1", port=local_cluster.alive()[0])
        try:
            cache = AsyncCacheAside(client, loader, ttl=60, namespace=ns)
            values = await asyncio.gather(*(cache.get(k % 6) for k in range(60)))
            lock = AsyncRedisLock(client, f"{ns}:lock", ttl=5, wait=5)
            inside, peak = [0], []

            async def critical() -> None:
                async with lock:
                    inside[0] += 1
                    peak.append(inside[0])
                    await asyncio.sleep(0.001)
                    inside[0] -= 1

            await asyncio.gather(*(critical() for _ in range(10)))
            return values, peak
        finally:
            await client.aclose()

    values, peak = asyncio.run(main())
    assert values == [{"key": k % 6} for k in range(60)] and loads["n"] == 6
    assert peak == [1] * 10


@pytest.mark.timeout(30)
def test_redis_lock_excludes_threads_on_a_cluster(cluster):
    lock = RedisLock(cluster, f"{_ns()}:mutex", ttl=5, wait=10)
    inside, peak = [0], []
    guard = threading.Lock()

    def critical() -> None:
        with lock:
            with guard:
                inside[0] += 1
                peak.append(inside[0])
            with guard:
                inside[0] -= 1

    assert run_threads(critical, 8, calls=5).errors == []
    assert peak == [1] * 40


@pytest.mark.timeout(60)
def test_write_through_keeps_the_newest_row_on_a_cluster(cluster, store):
    wt = WriteThrough(cluster, store, ttl=60, namespace=_ns())
    assert cluster.keyslot(wt.key(9)) == cluster.keyslot(wt.version_key(9))
    run_threads(lambda w, i: wt.write(9, {"score": w * 100 + i}), 6, calls=5, pass_worker=True)
    row = store.load(9)
    assert wt.read(9) == row and row["version"] == 30
    older = {**row, "version": row["version"] - 1, "score": -1}
    assert wt.publish(9, older) is False  # a late, older commit does not go backwards
    assert wt.read(9) == row


def _on_async_cluster(cluster: LocalCluster, scenario: Any) -> Any:
    """Run ``scenario(client)`` on an asyncio cluster client of ``cluster``, then close it."""

    async def main() -> Any:
        client = AsyncRedisCluster(host="127.0.0.1", port=cluster.alive()[0])
        try:
            return await scenario(client)
        finally:
            await client.aclose()

    return asyncio.run(asyncio.wait_for(main(), 60))


@pytest.mark.timeout(60)
def test_async_write_through_keeps_the_newest_row_on_a_cluster(local_cluster, cluster, store):
    ns = _ns()

    async def scenario(client: AsyncRedisCluster) -> tuple[Any, Any, bool]:
        wt = AsyncWriteThrough(client, store, ttl=60, namespace=ns)

        async def writer(t: int) -> None:
            for i in range(5):
                await wt.write(9, {"score": t * 100 + i})

        await asyncio.gather(*(writer(t) for t in range(6)))
        row = await wt.read(9)
        older = await wt.publish(9, {**row, "version": row["version"] - 1, "score": -1})
        return row, await wt.read(9), older

    row, again, older = _on_async_cluster(local_cluster, scenario)
    assert row == again == store.load(9) and row["version"] == 30 and older is False
    assert cluster.keyslot(f"{ns}:{{9}}") == cluster.keyslot(f"{ns}#v:{{9}}")


@pytest.mark.timeout(60)
def test_async_write_behind_producer_on_a_cluster(local_cluster, cluster, store):
    """40 tasks queue 200 writes through the asyncio cluster client; the sync consumer
    applies exactly those, the newest of each row last."""
    stream = f"{_ns()}:wb"

    async def scenario(client: AsyncRedisCluster) -> list[tuple[str, int, int]]:
        producer = AsyncWriteBehindProducer(client, store, stream=stream, group="db")

        async def task(t: int) -> list[tuple[str, int, int]]:
            out = []
            for i in range(5):
                key, score = 1 + (t + i) % 6, t * 1000 + i
                out.append((await producer.write(key, {"score": score}), key, score))
            return out

        return [w for chunk in await asyncio.gather(*(task(t) for t in range(40))) for w in chunk]

    writes = _on_async_cluster(local_cluster, scenario)
    assert len({entry for entry, _, _ in writes}) == 200
    wb = WriteBehind(cluster, store, stream=stream, group="db")
    assert wb.backlog() == 200 and wb.drain("c1") == 200
    assert wb.worker_stats()["entries"] == 200 and wb.backlog() == 0
    newest = {key: s for _, key, s in sorted(writes, key=lambda w: entry_version(w[0]))}
    assert {key: store.load(key)["score"] for key in newest} == newest
    assert {key: wb.read(key)["score"] for key in newest} == newest


@pytest.mark.timeout(60)
def test_async_producer_waits_for_replicas_on_the_streams_node(replicated, local_cluster, store):
    """``replicas=1``: WAIT goes to the stream's primary on the script's connection. With a
    replica the write is confirmed; on a cluster without replicas it is refused."""

    async def scenario(client: AsyncRedisCluster) -> tuple[str, Any]:
        stream = f"{_ns()}:wb"
        producer = AsyncWriteBehindProducer(
            client, store, stream=stream, group="db", replicas=1, replica_timeout=0.5
        )
        return stream, await producer.write(3, {"plan": "pro"})

    stream, entry = _on_async_cluster(replicated, scenario)
    with replicated.client() as client:
        assert client.xrange(stream)[0][0].decode() == entry

    async def lone(client: AsyncRedisCluster) -> None:
        producer = AsyncWriteBehindProducer(
            client, store, stream=f"{_ns()}:wb", group="db", replicas=1, replica_timeout=0.05
        )
        with pytest.raises(NotReplicated, match="reached 0 of 1 replicas"):
            await producer.write(3, {"plan": "pro"})

    _on_async_cluster(local_cluster, lone)


@pytest.mark.timeout(90)
def test_write_behind_on_a_cluster_survives_a_killed_worker(cluster, pg_engine, store):
    wb = WriteBehind(cluster, store, stream=f"{_ns()}:wb", group="db", claim_idle=0.3, batch=50)
    keys = [wb.key(k) for k in range(1, 4)] + [wb.stream, wb.dead_letter, wb.stats_key]
    assert len({cluster.keyslot(k) for k in keys}) == 1  # one slot: the script and batch
    result, _, events = write_behind_crash(
        wb, pg_engine, updates=600, keys=20, kill_after=0.05, down_for=0.2, timeout=60
    )
    assert {"killed", "restarted"} <= events.keys()
    assert (result.issued, result.lost, result.keys_stale) == (600, 0, 0)
    assert wb.worker_stats()["reclaimed"] > 0 and wb.backlog() == 0


def test_cluster_demo_spreads_keys_over_the_three_primaries(local_cluster):
    frame = cluster_demo(300, cluster=local_cluster)
    assert len(frame) == 3 and frame["keys"].sum() == 300 and frame["slots"].sum() == 16384
    assert (frame["keys"] > 50).all()  # ~100 each: hashing spreads them
    assert list(frame["primary"]) == [1, 2, 3]
    assert list(frame["slots"]) == [5461, 5462, 5461]  # redis-cli's split, in slot order
    stats = frame.attrs["stats"]
    assert (stats["misses"], stats["hits"], stats["loads"]) == (301, 300, 301)
    with pytest.raises(ValueError, match="keys"):
        cluster_demo(0, cluster=local_cluster)


def test_slots_per_primary_follows_cluster_slots_in_slot_order(local_cluster):
    slots = local_cluster.slots_per_primary()
    assert list(slots.values()) == [5461, 5462, 5461]  # redis-cli's split, lowest slot first
    assert sorted(slots) == sorted(local_cluster.alive())  # every node is a primary here
    assert next(iter(slots)) == local_cluster.port_of("{06S}")  # "06S" hashes to slot 0


# --- Failover: 3 primaries + 3 replicas, one primary SIGKILLed, its replica promoted ------


@pytest.fixture(scope="module")
def replicated() -> Iterator[LocalCluster]:
    # A long node timeout: a busy machine must not fail nodes over by itself (the outage
    # the tests observe would end early); they promote the replica themselves (CLUSTER
    # FAILOVER TAKEOVER) right after the kill.
    with start_cluster(3, 1, node_timeout=15.0) as cluster:
        yield cluster


def _fail_fast(cluster: LocalCluster) -> RedisCluster:
    """A client that gives up on a dead node at once (one retry, no backoff: redis-py's
    default backoff would wait out seconds), as the caches' docstring advises."""
    return cluster.client(socket_timeout=1, socket_connect_timeout=1, retry=Retry(NoBackoff(), 1))


def _on(cluster: LocalCluster, port: int, name: Any) -> str:
    """A name (``name(i)``) whose slot the primary on ``port`` owns."""
    for i in range(10_000):
        if cluster.port_of(name(i)) == port:
            return str(i)
    raise AssertionError(f"no key on {port}")


def _primary_with_replica(cluster: LocalCluster) -> int:
    roles = cluster.roles()
    for port, role in roles.items():
        if role == "master":
            try:
                cluster.replica_of(port)
            except Exception:
                continue
            return port
    raise AssertionError(f"no primary with a live replica: {roles}")


@pytest.mark.timeout(60)
def test_failover_caches_and_limiters_fail_open_then_follow_the_new_primary(
    replicated, record_property
):
    client = _fail_fast(replicated)
    timings: dict[str, float] = {}
    try:
        primary = _primary_with_replica(replicated)
        ns = _ns()
        loader = Counting()
        cache = CacheAside(client, loader, ttl=60, namespace=ns, retry_after=0.1)
        limiter = FixedWindow(client, 3, 3600, prefix=f"{ns}fw")
        key = _on(replicated, primary, cache.key)
        user = _on(replicated, primary, limiter.key)
        assert cache.get(key) == {"key": key} and loader.calls == 1
        before = [limiter.hit(user) for _ in range(2)]
        assert [(d.allowed, d.degraded) for d in before] == [(True, False)] * 2
        _wait_for(lambda: replicated.in_sync(primary), what="replica in sync")

        start = time.monotonic()
        replicated.kill(primary)
        assert cache.get(key) == {"key": key}  # from the loader: failed open, flagged
        timings["first_fail_open_s"] = round(time.monotonic() - start, 3)
        assert cache.stats["fail_open"] >= 1 and loader.calls == 2
        outage = limiter.hit(user)
        assert outage.allowed and outage.degraded  # admitted, marked degraded

        replica = replicated.replica_of(primary)
        timings["limiter_degraded_s"] = round(time.monotonic() - start, 3)
        replicated.promote(replica)
        timings["promoted_s"] = round(time.monotonic() - start, 3)
        _wait_for(lambda: cache.get(key) is not None and cache.stats["hits"] >= 2)
        timings["cache_recovered_s"] = round(time.monotonic() - start, 3)
        loads = loader.calls  # (each call while Redis was skipped loaded, failing open)
        assert cache.get(key) == {"key": key} and loader.calls == loads  # replicated value
        after = [limiter.hit(user) for _ in range(40)]
        recovered = [d for d in after if not d.degraded]
        assert recovered, "the limiter never reached the promoted replica"
        # Exactly the quota over the non-degraded decisions: none lost in the failover.
        admitted = [d for d in before + recovered if d.allowed]
        assert len(admitted) == 3 and not recovered[-1].allowed
        # And the cache writes to the new primary: invalidate, reload, cached there.
        assert cache.invalidate(key) == 1 and cache.get(key) == {"key": key}
        assert replicated.port_of(cache.key(key)) == replica
        # A node that does not own the slot redirects to the promoted replica; the cluster
        # client above followed that map.
        other = next(p for p in replicated.alive() if p != replica)
        with replicated.node(other) as plain, pytest.raises(redis.exceptions.MovedError) as moved:
            plain.get(cache.key(key))
        assert str(moved.value).endswith(f"127.0.0.1:{replica}")  # "MOVED <slot> <node>"
        timings["fail_open"] = cache.stats["fail_open"]
        timings["degraded"] = sum(d.degraded for d in [outage, *after])
        for name, value in timings.items():
            record_property(name, value)
        print(f"failover timings (s after the kill) and counts: {timings}")
    finally:
        client.close()


def _write_until_killed(
    replicated: LocalCluster, wb: WriteBehind, primary: int, *, keys: int, on_cut: Any
) -> tuple[list[tuple[int, int]], int, list[Any]]:
    """Write ``(key, score)`` as fast as possible to keys ``1..keys``. After 200
    acknowledged writes, with the writer held between two writes, cut replication: the
    replica is frozen (SIGSTOP) and the primary drops its link (``CLIENT KILL TYPE replica``;
    what it had sent is in the replica's socket and survives). The writer resumes until 20
    more writes are acknowledged (or 3 refused, with ``replicas``); then the primary is
    SIGKILLed, the replica resumed and promoted, and the writer goes on with keys
    ``keys+1..2*keys`` (so no later write masks a lost one) until 10 writes reach the new
    primary. Returns the writes acknowledged before the kill, in order, the index of the
    first one written after the cut, and what the writes after the promotion got.
    ``on_cut()`` runs at the cut (the caller stops its worker there: a write the worker
    applied to the database before the kill is not lost, whatever replication did)."""
    before: list[tuple[int, int]] = []
    refused: list[NotReplicated] = []
    after: list[Any] = []  # acknowledged writes after the kill, or NotReplicated refusals
    killed, stop, running = threading.Event(), threading.Event(), threading.Event()
    between_writes = threading.Lock()  # held by the writer during each write
    running.set()

    def writer() -> None:
        score = 0
        while not stop.is_set():
            running.wait()
            with between_writes:
                score += 1
                late = killed.is_set()  # a late write starts after the kill
                key = 1 + score % keys + (keys if late else 0)
                try:
                    wb.write(key, {"score": score})
                except NotReplicated as exc:
                    (after if late else refused).append(exc)
                    continue
                except Exception:
                    continue  # not acknowledged: not counted, the caller would retry
                (after if late else before).append((key, score))

    thread = threading.Thread(target=writer)
    thread.start()
    replica = replicated.replica_of(primary)
    try:
        _wait_for(lambda: len(before) >= 200, what="200 writes")
        running.clear()
        with between_writes:  # no write in flight: the cut is exact
            on_cut()
            replicated.pause(replica)
            with replicated.node(primary) as p:
                p.client_kill_filter(_type="replica")
            cut = len(before)
        running.set()
        _wait_for(lambda: len(before) >= cut + 20 or len(refused) >= 3, what="writes after cut")
        running.clear()
        with between_writes:
            replicated.kill(primary)
            killed.set()
        running.set()
        replicated.resume(replica)
        replicated.promote(replica)
        _wait_for(lambda: len(after) >= 10, what="writes after the promotion")
    finally:
        running.set()
        stop.set()
        thread.join()
        replicated.resume(replica)
    return before, cut, after


def _lost(store: UserStore, acked: list[tuple[int, int]]) -> list[int]:
    """Indexes of acknowledged writes whose effect the database lacks: a score above the
    key's final score (scores only grow) never landed."""
    final = {k: store.load(k)["score"] for k in {key for key, _ in acked}}
    return [i for i, (key, score) in enumerate(acked) if score > final[key]]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("replicas", [0, 1])
def test_failover_write_behind_loses_exactly_what_replication_had_not_carried(
    replicated, store, replicas, record_property
):
    client = _fail_fast(replicated)
    try:
        primary = _primary_with_replica(replicated)
        prefix = _ns()
        stream = f"{prefix}:" + _on(replicated, primary, lambda i: f"{prefix}:{i}")
        wb = WriteBehind(
            client,
            store,
            stream=stream,
            group="db",
            claim_idle=0.3,
            replicas=replicas,
            replica_timeout=0.2,
        )
        for key in range(1, 21):
            store.save(key, {"score": 0})
        worker = wb.start_worker("w1")
        try:
            acked, cut, after = _write_until_killed(
                replicated, wb, primary, keys=10, on_cut=worker.stop
            )
        finally:
            worker.stop()
        wb.drain("after", timeout=30)
        lost = _lost(store, acked)
        record_property("acked_before_cut", cut)
        record_property("acked_after_cut", len(acked) - cut)
        record_property("lost", len(lost))
        print(
            f"replicas={replicas}: acknowledged {cut} before the cut, {len(acked) - cut} after;"
            f" lost {len(lost)} (indexes {lost[:1]}..{lost[-1:]})"
        )
        if replicas:
            # WAIT 1: nothing was acknowledged once the replica stopped confirming, and
            # nothing acknowledged was lost.
            assert len(acked) == cut and lost == []
            # ...and the promoted primary, with no replica of its own, cannot confirm more.
            assert after and all(isinstance(a, NotReplicated) for a in after)
        else:
            # Asynchronous replication loses exactly what the replica had not received:
            # every write acknowledged after the cut, and none before.
            assert len(acked) - cut >= 20
            assert lost == list(range(cut, len(acked)))
    finally:
        client.close()


ASYNC_LIMITERS = {
    "fixed_window": lambda r, p: aio.FixedWindow(r, 3, 3600, prefix=p),
    "sliding_window_log": lambda r, p: aio.SlidingWindowLog(r, 3, 3600, prefix=p),
    "sliding_window_counter": lambda r, p: aio.SlidingWindowCounter(r, 3, 3600, prefix=p),
    "token_bucket": lambda r, p: aio.RedisTokenBucket(r, 3, 3 / 3600, prefix=p),
    "gcra": lambda r, p: aio.GCRA(r, 3 / 3600, 3, prefix=p),
}


@pytest.mark.timeout(90)
def test_failover_async_cache_and_limiters_fail_open_then_follow_the_new_primary(
    record_property,
):
    """The asyncio twins through the same failover: a cluster of their own (the module's
    ``replicated`` has one failover per primary, used by the tests above)."""
    loads = {"n": 0}

    async def loader(key):
        loads["n"] += 1
        return {"key": key}

    async def poll(condition: Any, what: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not await condition():
            assert time.monotonic() < deadline, f"{what} not reached in {timeout} s"
            await asyncio.sleep(0.01)

    async def main(local: LocalCluster) -> dict[str, Any]:
        client = AsyncRedisCluster(
            host="127.0.0.1",
            port=local.alive()[0],
            socket_timeout=1,
            socket_connect_timeout=1,
            retry=AsyncRetry(NoBackoff(), 1),
        )
        seen: dict[str, Any] = {}
        try:
            primary = _primary_with_replica(local)
            ns = _ns()
            cache = AsyncCacheAside(client, loader, ttl=60, namespace=ns, retry_after=0.1)
            limiters = {n: make(client, f"{ns}{n}") for n, make in ASYNC_LIMITERS.items()}
            key = _on(local, primary, cache.key)
            users = {n: _on(local, primary, lim.key) for n, lim in limiters.items()}
            assert await cache.get(key) == {"key": key} and loads["n"] == 1
            before = {n: [await lim.hit(users[n]) for _ in range(2)] for n, lim in limiters.items()}
            assert all(
                (d.allowed, d.degraded) == (True, False) for ds in before.values() for d in ds
            )
            _wait_for(lambda: local.in_sync(primary), what="replica in sync")

            local.kill(primary)
            # 20 concurrent readers of the dead primary's key: each answered by the loader
            outage = await asyncio.gather(*(cache.get(key) for _ in range(20)))
            assert outage == [{"key": key}] * 20
            seen["fail_open"] = cache.stats["fail_open"]
            assert seen["fail_open"] >= 1 and cache.stats["hits"] == 0
            with pytest.raises(redis.RedisError):
                await cache.invalidate(key)  # a write that could not invalidate must know it
            during = {n: await lim.hit(users[n]) for n, lim in limiters.items()}
            assert all(d.allowed and d.degraded for d in during.values()), during

            replica = local.replica_of(primary)
            local.promote(replica)

            async def cache_back() -> bool:
                await cache.get(key)
                return cache.stats["hits"] >= 1

            await poll(cache_back, "the cache reading the promoted replica")
            loaded = loads["n"]
            assert await cache.get(key) == {"key": key} and loads["n"] == loaded  # replicated
            after: dict[str, list[Any]] = {}
            for name, lim in limiters.items():
                decisions = after[name] = []

                async def limiter_back(lim: Any = lim, name: str = name) -> bool:
                    after[name].append(await lim.hit(users[name]))
                    return not after[name][-1].degraded

                await poll(limiter_back, f"{name} deciding on the promoted replica")
                decisions += [await lim.hit(users[name]) for _ in range(3)]
                recovered = [d for d in decisions if not d.degraded]
                # Exactly the quota over the non-degraded decisions: the two counted before
                # the kill were replicated, so one more is admitted and then none.
                admitted = [d for d in before[name] + recovered if d.allowed]
                assert len(admitted) == 3 and not recovered[-1].allowed, name
                assert not any(d.degraded for d in decisions[-3:]), name
            # The cache writes to the new primary (redis-py followed MOVED to it).
            assert await cache.invalidate(key) == 1 and await cache.get(key) == {"key": key}
            assert local.port_of(cache.key(key)) == replica
            assert client.get_node_from_key(cache.key(key)).port == replica
            seen["degraded_after_promotion"] = sum(d.degraded for ds in after.values() for d in ds)
            return seen
        finally:
            await client.aclose()

    with start_cluster(3, 1, node_timeout=15.0) as local:
        seen = asyncio.run(main(local))
    for name, value in seen.items():
        record_property(name, value)
    print(f"async failover: {seen}")


def _kill_under_writers(local: LocalCluster, client: RedisCluster, store: UserStore) -> int:
    """8 threads write to one stream as fast as they can, 4 through a plain WriteBehind and 4
    through ``replicas=1``; its primary is SIGKILLed under them and its replica promoted.
    Asserts that no write the replica confirmed is missing; returns how many acknowledged
    plain writes are."""
    primary = _primary_with_replica(local)
    prefix = _ns()
    stream = f"{prefix}:" + _on(local, primary, lambda i: f"{prefix}:{i}")
    plain = WriteBehind(client, store, stream=stream, group="db")
    waited = WriteBehind(client, store, stream=stream, group="db", replicas=1, replica_timeout=1)
    acked: dict[str, list[str]] = {"plain": [], "waited": []}
    stop = threading.Event()
    guard = threading.Lock()

    def writer(name: str, wb: WriteBehind, worker: int) -> None:
        score = 0
        while not stop.is_set():
            score += 1
            try:
                entry = wb.write(1 + (worker * 5 + score) % 20, {"score": score})
            except Exception:
                continue  # not acknowledged (refused, or the node is gone)
            with guard:
                acked[name].append(entry)

    threads = [
        threading.Thread(target=writer, args=(name, wb, worker))
        for worker in range(4)
        for name, wb in (("plain", plain), ("waited", waited))
    ]
    for thread in threads:
        thread.start()
    try:
        _wait_for(lambda: min(map(len, acked.values())) >= 300, timeout=60, what="writes")
        replica = local.replica_of(primary)
        local.kill(primary)
        local.promote(replica)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    with local.node(replica) as promoted:
        kept = {entry.decode() for entry, _ in promoted.xrange(stream)}
    assert not set(acked["waited"]) - kept  # confirmed by the replica: never lost
    return len(set(acked["plain"]) - kept)


@pytest.mark.timeout(120)
def test_failover_under_concurrent_writers_loses_only_writes_no_replica_confirmed(
    store, record_property
):
    """No staged cut: a primary SIGKILLed under concurrent writers, once per primary. What it
    acknowledged but had not sent yet is lost with it (recorded per failover: few, often
    none, on loopback); a write its replica confirmed (``WAIT 1``) never is."""
    for key in range(1, 21):
        store.save(key, {"score": 0})
    with start_cluster(3, 1, node_timeout=15.0) as local:
        client = _fail_fast(local)
        try:
            lost = [_kill_under_writers(local, client, store) for _ in range(3)]
        finally:
            client.close()
    record_property("lost_per_failover", lost)
    print(f"acknowledged writes lost per failover, no staged cut: {lost}")
