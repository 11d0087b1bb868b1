"""A backend for the load-balancing rig: an ASGI app with a latency profile.

Run one per process with :func:`course_lib.http.serve_processes`::

    with serve_processes("course_lib.load_balancing.backends:backend_app",
                         [{"name": "server1"}, {"name": "server2", "profile": "slow"}]) as procs:
        ...

Every response carries ``X-Backend: <name>`` (which backend served it, also through
nginx) and ``GET /stats`` answers what this backend served: ``{"name", "served",
"clients"}`` (requests per ``X-Forwarded-For`` address). Profiles:

- ``fixed``: every request takes ``latency_ms``;
- ``random``: exponentially distributed with mean ``latency_ms`` (seeded);
- ``slow``: ``factor`` times ``latency_ms``;
- ``slowdown``: ``latency_ms`` until ``slow_after_s`` seconds after start, then ``factor`` x;
- ``failing``: answers ``fail_status`` (500) after ``latency_ms``.

``workers`` caps concurrent requests (a server with that many worker threads: the rest
queue), ``None`` for no cap.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from course_lib.validation import non_negative_number, positive_int, positive_number

__all__ = ["PROFILES", "backend_app"]

PROFILES = ("fixed", "random", "slow", "slowdown", "failing")

ASGIApp = Callable[[dict[str, Any], Any, Any], Awaitable[None]]


def backend_app(
    name: str,
    *,
    profile: str = "fixed",
    latency_ms: float = 2.0,
    factor: float = 5.0,
    slow_after_s: float = 0.0,
    fail_status: int = 500,
    workers: int | None = None,
    seed: int = 0,
) -> ASGIApp:
    """An ASGI backend named ``name`` with a latency ``profile`` (see the module doc)."""
    if not isinstance(name, str) or not name:
        raise ValueError("name must be a non-empty string")
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {PROFILES}, got {profile!r}")
    base = non_negative_number("latency_ms", latency_ms) / 1000
    factor = positive_number("factor", factor)
    slow_after_s = non_negative_number("slow_after_s", slow_after_s)
    limit = asyncio.Semaphore(positive_int("workers", workers)) if workers is not None else None
    rng = random.Random(seed)
    started = time.monotonic()
    served: Counter[str] = Counter()
    tag = name.encode()

    def delay() -> float:
        if profile == "random":
            return rng.expovariate(1 / base) if base else 0.0
        if profile == "slow" or (
            profile == "slowdown" and time.monotonic() - started >= slow_after_s
        ):
            return base * factor
        return base

    async def respond(send: Any, status: int, body: bytes, kind: bytes) -> None:
        headers = [
            (b"content-type", kind),
            (b"content-length", str(len(body)).encode()),
            (b"x-backend", tag),
        ]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def work() -> None:
        seconds = delay()
        if seconds:
            await asyncio.sleep(seconds)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] == "/stats":
            stats = {"name": name, "served": sum(served.values()), "clients": dict(served)}
            await respond(send, 200, json.dumps(stats).encode(), b"application/json")
            return
        while (await receive()).get("more_body"):
            pass
        client = dict(scope["headers"]).get(b"x-forwarded-for", b"-").decode()
        if limit is None:
            await work()
        else:
            async with limit:
                await work()
        served[client] += 1
        if profile == "failing":
            await respond(send, fail_status, b"failing\n", b"text/plain")
        else:
            await respond(send, 200, tag + b"\n", b"text/plain")

    return app
