"""The live HTTP demo of notebook 03: a small rate-limited app (``GET /``) to serve with
:func:`course_lib.http.serve` and call with :func:`~course_lib.rate_limiting.polite_get`."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from ..middleware import KeyFunc, Limiter, RateLimitMiddleware, api_key_or_ip

__all__ = ["DEMO_API_KEYS", "demo_app"]

DEMO_API_KEYS = frozenset({"alice", "bob"})
"""The API keys :func:`demo_app` knows; any other ``X-API-Key`` is limited by IP."""


def demo_app(limiter: Limiter, *, key: KeyFunc | None = None) -> RateLimitMiddleware:
    """``GET /`` answers ``{"ok": true}``, limited per known ``X-API-Key``
    (:data:`DEMO_API_KEYS`), else per IP.

    Build ``limiter`` on :func:`~course_lib.services.fail_fast_redis` so a
    dead Redis costs each request at most its timeout before ``fail_open`` answers.
    """

    async def home(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    app = Starlette(routes=[Route("/", home)])
    return RateLimitMiddleware(app, limiter, key=key or api_key_or_ip(DEMO_API_KEYS))
