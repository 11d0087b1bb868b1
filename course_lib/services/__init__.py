"""One place that hands out connections to the course's Redis and PostgreSQL.

Every notebook, test and benchmark calls these functions instead of hard-coding addresses, so
the same code runs against the servers of a CI machine, a URL the user exported, or the
embedded servers the course starts on a laptop that has none (see
:mod:`course_lib.services.resolve` for the order).

Guarantees: the choice is made once per process and reused; an explicitly set URL that does
not answer raises :class:`ServiceError` naming it; embedded servers listen on Unix sockets
only and are shared by every process of the user.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio
from sqlalchemy import Engine, create_engine

from course_lib.validation import one_of, positive_number

from .clients import (
    PoolExhaustedError,
    fail_fast_async_redis,
    fail_fast_redis,
    pool_exhausted,
    redis_unavailable,
)
from .database import connect
from .embedded import EmbeddedPostgres, EmbeddedRedis, state_dir
from .errors import ServiceError
from .resolve import Resolution, mask, resolve_postgres, resolve_redis
from .schema import drop_schema, schema_engine, unique_schema

__all__ = [
    "EmbeddedPostgres",
    "EmbeddedRedis",
    "PoolExhaustedError",
    "Resolution",
    "ServiceError",
    "ServiceStatus",
    "connect",
    "database_url",
    "drop_schema",
    "engine",
    "fail_fast_async_client",
    "fail_fast_async_redis",
    "fail_fast_client",
    "fail_fast_redis",
    "pool_exhausted",
    "redis_client",
    "redis_unavailable",
    "redis_url",
    "reset",
    "resolution",
    "schema_engine",
    "start_embedded",
    "state_dir",
    "status",
    "stop_embedded",
    "unique_schema",
]

_RESOLVERS: dict[str, Callable[[], Resolution]] = {
    "redis": resolve_redis,
    "postgres": resolve_postgres,
}
_cache: dict[str, Resolution] = {}
_cache_lock = threading.Lock()


def resolution(service: str) -> Resolution:
    """Where ``service`` (``"redis"`` or ``"postgres"``) comes from; decided once per process."""
    one_of("service", service, tuple(_RESOLVERS))
    with _cache_lock:
        if service not in _cache:
            _cache[service] = _RESOLVERS[service]()
        return _cache[service]


def reset() -> None:
    """Forget the choices made so far (after changing the environment, e.g. in tests)."""
    with _cache_lock:
        _cache.clear()


def redis_url() -> str:
    """URL of the course's Redis (``redis://``, ``rediss://`` or ``unix://``)."""
    return resolution("redis").url


def redis_client(**kwargs: Any) -> redis.Redis:
    """A new ``redis.Redis`` for the course's Redis; ``kwargs`` go to ``Redis.from_url``."""
    return redis.Redis.from_url(redis_url(), **kwargs)


def fail_fast_client(
    *, timeout: float = 0.5, max_connections: int = 50, pool_timeout: float = 5.0
) -> redis.Redis:
    """:func:`fail_fast_redis` on the course's Redis: the client to give a rate limiter or
    a cache (no retries, ``timeout`` per reply, a bounded pool whose full-pool wait ends
    after ``pool_timeout`` s in :class:`PoolExhaustedError`, never read as an outage)."""
    return fail_fast_redis(
        redis_url(), timeout=timeout, max_connections=max_connections, pool_timeout=pool_timeout
    )


def fail_fast_async_client(
    *, timeout: float = 0.5, max_connections: int = 50, pool_timeout: float = 5.0
) -> redis.asyncio.Redis:
    """:func:`fail_fast_async_redis` on the course's Redis: the ``redis.asyncio`` client to
    give the asyncio limiters (:mod:`course_lib.rate_limiting.aio`) and caches, with the
    guarantees of :func:`fail_fast_client`."""
    return fail_fast_async_redis(
        redis_url(), timeout=timeout, max_connections=max_connections, pool_timeout=pool_timeout
    )


def database_url() -> str:
    """SQLAlchemy URL (``postgresql+psycopg://...``) of the course's PostgreSQL database."""
    return resolution("postgres").url


def engine(**kwargs: Any) -> Engine:
    """A new SQLAlchemy ``Engine`` on psycopg 3; keep it, it owns a connection pool.

    ``pool_pre_ping`` is on unless overridden, so a restarted server costs one retry, not
    an error. ``kwargs`` go to ``create_engine``.
    """
    kwargs.setdefault("pool_pre_ping", True)
    return create_engine(database_url(), **kwargs)


@dataclass(frozen=True)
class ServiceStatus:
    """What ``course doctor`` reports for one service."""

    service: str
    ok: bool
    source: str
    reason: str
    url: str
    version: str
    latency_ms: float | None
    error: str = ""


def _rtt_ms(call: Callable[[], object], rounds: int = 7) -> float:
    call()
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        call()
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples)


def _redis_status(timeout: float) -> ServiceStatus:
    chosen = resolution("redis")
    # Bounded: a server that accepts the connection and never answers costs ``timeout``,
    # not redis-py's default retries with backoff (or no connect timeout at all).
    client = fail_fast_redis(chosen.url, timeout=timeout)
    try:
        version = str(client.info("server")["redis_version"])
        latency = _rtt_ms(client.ping)
    finally:
        client.close()
    return ServiceStatus(
        "redis", True, chosen.source, chosen.reason, mask(chosen.url), version, latency
    )


def _postgres_status(timeout: float) -> ServiceStatus:
    chosen = resolution("postgres")

    def probe() -> tuple[str, float]:
        with connect(chosen.url, connect_timeout=max(1, round(timeout))) as conn:
            version = conn.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
            return str(version), _rtt_ms(lambda: conn.execute("SELECT 1").fetchone())

    # libpq's connect_timeout ends only the connecting, and psycopg has no timeout for a
    # reply: a server that accepts the connection and then hangs (stopped, stalled) would
    # block forever. So the probe runs in a daemon thread, waited for ``timeout`` seconds;
    # one that is still waiting then is left to end when the server answers or the
    # process exits.
    outcome: dict[str, Any] = {}
    done = threading.Event()

    def run() -> None:
        try:
            outcome["value"] = probe()
        except Exception as exc:  # reported by the caller's thread
            outcome["error"] = exc
        finally:
            done.set()

    threading.Thread(target=run, name="postgres-status", daemon=True).start()
    if not done.wait(timeout):
        raise ServiceError(f"PostgreSQL did not answer within {timeout:g} s ({mask(chosen.url)})")
    if "error" in outcome:
        raise outcome["error"]
    version, latency = outcome["value"]
    return ServiceStatus(
        "postgres", True, chosen.source, chosen.reason, mask(chosen.url), version, latency
    )


def status(*, timeout: float = 5.0) -> list[ServiceStatus]:
    """Per service: the source chosen and why, server version, median round trip in ms.

    Never raises for an unreachable service: it is reported with ``ok=False`` and the error.
    A server that accepts connections but never answers (Redis or PostgreSQL) is reported
    after ``timeout`` seconds (> 0).
    """
    positive_number("timeout", timeout)
    report = []
    for service, probe in (("redis", _redis_status), ("postgres", _postgres_status)):
        try:
            report.append(probe(timeout))
        except Exception as exc:  # the contract is to report, whatever went wrong
            error = mask(str(exc)) or type(exc).__name__
            report.append(ServiceStatus(service, False, "-", "-", "-", "-", None, error))
    return report


def start_embedded() -> dict[str, str]:
    """Start (or reuse) both embedded servers; return their URLs."""
    return {
        "redis": EmbeddedRedis.default().start(),
        "postgres": EmbeddedPostgres.default().start(),
    }


def stop_embedded() -> dict[str, bool]:
    """Stop both embedded servers; return which ones were running."""
    return {
        "redis": EmbeddedRedis.default().stop(),
        "postgres": EmbeddedPostgres.default().stop(),
    }
