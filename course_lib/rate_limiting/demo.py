"""A live HTTP demo: a small rate-limited app, a server you can start in a notebook, and a
client that honours ``Retry-After`` with jitter.

- :func:`demo_app`: Starlette app with ``GET /`` behind :class:`RateLimitMiddleware`.
- :func:`serve`: run an ASGI app with uvicorn on ``127.0.0.1`` in a background thread;
  a context manager that always stops the server, also when the block raises.
- :func:`polite_get`: retry on 429 after ``Retry-After`` plus random jitter, so clients
  refused together do not all come back in the same instant.
"""

from __future__ import annotations

import contextlib
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from .middleware import KeyFunc, Limiter, RateLimitMiddleware, api_key_or_ip

__all__ = ["DEMO_API_KEYS", "Attempt", "demo_app", "polite_get", "serve"]

DEMO_API_KEYS = frozenset({"alice", "bob"})
"""The API keys :func:`demo_app` knows; any other ``X-API-Key`` is limited by IP."""


def demo_app(limiter: Limiter, *, key: KeyFunc | None = None) -> RateLimitMiddleware:
    """``GET /`` answers ``{"ok": true}``, limited per known ``X-API-Key``
    (:data:`DEMO_API_KEYS`), else per IP.

    Build ``limiter`` on :func:`~course_lib.rate_limiting.clients.fail_fast_client` so a
    dead Redis costs each request at most its timeout before ``fail_open`` answers.
    """

    async def home(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    app = Starlette(routes=[Route("/", home)])
    return RateLimitMiddleware(app, limiter, key=key or api_key_or_ip(DEMO_API_KEYS))


@contextlib.contextmanager
def serve(app: Callable, *, startup_timeout: float = 10.0) -> Iterator[str]:
    """Serve ``app`` on a free port of 127.0.0.1 and yield its base URL.

    The socket is bound before uvicorn starts (no race for the port). On exit the server is
    asked to stop and its thread joined; ``TimeoutError`` if it does not start in time.
    """
    # IPPROTO_TCP, not the default 0: asyncio sets TCP_NODELAY only on sockets whose proto
    # says TCP, and without it every small response waits ~40 ms (Nagle + delayed ACK).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="demo-server", daemon=True
    )
    thread.start()
    try:
        deadline = time.monotonic() + startup_timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise TimeoutError(f"demo server did not start within {startup_timeout} s")
            time.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@dataclass(frozen=True)
class Attempt:
    """One request made by :func:`polite_get`; ``at`` is seconds since the first one."""

    at: float
    status: int
    retry_after: str | None
    ratelimit: str | None
    waited: float


def polite_get(
    client: httpx.Client,
    url: str,
    *,
    max_attempts: int = 5,
    jitter: float = 0.5,
    rng: random.Random | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> list[Attempt]:
    """GET ``url`` until it is not 429, at most ``max_attempts`` times.

    After a 429 it waits ``Retry-After * (1 + U(0, jitter))`` seconds: never earlier than
    the server asked, and spread out so a crowd refused together does not return together.
    Returns every attempt made.
    """
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
    if jitter < 0:
        raise ValueError(f"jitter must be >= 0, got {jitter}")
    rng = rng or random.Random()
    attempts: list[Attempt] = []
    start = time.monotonic()
    waited = 0.0
    for _ in range(max_attempts):
        response = client.get(url)
        attempts.append(
            Attempt(
                round(time.monotonic() - start, 3),
                response.status_code,
                response.headers.get("retry-after"),
                response.headers.get("ratelimit"),
                round(waited, 3),
            )
        )
        if response.status_code != 429:
            break
        waited = float(response.headers.get("retry-after", "1")) * (1 + rng.uniform(0, jitter))
        sleep(waited)
    return attempts
