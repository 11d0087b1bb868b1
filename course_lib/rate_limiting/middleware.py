"""ASGI middleware that rate-limits each client (works with Starlette, FastAPI, any ASGI app).

Every HTTP request is charged ``cost`` units against a key derived from the request
(:func:`client_ip` by default, or :func:`api_key_or_ip`). The key function must return an
identity the client cannot choose freely: a value read from an unauthenticated header lets
a client rotate it for a fresh quota each time (and fill the store with keys). Allowed
requests go on to the app and get the ``RateLimit-Policy`` / ``RateLimit`` headers of the
IETF draft (draft-ietf-httpapi-ratelimit-headers, the structured-field syntax of drafts 08
and later):

    RateLimit-Policy: "default";q=100;w=60      quota 100 units per 60 s
    RateLimit: "default";r=42;t=17              42 units left, full quota back in 17 s

Refused requests get ``429 Too Many Requests`` with the same headers plus ``Retry-After``
(whole seconds, at least 1) and never reach the app. Other ASGI traffic (websocket,
lifespan) passes through untouched.

A limiter whose ``hit`` is a coroutine function (:mod:`course_lib.rate_limiting.aio`) is
awaited on the event loop. A synchronous one talks to Redis with a blocking client, so its decision
runs in a worker thread (``anyio.to_thread``) instead of stalling the event loop for a
round trip; that thread hop costs every request, which is what the asyncio family saves.
That client decides how long a request waits when Redis is gone before ``fail_open``
answers: with redis-py 8's default retries, seconds per request. Build the limiter on
:func:`~course_lib.services.fail_fast_client` (short timeouts, no retries, a bounded pool
with a bounded wait), an asyncio limiter on
:func:`~course_lib.services.fail_fast_async_client`. A full client pool is not an outage:
the limiter raises :class:`~course_lib.services.PoolExhaustedError` (the request gets a 500)
instead of admitting everyone at peak load. Without Redis,
:class:`~course_lib.rate_limiting.KeyedTokenBucket` limits each process on its own.
"""

from __future__ import annotations

import inspect
import json
import math
import re
from collections.abc import Awaitable, Callable, Container, MutableMapping
from typing import Any, Protocol

import anyio.to_thread

from course_lib.validation import cost_within

from .decision import Decision

__all__ = ["Limiter", "RateLimitMiddleware", "api_key_or_ip", "client_ip", "rate_limit_headers"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
KeyFunc = Callable[[Scope], str]

_POLICY_NAME = re.compile(r"[A-Za-z0-9_.:/ -]{1,64}")


class Limiter(Protocol):
    """What the middleware needs: a keyed ``hit`` and the policy it enforces. ``hit`` may
    also be a coroutine function returning the :class:`Decision`."""

    quota: int
    window: float

    def hit(self, key: str, cost: int = 1) -> Decision: ...


def client_ip(scope: Scope) -> str:
    """The peer address of the connection. Behind a proxy that is the proxy: use a key
    function that reads the header your proxy sets, and only trust it from that proxy."""
    client = scope.get("client")
    return f"ip:{client[0]}" if client else "ip:unknown"


def api_key_or_ip(
    known: Container[str] | Callable[[str], bool], header: str = "x-api-key"
) -> KeyFunc:
    """Key function: one limit per API key for keys that ``known`` accepts (a set of keys,
    or a function that validates one), else the client's IP.

    An unknown or missing key is limited by IP, so inventing keys buys no extra quota and
    creates no state. ``known`` is required for that reason: the header alone proves
    nothing about who sent it.
    """
    if callable(known):
        accepts = known
    elif isinstance(known, Container) and not isinstance(known, str):
        accepts = known.__contains__
    else:
        raise TypeError(
            f"known must be a set of API keys or a callable, got {type(known).__name__}"
        )
    name = header.lower().encode("latin-1")

    def key(scope: Scope) -> str:
        for field, value in scope.get("headers", ()):
            if field == name and value:
                api_key = value.decode("latin-1")
                if accepts(api_key):
                    return f"key:{api_key}"
                break
        return client_ip(scope)

    return key


def _policy(limiter: Limiter, policy: str) -> str:
    window = limiter.window
    whole = round(window)
    # capacity / refill_rate can land a hair off a whole number (10 / (10 / 60))
    if whole >= 1 and abs(window - whole) <= 1e-9 * window:
        return f'"{policy}";q={limiter.quota};w={whole}'
    # The draft's w is whole seconds; rounding would misstate the policy (2/s with bursts
    # of 5 refills in 2.5 s, not 3), so w is left out (it is optional) and the exact
    # period goes in a vendor-prefixed parameter, as the draft suggests for extensions.
    return f'"{policy}";q={limiter.quota};course-window-ms={round(window * 1000)}'


def rate_limit_headers(
    limiter: Limiter, decision: Decision, policy: str = "default"
) -> list[tuple[str, str]]:
    """The response headers for ``decision``: ``RateLimit-Policy``, ``RateLimit`` (omitted
    when the decision was made without the store, as nothing was counted) and, when
    refused, ``Retry-After``.

    ``RateLimit-Policy`` says ``q`` units per ``w`` seconds: for the window limiters the
    limit and the window, for the buckets the burst (capacity) and the time an empty bucket
    takes to refill completely (burst / rate), so ``r`` never exceeds ``q``. The draft's
    ``w`` is a whole number of seconds; when the period is not, ``w`` is left out (it is
    optional) rather than rounded, and the period goes in the vendor parameter
    ``course-window-ms`` (rounded to the millisecond): 2/s with bursts of 5 is
    ``q=5;course-window-ms=2500``.
    """
    headers = [("RateLimit-Policy", _policy(limiter, policy))]
    if not decision.degraded:
        reset = math.ceil(decision.reset_after)
        headers.append(("RateLimit", f'"{policy}";r={decision.remaining};t={reset}'))
    if not decision.allowed:
        headers.append(("Retry-After", str(max(1, math.ceil(decision.retry_after)))))
    return headers


class RateLimitMiddleware:
    """``app = RateLimitMiddleware(app, limiter, key=client_ip, cost=1, policy="default")``,
    or with Starlette/FastAPI ``app.add_middleware(RateLimitMiddleware, limiter=...)``."""

    def __init__(
        self,
        app: ASGIApp,
        limiter: Limiter,
        *,
        key: KeyFunc = client_ip,
        cost: int = 1,
        policy: str = "default",
    ) -> None:
        if not callable(getattr(limiter, "hit", None)):
            raise TypeError(f"limiter must have a hit(key, cost) method, got {limiter!r}")
        if not callable(key):
            raise TypeError(f"key must be callable, got {type(key).__name__}")
        cost = cost_within(cost, limiter.quota, "quota")
        if not isinstance(policy, str) or not _POLICY_NAME.fullmatch(policy):
            raise ValueError(f"policy must be 1-64 letters, digits or _.:/- , got {policy!r}")
        self.app = app
        self.limiter = limiter
        self.key = key
        self.cost = cost
        self.policy = policy
        self._awaitable = inspect.iscoroutinefunction(limiter.hit)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self._awaitable:
            decision = await self.limiter.hit(self.key(scope), self.cost)
        else:
            decision = await anyio.to_thread.run_sync(self.limiter.hit, self.key(scope), self.cost)
        extra = [
            (name.lower().encode("latin-1"), value.encode("latin-1"))
            for name, value in rate_limit_headers(self.limiter, decision, self.policy)
        ]
        if not decision.allowed:
            body = json.dumps(
                {"detail": "Too Many Requests", "retry_after": decision.retry_after}
            ).encode()
            headers = [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *extra,
            ]
            await send({"type": "http.response.start", "status": 429, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)
