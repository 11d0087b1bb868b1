"""The ASGI middleware: 429 with Retry-After and the IETF draft RateLimit headers, per
client keys, pass-through of non-HTTP traffic; and the live demo server and polite client."""

from __future__ import annotations

import random
import types

import anyio
import httpx
import pytest
import redis as redis_lib
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from course_lib.rate_limiting import (
    GCRA,
    FixedWindow,
    ManualClock,
    RateLimitMiddleware,
    api_key_or_ip,
    rate_limit_headers,
)
from course_lib.rate_limiting.decision import Decision
from course_lib.rate_limiting.demo import demo_app, polite_get, serve


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
    responses = get_all(_app(limiter, key=api_key_or_ip()), [alice, alice, bob, {}])
    codes = [r.status_code for r in responses]  # the last one has no key: limited by IP
    assert codes == [200, 429, 200, 200]
    assert redis.exists(limiter.key("key:alice"), limiter.key("key:bob")) == 2


def test_retry_after_is_whole_seconds_and_at_least_one() -> None:
    limiter = types.SimpleNamespace(quota=5, window=2.5)  # all the headers read
    headers = dict(rate_limit_headers(limiter, Decision(False, 0, 0.2, 2.2)))
    assert headers == {
        "RateLimit-Policy": '"default";q=5;w=3',
        "RateLimit": '"default";r=0;t=3',
        "Retry-After": "1",
    }
    degraded = dict(rate_limit_headers(limiter, Decision(True, 5, 0.0, 0.0, True)))
    assert "RateLimit" not in degraded and "RateLimit-Policy" in degraded


def test_middleware_rejects_bad_configuration(redis: redis_lib.Redis, ns: str) -> None:
    limiter = FixedWindow(redis, 2, 60, prefix=f"{ns}:fw")
    with pytest.raises(ValueError, match="cost"):
        _app(limiter, cost=3)
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
    limiter = GCRA(redis, 5, 2, prefix=f"{ns}:gcra")
    with serve(demo_app(limiter)) as url, httpx.Client(base_url=url, timeout=5) as client:
        quick = [client.get("/").status_code for _ in range(3)]
        attempts = polite_get(client, "/", rng=random.Random(1))
    assert quick[:2] == [200, 200] and quick[2] == 429
    assert [a.status for a in attempts][-1] == 200
    refused = [a for a in attempts if a.status == 429]
    assert refused, attempts
    assert attempts[1].waited >= float(refused[0].retry_after)
    with pytest.raises(httpx.TransportError):
        httpx.get(url, timeout=1)  # the context manager stopped the server
