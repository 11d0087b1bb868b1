"""The asyncio limiters (``course_lib.rate_limiting.aio``) against the real Redis: exact
under concurrent tasks and processes, one family with the synchronous one (the same cores,
not a subclass of it), fail-open or closed when Redis is gone, and awaited by the
middleware."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import redis as redis_lib
import redis.asyncio as aredis
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from course_lib import services
from course_lib.clocks import ManualClock
from course_lib.measure import run_processes
from course_lib.rate_limiting import (
    FAIL_CLOSED_RETRY_AFTER,
    RateLimitMiddleware,
    RedisLimiter,
    aio,
)
from course_lib.rate_limiting import redis_limiters as sync

# name -> (async class, sync class, factory(cls, client, ns, quota, window, **kw))
FAMILIES: dict[str, tuple[type, type, Callable[..., Any]]] = {
    "fixed_window": (
        aio.FixedWindow,
        sync.FixedWindow,
        lambda c, r, ns, q, w, **kw: c(r, q, w, prefix=f"{ns}:fw", **kw),
    ),
    "sliding_window_log": (
        aio.SlidingWindowLog,
        sync.SlidingWindowLog,
        lambda c, r, ns, q, w, **kw: c(r, q, w, prefix=f"{ns}:swl", **kw),
    ),
    "sliding_window_counter": (
        aio.SlidingWindowCounter,
        sync.SlidingWindowCounter,
        lambda c, r, ns, q, w, **kw: c(r, q, w, prefix=f"{ns}:swc", **kw),
    ),
    "token_bucket": (
        aio.RedisTokenBucket,
        sync.RedisTokenBucket,
        lambda c, r, ns, q, w, **kw: c(r, q, q / w, prefix=f"{ns}:tb", **kw),
    ),
    "gcra": (
        aio.GCRA,
        sync.GCRA,
        lambda c, r, ns, q, w, **kw: c(r, q / w, q, prefix=f"{ns}:g", **kw),
    ),
}


def _async_limiter(name: str, client: Any, ns: str, quota: int, window: float, **kw: Any) -> Any:
    cls, _, make = FAMILIES[name]
    return make(cls, client, ns, quota, window, **kw)


def _tasks_allowed(name: str, ns: str, tasks: int, quota: int) -> int:
    async def main() -> int:
        # 200 tasks share 16 connections: a blocking pool makes them wait for one.
        pool = aredis.BlockingConnectionPool.from_url(services.redis_url(), max_connections=16)
        client = aredis.Redis(connection_pool=pool)
        try:
            limiter = _async_limiter(name, client, ns, quota, 3600)
            gate = asyncio.Event()

            async def one() -> bool:
                await gate.wait()
                return bool(await limiter.hit("shared"))

            running = [asyncio.create_task(one()) for _ in range(tasks)]
            await asyncio.sleep(0.01)
            gate.set()
            return sum(await asyncio.gather(*running))
        finally:
            await client.aclose()

    return asyncio.run(main())


@pytest.mark.parametrize("name", list(FAMILIES))
def test_200_concurrent_tasks_admit_exactly_the_limit(ns: str, name: str) -> None:
    assert _tasks_allowed(name, ns, 200, 50) == 50


@pytest.mark.parametrize("name", ["sliding_window_log", "gcra"])
def test_tasks_in_two_processes_admit_exactly_the_limit(ns: str, name: str) -> None:
    result = run_processes(lambda: _tasks_allowed(name, ns, 200, 150), 2, timeout=60)
    assert result.errors == [] and sum(result.values) == 150


@pytest.mark.parametrize("name", list(FAMILIES))
def test_one_family_with_the_sync_limiters(redis: redis_lib.Redis, ns: str, name: str) -> None:
    _, sync_cls, make = FAMILIES[name]
    counted_sync = make(sync_cls, redis, ns, 3, 3600)
    assert counted_sync.hit("k").remaining == 2

    async def main() -> list[Any]:
        client = aredis.Redis.from_url(services.redis_url())
        try:
            limiter = _async_limiter(name, client, ns, 3, 3600)
            one = await limiter.hit("k")
            batch = await limiter.hit_many(["k", ("other", 2)])
            return [one, *batch]
        finally:
            await client.aclose()

    one, again, other = asyncio.run(main())
    assert (one.allowed, one.remaining) == (True, 1)  # saw the sync family's hit
    assert (again.allowed, again.remaining) == (True, 0)
    assert (other.allowed, other.remaining) == (True, 1)
    assert not counted_sync.hit("k").allowed


@pytest.mark.parametrize("name", list(FAMILIES))
def test_async_batches_decide_as_the_sync_hit_one_by_one(
    redis: redis_lib.Redis, ns: str, name: str
) -> None:
    _, sync_cls, make = FAMILIES[name]
    clock = ManualClock(7200.0)
    one_by_one = make(sync_cls, redis, f"{ns}:one", 5, 60, clock=clock)
    items = ["a", ("b", 2), "a", ("a", 0), ("c", 5), ("a", 3), "b", ("c", 1), "a", "a"]

    async def main() -> list[list[Any]]:
        client = aredis.Redis.from_url(services.redis_url())
        try:
            limiter = _async_limiter(name, client, f"{ns}:many", 5, 60, clock=clock)
            rounds = [await limiter.hit_many(["u"] * 15)]
            for step in (0.0, 13.0, 50.0):
                clock.advance(step)
                rounds.append(await limiter.hit_many(items))
            return rounds
        finally:
            await client.aclose()

    rounds = asyncio.run(main())
    assert [d.allowed for d in rounds[0]] == [True] * 5 + [False] * 10
    assert [d.remaining for d in rounds[0]] == [4, 3, 2, 1, 0] + [0] * 10
    clock.set(7200.0)  # replay the same times one by one
    for step, got in zip((0.0, 13.0, 50.0), rounds[1:], strict=True):
        clock.advance(step)
        expected = [
            one_by_one.hit(item) if isinstance(item, str) else one_by_one.hit(*item)
            for item in items
        ]
        assert got == expected, step


def test_a_full_non_blocking_pool_is_an_error_not_a_free_pass(ns: str) -> None:
    async def main() -> list[Any]:
        client = aredis.Redis.from_url(services.redis_url(), max_connections=4)
        try:
            limiter = aio.GCRA(client, 1, 5, prefix=f"{ns}:pool")
            return await asyncio.gather(
                *(limiter.hit("k") for _ in range(50)), return_exceptions=True
            )
        finally:
            await client.aclose()

    results = asyncio.run(main())
    assert any(isinstance(r, redis_lib.exceptions.MaxConnectionsError) for r in results)
    assert not any(getattr(r, "degraded", False) for r in results)
    assert sum(bool(r) for r in results if not isinstance(r, Exception)) <= 5


def test_each_family_refuses_the_other_familys_client(redis: redis_lib.Redis) -> None:
    with pytest.raises(TypeError, match=r"redis\.asyncio\.Redis"):
        aio.GCRA(redis, 1, 5, prefix="x")
    client = aredis.Redis.from_url(services.redis_url())
    with pytest.raises(TypeError, match=r"redis\.Redis or RedisCluster"):
        sync.GCRA(client, 1, 5, prefix="x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="limit"):
        aio.FixedWindow(client, 0, 60, prefix="x")


@pytest.mark.one_pass
def test_fail_open_when_redis_is_stopped(embedded_dir) -> None:
    server = services.EmbeddedRedis(embedded_dir / "redis")
    url = server.start()

    async def main() -> dict[str, Any]:
        client = services.fail_fast_async_redis(url, timeout=0.5)
        try:
            out: dict[str, Any] = {"up": [], "down": [], "closed": [], "back": []}
            for name in FAMILIES:
                out["up"].append(await _async_limiter(name, client, "t", 2, 60).hit("u"))
            server.stop()
            for name in FAMILIES:
                out["down"].append(await _async_limiter(name, client, "t", 2, 60).hit("u"))
                closed = _async_limiter(name, client, "t", 2, 60, fail_open=False)
                out["closed"].append(await closed.hit("u"))
                out["down"].extend(await _async_limiter(name, client, "t", 2, 60).hit_many(["a"]))
            server.start()
            for name in FAMILIES:
                out["back"].append(await _async_limiter(name, client, "t", 2, 60).hit("u"))
            return out
        finally:
            await client.aclose()

    try:
        out = asyncio.run(main())
    finally:
        server.stop()
    assert all(d.allowed and not d.degraded for d in out["up"])
    assert all(d.allowed and d.degraded for d in out["down"]) and len(out["down"]) == 10
    assert all(not d.allowed and d.degraded for d in out["closed"])
    assert all(d.retry_after == FAIL_CLOSED_RETRY_AFTER for d in out["closed"])
    assert all(d.allowed and not d.degraded for d in out["back"])  # scripts loaded again


def test_middleware_awaits_an_async_limiter_and_answers_429(ns: str) -> None:
    async def home(request: object) -> PlainTextResponse:
        return PlainTextResponse("hello")

    async def main() -> list[httpx.Response]:
        client = aredis.Redis.from_url(services.redis_url())
        try:
            limiter = aio.GCRA(client, 1, 2, prefix=f"{ns}:http")
            app = RateLimitMiddleware(Starlette(routes=[Route("/", home)]), limiter)
            assert app._awaitable
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
                return [await http.get("/") for _ in range(3)]
        finally:
            await client.aclose()

    responses = asyncio.run(main())
    assert [r.status_code for r in responses] == [200, 200, 429]
    assert responses[2].headers["retry-after"] == "1"
    assert responses[0].headers["ratelimit-policy"] == '"default";q=2;w=2'


@pytest.mark.parametrize("name", list(FAMILIES))
def test_the_asyncio_shell_is_not_the_blocking_one(redis: redis_lib.Redis, name: str) -> None:
    """One sans-I/O core per algorithm, two shells that are not subclasses of each other:
    an asyncio limiter is never taken for a blocking one whose ``hit`` returns a value."""
    cls, sync_cls, make = FAMILIES[name]
    client = aredis.Redis.from_url(services.redis_url())
    limiter = make(cls, client, "shape", 3, 60)
    assert not isinstance(limiter, RedisLimiter) and isinstance(limiter, aio.AsyncRedisLimiter)
    assert not issubclass(sync_cls, aio.AsyncRedisLimiter)
    assert inspect.iscoroutinefunction(limiter.hit)
    assert inspect.iscoroutinefunction(limiter.hit_many)
    blocking = make(sync_cls, redis, "shape", 3, 60)
    assert not inspect.iscoroutinefunction(blocking.hit)
    core = sync_cls.__bases__[0]  # the algorithm's sans-I/O core: keys, script, arguments
    assert core.__module__ == "course_lib.rate_limiting.algorithms" and isinstance(limiter, core)
    assert limiter.script is blocking.script
    (keys, args), (sync_keys, sync_args) = limiter.script_call("k", 2), blocking.script_call("k", 2)
    assert keys == sync_keys and args[2:] == sync_args[2:]  # args[1]: the log's nonce per call
    assert repr(limiter) == repr(blocking)


@pytest.mark.one_pass
@pytest.mark.parametrize("shell", [sync, aio])
def test_each_shell_declares_its_limiters_by_their_names(shell: Any) -> None:
    """Each shell declares its five classes, its core first: each lives in the shell's module
    and reads as its core's docs."""
    for name in set(shell.__all__) - {"RedisLimiter", "AsyncRedisLimiter"}:
        cls = getattr(shell, name)
        core = cls.__bases__[0]
        assert (cls.__name__, cls.__qualname__, cls.__module__) == (name, name, shell.__name__)
        assert core.__name__ == f"{name}Core" and cls.__doc__ == core.__doc__


def test_an_empty_async_batch_sends_nothing(ns: str) -> None:
    async def main() -> list[Any]:
        # nothing listens on port 1: any command would fail
        client = aredis.Redis(host="127.0.0.1", port=1)
        try:
            return await aio.GCRA(client, 1, 5, prefix=f"{ns}:empty", fail_open=False).hit_many([])
        finally:
            await client.aclose()

    assert asyncio.run(main()) == []


def test_async_hit_many_validates_before_sending(ns: str) -> None:
    async def main() -> None:
        client = aredis.Redis.from_url(services.redis_url())
        limiter = aio.FixedWindow(client, 3, 60, prefix=f"{ns}:check")
        try:
            with pytest.raises(ValueError, match="cost"):
                await limiter.hit_many(["a", ("a", 4)])
            with pytest.raises(TypeError, match="keys_or_pairs"):
                await limiter.hit_many([("a", 1, 2)])  # type: ignore[list-item]
            with pytest.raises(TypeError, match="key"):
                await limiter.hit(7)  # type: ignore[arg-type]
            assert (await limiter.hit("a")).remaining == 2  # nothing was counted
        finally:
            await client.aclose()

    asyncio.run(main())
