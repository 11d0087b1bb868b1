"""The ASGI middleware: 429 with Retry-After and the IETF draft RateLimit headers, per
client keys, pass-through of non-HTTP traffic; and the live demo server and polite client."""

from __future__ import annotations

import os
import random
import socket
import types

import anyio
import httpx
import pytest
import redis as redis_lib
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from course_lib import services
from course_lib.clocks import ManualClock
from course_lib.http import serve
from course_lib.measure import run_threads
from course_lib.rate_limiting import (
    GCRA,
    FixedWindow,
    KeyedTokenBucket,
    RateLimitMiddleware,
    RedisTokenBucket,
    api_key_or_ip,
    polite_get,
    rate_limit_headers,
    retry_after_seconds,
)
from course_lib.rate_limiting.decision import Decision
from course_lib.rate_limiting.lesson.http_demo import demo_app


def get_all(app, requests: list[dict]) -> list[httpx.Response]:
    """Send ``requests`` (kwargs of ``client.get("/", ...)``) in order through ``app``."""

    async def main() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return [await client.get("/", **kwargs) for kwargs in requests]

    return anyio.run(main)


def _app(limiter, **kwargs) -> RateLimitMiddleware:
    async def home(request):
        return PlainTextResponse("hello")

    return RateLimitMiddleware(Starlette(routes=[Route("/", home)]), limiter, **kwargs)


def test_middleware_answers_429_with_retry_after_and_ratelimit_headers(
    redis: redis_lib.Redis, ns: str
) -> None:
    limiter = FixedWindow(redis, 2, 60, prefix=f"{ns}:fw", clock=ManualClock(30.0))
    responses = get_all(_app(limiter, policy="per-ip"), [{}, {}, {}])
    assert [r.status_code for r in responses] == [200, 200, 429]
    assert responses[0].text == "hello"
    assert responses[0].headers["ratelimit-policy"] == '"per-ip";q=2;w=60'
    assert responses[0].headers["ratelimit"] == '"per-ip";r=1;t=30'
    assert "retry-after" not in responses[0].headers
    refused = responses[2]
    assert refused.headers["retry-after"] == "30"
    assert refused.headers["ratelimit"] == '"per-ip";r=0;t=30'
    assert refused.headers["ratelimit-policy"] == '"per-ip";q=2;w=60'
    assert refused.json()["detail"] == "Too Many Requests"


def test_middleware_limits_each_api_key_separately(redis: redis_lib.Redis, ns: str) -> None:
    limiter = FixedWindow(redis, 1, 60, prefix=f"{ns}:fw")
    alice, bob = {"headers": {"X-API-Key": "alice"}}, {"headers": {"X-API-Key": "bob"}}
    key = api_key_or_ip({"alice", "bob"})
    responses = get_all(_app(limiter, key=key), [alice, alice, bob, {}])
    codes = [r.status_code for r in responses]  # the last one has no key: limited by IP
    assert codes == [200, 429, 200, 200]
    assert redis.exists(limiter.key("key:alice"), limiter.key("key:bob")) == 2


def test_rotating_unknown_api_keys_buys_no_extra_quota(redis: redis_lib.Redis, ns: str) -> None:
    limiter = FixedWindow(redis, 2, 60, prefix=f"{ns}:fw")
    invented = [{"headers": {"X-API-Key": f"made-up-{i}"}} for i in range(6)]
    for key in (api_key_or_ip({"alice"}), api_key_or_ip(lambda k: k == "alice")):
        redis.delete(limiter.key("ip:127.0.0.1"))
        codes = [r.status_code for r in get_all(_app(limiter, key=key), invented)]
        assert codes == [200, 200, 429, 429, 429, 429]  # all counted against the IP
    assert [k.decode() for k in redis.scan_iter(match=f"{ns}:fw:*")] == [
        limiter.key("ip:127.0.0.1")
    ]  # and no state per invented key
    with pytest.raises(TypeError, match="known"):
        api_key_or_ip("alice")  # type: ignore[arg-type]


@pytest.mark.one_pass
def test_retry_after_is_whole_seconds_and_at_least_one() -> None:
    limiter = types.SimpleNamespace(quota=5, window=2.5)  # all the headers read
    headers = dict(rate_limit_headers(limiter, Decision(False, 0, 0.2, 2.2)))
    assert headers == {
        "RateLimit-Policy": '"default";q=5;course-window-ms=2500',
        "RateLimit": '"default";r=0;t=3',
        "Retry-After": "1",
    }
    degraded = dict(rate_limit_headers(limiter, Decision(True, 5, 0.0, 0.0, True)))
    assert "RateLimit" not in degraded and "RateLimit-Policy" in degraded


def test_policy_header_states_the_policy_without_rounding(redis: redis_lib.Redis, ns: str) -> None:
    def policy(limiter) -> str:
        return dict(rate_limit_headers(limiter, Decision(True, 1, 0.0, 0.0)))["RateLimit-Policy"]

    # 2/s with bursts of 5: a drained bucket is full again after 2.5 s, not 3
    assert policy(GCRA(redis, 2, 5, prefix=ns)) == '"default";q=5;course-window-ms=2500'
    assert policy(RedisTokenBucket(redis, 10, 10 / 60, prefix=ns)) == '"default";q=10;w=60'
    assert policy(FixedWindow(redis, 100, 60, prefix=ns)) == '"default";q=100;w=60'
    assert policy(FixedWindow(redis, 2, 0.3, prefix=ns)) == '"default";q=2;course-window-ms=300'


def test_middleware_rejects_bad_configuration(redis: redis_lib.Redis, ns: str) -> None:
    limiter = FixedWindow(redis, 2, 60, prefix=f"{ns}:fw")
    with pytest.raises(ValueError, match="cost"):
        _app(limiter, cost=3)
    with pytest.raises(TypeError, match="cost"):
        _app(limiter, cost=True)
    with pytest.raises(TypeError, match="key"):
        _app(limiter, key="ip")
    with pytest.raises(ValueError, match="policy"):
        _app(limiter, policy='bad"name')
    with pytest.raises(TypeError, match="limiter"):
        _app(object())


def test_middleware_passes_other_asgi_traffic_through(redis: redis_lib.Redis, ns: str) -> None:
    seen = []

    async def inner(scope, receive, send):
        seen.append(scope["type"])

    limiter = FixedWindow(redis, 1, 60, prefix=f"{ns}:fw")
    app = RateLimitMiddleware(inner, limiter)

    async def main() -> None:
        for kind in ("websocket", "lifespan", "websocket"):
            await app({"type": kind, "client": ("1.2.3.4", 1)}, None, None)

    anyio.run(main)
    assert seen == ["websocket", "lifespan", "websocket"]
    assert redis.exists(limiter.key("ip:1.2.3.4")) == 0


@pytest.mark.timeout(60)
def test_live_server_and_polite_client(redis: redis_lib.Redis, ns: str) -> None:
    # The limiter reads a manual clock and the polite client "sleeps" by advancing it: real
    # HTTP, real Redis, and no dependence on how fast this machine is.
    clock = ManualClock(1000.0)
    limiter = GCRA(redis, 5, 2, prefix=f"{ns}:gcra", clock=clock)
    with serve(demo_app(limiter)) as url, httpx.Client(base_url=url, timeout=5) as client:
        quick = [client.get("/").status_code for _ in range(3)]
        attempts = polite_get(client, "/", rng=random.Random(1), sleep=clock.advance)
    assert quick == [200, 200, 429]
    assert [a.status for a in attempts] == [429, 200]
    assert attempts[0].retry_after == "1"
    assert 1.0 <= attempts[1].waited <= 1.5  # Retry-After times 1 + U(0, 0.5)
    with pytest.raises(httpx.TransportError):
        httpx.get(url, timeout=1)  # the context manager stopped the server


def _server_side_nodelay(port: int, peer_port: int) -> int:
    """TCP_NODELAY of the server's end of the connection from ``peer_port``: the server
    runs in this process, so its socket is one of our file descriptors."""
    for fd in os.listdir("/proc/self/fd"):
        try:
            sock = socket.socket(fileno=os.dup(int(fd)))
        except OSError:
            continue
        with sock:
            try:
                if sock.getsockname()[1] == port and sock.getpeername()[1] == peer_port:
                    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            except (OSError, IndexError, TypeError):
                continue
    raise LookupError(f"no server socket for 127.0.0.1:{port} <- {peer_port}")


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs Linux /proc")
def test_demo_server_sends_small_responses_without_delay(redis: redis_lib.Redis, ns: str) -> None:
    # Without TCP_NODELAY each small response waits for the client's delayed ACK (~40 ms).
    limiter = FixedWindow(redis, 100, 60, prefix=f"{ns}:fw")
    with serve(demo_app(limiter)) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
            conn.sendall(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
            assert conn.recv(4096).startswith(b"HTTP/1.1 200")
            assert _server_side_nodelay(port, conn.getsockname()[1]) == 1


@pytest.mark.one_pass
@pytest.mark.timeout(60)
def test_fail_fast_client_lets_the_middleware_fail_open(embedded_dir) -> None:
    server = services.EmbeddedRedis(embedded_dir / "redis")
    client = services.fail_fast_redis(server.start(), timeout=0.5)
    assert client.get_retry().get_retries() == 0
    assert client.connection_pool.connection_kwargs["socket_timeout"] == 0.5
    limiter = GCRA(client, 2, 5, prefix="t")
    assert get_all(_app(limiter), [{}])[0].headers["ratelimit"] == '"default";r=4;t=1'
    server.stop()
    response = get_all(_app(limiter), [{}])[0]
    assert response.status_code == 200 and "ratelimit" not in response.headers
    client.close()
    with pytest.raises(ValueError, match="timeout"):
        services.fail_fast_redis(server.url, timeout=0)


@pytest.mark.one_pass
def test_middleware_runs_without_redis_on_keyed_in_process_buckets() -> None:
    clock = ManualClock(0.0)
    limiter = KeyedTokenBucket(2, 0.5, clock=clock)
    alice, bob = {"headers": {"X-API-Key": "alice"}}, {"headers": {"X-API-Key": "bob"}}
    app = _app(limiter, key=api_key_or_ip({"alice", "bob"}), policy="local")
    responses = get_all(app, [alice, alice, alice, bob])
    assert [r.status_code for r in responses] == [200, 200, 429, 200]
    assert responses[0].headers["ratelimit-policy"] == '"local";q=2;w=4'
    assert responses[2].headers["retry-after"] == "2"  # one token at 0.5 tokens/s
    clock.advance(2.0)
    assert [r.status_code for r in get_all(app, [alice, alice])] == [200, 429]


@pytest.mark.one_pass
def test_keyed_bucket_is_exact_under_threads_and_bounded_in_memory() -> None:
    limiter = KeyedTokenBucket(100, 1e-9, max_keys=3)
    allowed = run_threads(lambda: bool(limiter.hit("k")), 8, calls=50)
    assert allowed.errors == [] and sum(allowed.values) == 100
    for key in ("a", "b", "c", "d"):
        limiter.hit(key)
    assert len(limiter) == 3  # "k", the least recently used, was dropped
    assert limiter.hit("k").remaining == 99  # so it starts full again
    with pytest.raises(ValueError, match="capacity"):
        KeyedTokenBucket(0, 1)
    with pytest.raises(ValueError, match="max_keys"):
        KeyedTokenBucket(1, 1, max_keys=0)
    with pytest.raises(TypeError, match="clock"):
        KeyedTokenBucket(1, 1, clock=3)  # type: ignore[arg-type]
    assert repr(limiter) == "KeyedTokenBucket(capacity=100, refill_rate=1e-09/s, keys=3/3)"
    with pytest.raises(TypeError, match="key"):
        limiter.hit(1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="tokens"):
        limiter.hit("k", 101)


@pytest.mark.one_pass
@pytest.mark.timeout(60)
def test_polite_client_never_waits_longer_than_max_wait() -> None:
    # Once, Retry-After: 86400 meant sleeping a day, an HTTP-date crashed float(), and a
    # negative value reached time.sleep. Each reply here is a 429 with that header.
    asked: list[str] = []

    async def refuse(request: object) -> PlainTextResponse:
        return PlainTextResponse("slow down", 429, headers={"Retry-After": asked[-1]})

    app = Starlette(routes=[Route("/", refuse)])
    slept: list[float] = []
    soon = "Wed, 21 Oct 2015 07:28:00 GMT"  # long past: wait 0
    with serve(app) as url, httpx.Client(base_url=url, timeout=5) as client:
        for header, attempts in [("86400", 1), ("-5", 1), ("1.5e308", 1), ("soon", 1)]:
            asked.append(header)
            got = polite_get(client, "/", max_attempts=3, max_wait=10, sleep=slept.append)
            assert [a.status for a in got] == [429] * attempts, header
        assert slept == []  # none of them was waited for
        asked.append(soon)
        got = polite_get(client, "/", max_attempts=3, jitter=0, sleep=slept.append)
        assert [a.status for a in got] == [429] * 3 and slept == [0.0, 0.0]
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0) == 10.0
    assert retry_after_seconds(None) == 1.0 and retry_after_seconds(" 7 ") == 7.0
    with pytest.raises(ValueError, match="max_wait"):
        polite_get(client, "/", max_wait=0)
