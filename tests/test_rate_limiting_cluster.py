"""The Redis limiters on a real Redis Cluster: three primaries started on 127.0.0.1 for the
test (cluster mode needs TCP ports; nothing listens beyond the loopback interface)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from clusters import start_cluster
from ordering import until
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry

from course_lib.caching import CacheAside
from course_lib.clocks import ManualClock
from course_lib.concurrency import hammer_threads
from course_lib.rate_limiting import (
    FAIL_CLOSED_RETRY_AFTER,
    GCRA,
    Decision,
    FixedWindow,
    RedisTokenBucket,
    SlidingWindowCounter,
    SlidingWindowLog,
    aio,
)
from course_lib.rate_limiting.lesson.cluster import cluster_demo
from course_lib.services.cluster import LocalCluster

# Every cluster here is the test's own (redis-server is found the same way in both passes
# of `make test`): one pass covers them.
pytestmark = pytest.mark.one_pass


@pytest.fixture(scope="module")
def cluster(local_cluster: LocalCluster) -> Iterator[RedisCluster]:
    """A client of the module's cluster (the ``local_cluster`` fixture of conftest.py)."""
    client = local_cluster.client()
    yield client
    client.close()


# An hour's window: a run of a few seconds crosses a fixed window's boundary (where it may
# admit twice the limit, by design) once in about a thousand runs; a minute's did in ~5 %.
LIMITERS = {
    "fixed_window": lambda r, **kw: FixedWindow(r, 3, 3600, prefix="fw", **kw),
    "sliding_window_log": lambda r, **kw: SlidingWindowLog(r, 3, 3600, prefix="swl", **kw),
    "sliding_window_counter": lambda r, **kw: SlidingWindowCounter(r, 3, 3600, prefix="swc", **kw),
    "token_bucket": lambda r, **kw: RedisTokenBucket(r, 3, 3 / 3600, prefix="tb", **kw),
    "gcra": lambda r, **kw: GCRA(r, 3 / 3600, 3, prefix="gcra", **kw),
}


def flush_scripts(cluster: RedisCluster) -> None:
    for node in cluster.get_primaries():
        cluster.get_redis_connection(node).script_flush()


@pytest.mark.timeout(90)
def test_limiters_work_on_a_three_node_cluster(cluster: RedisCluster) -> None:
    keys = [f"client{i}" for i in range(12)]
    for name, make in LIMITERS.items():
        limiter = make(cluster, clock=ManualClock(1000.0))
        nodes = {cluster.get_node_from_key(limiter.key(k)).name for k in keys}
        assert len(nodes) == 3, name  # the keys really are spread over the three primaries
        assert [limiter.hit("a").remaining for _ in range(3)] == [2, 1, 0], name
        assert not limiter.hit("a"), name
        decisions = limiter.hit_many([*keys, "a", ("client0", 2), "client0"])
        assert [d.allowed for d in decisions] == [True] * 12 + [False, True, False], name
        assert [d.remaining for d in decisions[:12]] == [2] * 12, name
    # a script flushed from every node is loaded again, for hit and for hit_many
    flush_scripts(cluster)
    limiter = LIMITERS["fixed_window"](cluster, clock=ManualClock(1000.0))
    assert limiter.hit("fresh").remaining == 2
    flush_scripts(cluster)
    decisions = limiter.hit_many(keys[:6])  # client0 spent 3 above, the others 1
    assert [(d.allowed, d.remaining) for d in decisions] == [(False, 0)] + [(True, 1)] * 5


@pytest.mark.timeout(90)
def test_exact_admissions_under_threads_on_a_cluster(cluster: RedisCluster) -> None:
    for name, make in LIMITERS.items():
        limiter = make(cluster)
        allowed = hammer_threads(lambda limiter=limiter: limiter.hit("hammered"), threads=8)
        assert allowed == 3, name


@pytest.mark.timeout(90)
def test_asyncio_limiters_on_a_cluster_reload_scripts_and_stay_exact(cluster: RedisCluster) -> None:
    node = cluster.get_primaries()[0]

    async def main() -> dict[str, object]:
        client = AsyncRedisCluster(host=node.host, port=node.port)
        out: dict[str, object] = {}
        try:
            flush_scripts(cluster)
            for name, cls in ASYNC_LIMITERS.items():
                limiter = cls(client)
                first = await limiter.hit(f"async-{name}")
                batch = await limiter.hit_many([f"async-{name}", f"other-{name}"])
                many = await asyncio.gather(*(limiter.hit(f"gathered-{name}") for _ in range(40)))
                out[name] = (first.remaining, [d.remaining for d in batch], sum(map(bool, many)))
        finally:
            await client.aclose()
        return out

    out = asyncio.run(main())
    assert out == {name: (2, [1, 2], 3) for name in ASYNC_LIMITERS}


ASYNC_LIMITERS = {
    "fixed_window": lambda r, **kw: aio.FixedWindow(r, 3, 3600, prefix="afw", **kw),
    "sliding_window_log": lambda r, **kw: aio.SlidingWindowLog(r, 3, 3600, prefix="aswl", **kw),
    "sliding_window_counter": lambda r, **kw: aio.SlidingWindowCounter(
        r, 3, 3600, prefix="aswc", **kw
    ),
    "token_bucket": lambda r, **kw: aio.RedisTokenBucket(r, 3, 3 / 3600, prefix="atb", **kw),
    "gcra": lambda r, **kw: aio.GCRA(r, 3 / 3600, 3, prefix="agcra", **kw),
}


def test_a_cluster_that_is_down_fails_open_flagged() -> None:
    """A primary without a replica dies: once the others mark it failed (node_timeout), the
    whole cluster answers CLUSTERDOWN (full slot coverage is required by default), also for
    keys whose node is alive. That is the cluster unable to count, not a bad command: the
    limiter and the cache answer their fail-open policy, flagged, instead of raising."""
    with start_cluster(node_timeout=0.5) as local:
        client = local.client(retry=Retry(NoBackoff(), 0))
        try:
            limiter = FixedWindow(client, 3, 3600, prefix="down")
            cache = CacheAside(client, lambda key: {"id": key}, ttl=60, namespace="down")
            alive_key = "k1"
            victim = next(p for p in local.alive() if p != local.port_of(limiter.key(alive_key)))
            assert limiter.hit(alive_key).allowed and not limiter.hit(alive_key).degraded
            local.kill(victim)
            survivor = local.node(local.port_of(limiter.key(alive_key)))

            def cluster_down() -> bool:
                return survivor.execute_command("CLUSTER INFO").get("cluster_state") == "fail"

            until(cluster_down, "the cluster reports cluster_state:fail", timeout=20)
            decision = limiter.hit(alive_key)
            assert decision.allowed and decision.degraded
            assert cache.get(7) == {"id": 7} and cache.stats["fail_open"] >= 1
            opened, closed = asyncio.run(_async_hits_on_a_cluster_that_is_down(local, alive_key))
            assert all(d.allowed and d.degraded for d in opened)
            assert all(not d.allowed and d.degraded for d in closed)
            assert all(d.retry_after == FAIL_CLOSED_RETRY_AFTER for d in closed)
        finally:
            client.close()


async def _async_hits_on_a_cluster_that_is_down(
    local: LocalCluster, key: str
) -> tuple[list[Decision], list[Decision]]:
    """The asyncio shell's ``hit`` and ``hit_many`` on the failed cluster, open and closed."""
    port = local.port_of(f"down:{{{key}}}")
    client = AsyncRedisCluster(host="127.0.0.1", port=port, retry=AsyncRetry(NoBackoff(), 0))
    try:
        answers: dict[bool, list[Decision]] = {}
        for fail_open in (True, False):
            limiter = aio.FixedWindow(client, 3, 3600, prefix="adown", fail_open=fail_open)
            answers[fail_open] = [await limiter.hit(key), *await limiter.hit_many([key, "k2"])]
        return answers[True], answers[False]
    finally:
        await client.aclose()


@pytest.mark.timeout(90)
def test_one_failing_slot_group_of_an_async_batch_answers_for_its_keys_only(
    cluster: RedisCluster,
) -> None:
    target = cluster.get_primaries()[0]
    node = cluster.get_redis_connection(target)

    async def main(fail_open: bool, keys: list[str]) -> dict[str, list[Decision]]:
        """Per limiter prefix, the decisions of a batch sent while ``target`` refuses writes."""
        client = AsyncRedisCluster(host=target.host, port=target.port)
        try:
            got = {}
            for make in ASYNC_LIMITERS.values():
                limiter = make(client, fail_open=fail_open)
                await limiter.hit_many([f"warm-{k}" for k in keys])  # scripts loaded
                node.config_set("min-replicas-to-write", "1")  # NOREPLICAS, as above
                try:
                    got[limiter.prefix] = await limiter.hit_many(keys * 2)
                finally:
                    node.config_set("min-replicas-to-write", "0")
            return got
        finally:
            await client.aclose()

    for fail_open in (True, False):
        keys = [f"aoom-{fail_open}-{i}" for i in range(12)]
        for prefix, got in asyncio.run(main(fail_open, keys)).items():
            failing = {k for k in keys if cluster.get_node_from_key(f"{prefix}:{{{k}}}") == target}
            assert 0 < len(failing) < len(keys), prefix
            _check_only_the_failing_keys_degraded(keys, got, failing, fail_open, prefix)


def _evalsha_calls(cluster: RedisCluster) -> int:
    """EVALSHA calls the primaries have run (each node counts its own)."""
    total = 0
    for node in cluster.get_primaries():
        stats = cluster.get_redis_connection(node).info("commandstats")
        total += stats.get("cmdstat_evalsha", {}).get("calls", 0)
    return total


def _batch_items(prefix: str) -> list[str | tuple[str, int]]:
    """A batch over 12 keys spread on the three nodes, with keys repeated across the slots
    of others, a cost of 2 and a question (cost 0)."""
    keys = [f"{prefix}{i}" for i in range(12)]
    k0, k1, k2 = keys[:3]
    return [k0, k1, k0, (k2, 2), k0, *keys[3:], k1, (k2, 0), k0, k2, k2, k0]


def _one_by_one(limiter: object, items: list[str | tuple[str, int]]) -> list[object]:
    return [limiter.hit(i) if isinstance(i, str) else limiter.hit(*i) for i in items]  # type: ignore[attr-defined]


@pytest.mark.timeout(90)
def test_a_batch_on_a_cluster_is_one_call_per_slot_and_decides_as_hit(
    cluster: RedisCluster,
) -> None:
    for name, make in LIMITERS.items():
        clock = ManualClock(2000.0)
        limiter = make(cluster, clock=clock)
        batch, single = _batch_items(f"batch-{name}-"), _batch_items(f"single-{name}-")
        slots = {cluster.keyslot(limiter.key(i if isinstance(i, str) else i[0])) for i in batch}
        nodes = {
            cluster.get_node_from_key(limiter.key(f"batch-{name}-{i}")).name for i in range(12)
        }
        assert len(nodes) == 3, name
        limiter.hit_many([f"warm-{name}-{i}" for i in range(12)])  # scripts loaded everywhere
        before = _evalsha_calls(cluster)
        got = limiter.hit_many(batch)
        assert _evalsha_calls(cluster) - before == len(slots) == 12, name
        first = [d.allowed for d, item in zip(got, batch, strict=True) if item == batch[0]]
        assert first == [True, True, True, False, False], name  # limit 3, counted in order
        assert got == _one_by_one(limiter, single), name
        assert not any(d.degraded for d in got), name


def _check_only_the_failing_keys_degraded(
    keys: list[str], got: list[Decision], failing: set[str], fail_open: bool, label: str
) -> None:
    """``got`` decides ``keys`` twice over: the ``failing`` keys got the ``fail_open``
    answer, flagged; the others were counted, twice each."""
    for position, (key, decision) in enumerate(zip(keys + keys, got, strict=True)):
        if key in failing:
            assert decision.degraded and decision.allowed == fail_open, (label, key)
        else:
            remaining = 2 if position < len(keys) else 1
            assert not decision.degraded and decision.allowed, (label, key)
            assert decision.remaining == remaining, (label, key)


@pytest.mark.timeout(90)
def test_one_failing_slot_group_answers_fail_open_for_its_keys_only(cluster: RedisCluster) -> None:
    target = cluster.get_primaries()[0]
    node = cluster.get_redis_connection(target)
    for fail_open in (True, False):
        for name, make in LIMITERS.items():
            limiter = make(cluster, fail_open=fail_open, clock=ManualClock(3000.0))
            keys = [f"oom-{fail_open}-{name}-{i}" for i in range(12)]
            failing = {k for k in keys if cluster.get_node_from_key(limiter.key(k)) == target}
            assert 0 < len(failing) < len(keys), name
            limiter.hit_many([f"warm-{name}-{i}" for i in range(12)])  # scripts loaded
            # A primary told to write only with a replica (it has none) answers NOREPLICAS
            # to a script's first write (OOM would do, but Redis lets a script that has
            # written once, such as the log's ZREMRANGEBYSCORE, write on under OOM).
            node.config_set("min-replicas-to-write", "1")
            try:
                got = limiter.hit_many(keys + keys)
            finally:
                node.config_set("min-replicas-to-write", "0")
            _check_only_the_failing_keys_degraded(keys, got, failing, fail_open, name)


@pytest.mark.timeout(90)
def test_asyncio_batches_on_a_cluster_decide_as_the_sync_hit(cluster: RedisCluster) -> None:
    node = cluster.get_primaries()[0]
    clock = ManualClock(4000.0)
    ASYNC = {
        "fixed_window": lambda r: aio.FixedWindow(r, 3, 3600, prefix="bfw", clock=clock),
        "sliding_window_log": lambda r: aio.SlidingWindowLog(
            r, 3, 3600, prefix="bswl", clock=clock
        ),
        "sliding_window_counter": lambda r: aio.SlidingWindowCounter(
            r, 3, 3600, prefix="bswc", clock=clock
        ),
        "token_bucket": lambda r: aio.RedisTokenBucket(r, 3, 3 / 3600, prefix="btb", clock=clock),
        "gcra": lambda r: aio.GCRA(r, 3 / 3600, 3, prefix="bgcra", clock=clock),
    }

    async def main() -> dict[str, list[object]]:
        client = AsyncRedisCluster(host=node.host, port=node.port)
        try:
            flush_scripts(cluster)
            return {
                name: await make(client).hit_many(_batch_items(f"abatch-{name}-"))
                for name, make in ASYNC.items()
            }
        finally:
            await client.aclose()

    got = asyncio.run(main())
    for name, make in LIMITERS.items():
        expected = _one_by_one(make(cluster, clock=clock), _batch_items(f"asingle-{name}-"))
        assert got[name] == expected, name
        assert [d.allowed for d in got[name]][:3] == [True, True, True], name


@pytest.mark.timeout(90)
def test_cluster_demo_admits_exactly_the_limit_per_client_on_every_primary(
    local_cluster: LocalCluster,
) -> None:
    frame = cluster_demo(
        30, 4, processes=2, threads=3, rounds=1, prefix="demo", cluster=local_cluster
    )
    assert list(frame["primary"]) == [1, 2, 3] and frame["slots"].sum() == 16384
    assert frame["clients"].sum() == 30 and (frame["clients"] > 0).all()
    assert frame.attrs["admitted"] == {f"client{i:03d}": 4 for i in range(30)}
    assert list(frame["admitted"]) == [4 * n for n in frame["clients"]]
    assert list(frame["attempts"]) == [6 * n for n in frame["clients"]]  # 2 x 3 x 1 each
    assert frame.attrs["degraded"] == 0
    with pytest.raises(ValueError, match="rounds"):  # 1 x 1 x 1 attempts cannot test limit 4
        cluster_demo(5, 4, processes=1, threads=1, rounds=1, cluster=local_cluster)
    with pytest.raises(ValueError, match="clients"):
        cluster_demo(0, cluster=local_cluster)
