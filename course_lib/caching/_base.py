"""What the sync and asyncio cache-aside share: validation, key names, payloads, stats, health.

Nothing here talks to Redis; :mod:`course_lib.caching.cache_aside` does.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from course_lib.redis_errors import redis_unavailable
from course_lib.validation import positive_number

from .serialization import dumps, loads
from .xfetch import Envelope, should_refresh

__all__ = [
    "MISSING",
    "STAMPEDE_MODES",
    "CacheCore",
    "LoaderError",
    "RedisHealth",
    "Stats",
    "Ticket",
]

log = logging.getLogger("course_lib.caching")

STAMPEDE_MODES = (None, "local", "lock", "xfetch")
STAT_NAMES = (
    "hits",
    "misses",
    "loads",
    "load_errors",
    "stale_fills_rejected",
    "lock_waits",
    "lock_timeouts",
    "early_refreshes",
    "fail_open",
    "redis_errors",
    "decode_errors",
)
# What a value that is not ours (another writer, another stampede mode, bad bytes) raises.
DECODE_ERRORS = (ValueError, TypeError)
# XFetch payloads start with a byte no JSON text starts with, so neither mode can take the
# other's payload for a value of its own, whatever shape the cached values have.
XFETCH_PREFIX = b"\x00xfetch:"
MISSING: Any = object()  # a cached value that could not be decoded: treated as a miss
# How long an invalidation is remembered (at least the TTL); a load that took longer is
# returned but not cached, since an invalidation during it may have been forgotten.
INVALIDATION_TTL_MIN = 60.0
# Long enough for every waiter polling the lock to see the leader's error once.
ERROR_TTL_MS = 2000
FIRST_POLL = 0.001
MAX_POLL = 0.02


class LoaderError(RuntimeError):
    """The loader raised in another process that held the lock; the message says what."""


@dataclass(frozen=True)
class Ticket:
    """A reservation to fill ``key``: the Redis server time (microseconds, as a decimal
    string) at which the load began; an invalidation at or after it refuses the fill."""

    key: Any
    started: str


class Stats:
    """Thread-safe counters; ``snapshot()`` is the mapping exposed as ``cache.stats``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(STAT_NAMES, 0)

    def incr(self, name: str, by: int = 1) -> None:
        with self._lock:
            self._counts[name] += by

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


def check_namespace(name: str, value: str) -> str:
    """A key prefix: no braces, since the user's key in braces is each key's Redis Cluster
    hash tag, and a brace of the prefix would take its place (putting a value and its
    invalidation record in different slots)."""
    if "{" in value or "}" in value:
        raise ValueError(f"{name} must not contain '{{' or '}}' (hash tag braces), got {value!r}")
    return value


def _milliseconds(name: str, value: Any) -> float:
    """A TTL sent to Redis in whole milliseconds (``PX``), so at least 1 ms."""
    seconds = positive_number(name, value)
    if seconds < 0.001:
        raise ValueError(f"{name} must be >= 0.001 seconds (Redis counts whole ms), got {value!r}")
    return seconds


class CacheCore:
    """What a cache-aside is, apart from its I/O: validated settings, key names, payload
    format, counters, the loader and the Redis health. :class:`CacheAside` and
    :class:`AsyncCacheAside` share it, so both behave the same."""

    def __init__(
        self,
        loader: Callable[..., Any],
        *,
        ttl: float,
        namespace: str,
        stampede: str | None,
        negative_ttl: float | None,
        lock_ttl: float,
        wait_timeout: float,
        beta: float,
        retry_after: float,
        rng: random.Random | None,
    ) -> None:
        if not callable(loader):
            raise TypeError(f"loader must be callable, got {type(loader).__name__}")
        self.ttl = _milliseconds("ttl", ttl)
        if not isinstance(namespace, str):
            raise TypeError(f"namespace must be a string, got {type(namespace).__name__}")
        if not namespace.strip():
            raise ValueError("namespace must be a non-empty string")
        check_namespace("namespace", namespace)
        if stampede not in STAMPEDE_MODES:
            raise ValueError(f"stampede must be one of {STAMPEDE_MODES}, got {stampede!r}")
        self.negative_ttl = _milliseconds(
            "negative_ttl", min(self.ttl, 30.0) if negative_ttl is None else negative_ttl
        )
        self.lock_ttl = _milliseconds("lock_ttl", lock_ttl)
        self.wait_timeout = positive_number("wait_timeout", wait_timeout)
        self.beta = positive_number("beta", beta)
        self.retry_after = positive_number("retry_after", retry_after)
        self.loader = loader
        self.namespace = namespace
        self.stampede = stampede
        self.distributed = stampede in ("lock", "xfetch")
        self.xfetch = stampede == "xfetch"
        self.rng = rng if rng is not None else random.Random()
        self.invalidation_ttl_ms = int(max(self.ttl, INVALIDATION_TTL_MIN) * 1000)
        self.lock_ms = int(self.lock_ttl * 1000)
        self.stats = Stats()
        self.health = RedisHealth(namespace, self.retry_after, self.stats)

    # Key names. The value key is "<namespace>:{<key>}"; metadata lives under
    # "<namespace>#...:{<key>}". The braces are a Redis Cluster hash tag: every key of one
    # user key hashes to the same slot, so the scripts and the MGET that touch several of
    # them run on one node (on a single Redis they are just characters of the name).
    def value_key(self, key: Any) -> str:
        return f"{self.namespace}:{{{key}}}"

    def invalidation_key(self, key: Any) -> str:
        return f"{self.namespace}#inv:{{{key}}}"

    def lock_key(self, key: Any) -> str:
        return f"{self.namespace}#lock:{{{key}}}"

    def error_key(self, key: Any, token: str) -> str:
        return f"{self.namespace}#err:{{{key}}}:{token}"

    # Payloads.
    def encode(self, value: Any, delta: float) -> tuple[bytes, int]:
        """Bytes to store and their TTL in ms (``None`` values get the negative TTL)."""
        ttl = self.negative_ttl if value is None else self.ttl
        if self.xfetch:
            envelope = Envelope(value, delta, time.time() + ttl).to_json()
            return XFETCH_PREFIX + dumps(envelope), int(ttl * 1000)
        return dumps(value), int(ttl * 1000)

    def decode(self, raw: bytes, *, count: bool = True) -> Any:
        """The value in ``raw``, or :data:`MISSING` (counted in ``decode_errors`` unless
        ``count`` is false: a re-read of a value already counted) if it is not ours to read:
        bad bytes, or a value of a cache in another stampede mode under the same namespace.
        It then costs a reload and is overwritten, never an exception."""
        try:
            return _envelope(raw).value if self.xfetch else loads(raw)
        except DECODE_ERRORS:
            if count:
                self.stats.incr("decode_errors")
            return MISSING

    def wants_early_refresh(self, raw: bytes) -> tuple[Any, bool]:
        """XFetch: the cached value (or :data:`MISSING`) and whether to refresh it now."""
        try:
            envelope = _envelope(raw)
        except DECODE_ERRORS:
            self.stats.incr("decode_errors")
            return MISSING, False
        refresh = should_refresh(
            now=time.time(),
            delta=envelope.delta,
            expiry=envelope.expiry,
            beta=self.beta,
            rng=self.rng,
        )
        return envelope.value, refresh

    def load(self, key: Any) -> tuple[Any, float]:
        self.stats.incr("loads")
        start = time.perf_counter()
        try:
            value = self.loader(key)
        except Exception:
            self.stats.incr("load_errors")
            raise
        return value, time.perf_counter() - start


class RedisHealth:
    """Whether a cache should use Redis now: fail open, log once per outage, and skip Redis
    for ``retry_after`` seconds after a failure that says the server cannot serve."""

    def __init__(self, namespace: str, retry_after: float, stats: Stats) -> None:
        self.namespace = namespace
        self.retry_after = retry_after
        self.stats = stats
        self.down_until = 0.0
        self._log_lock = threading.Lock()
        self._warned = False
        self._error_types_logged: set[type] = set()

    def bypassing(self) -> bool:
        return bool(self.down_until) and time.monotonic() < self.down_until

    def failed(self, exc: BaseException) -> None:
        """Count a Redis error. A connection error or timeout starts an outage (Redis is
        skipped for ``retry_after`` s, logged once), and so does any reply saying the server
        cannot serve now (out of memory, read-only replica, loading, ...; see
        :func:`course_lib.redis_errors.redis_unavailable`); any other error concerns one command."""
        self.stats.incr("redis_errors")
        if not redis_unavailable(exc):
            with self._log_lock:
                first = type(exc) not in self._error_types_logged
                self._error_types_logged.add(type(exc))
            if first:
                log.warning(
                    "Redis error (%s); cache %r serves such calls from the loader",
                    describe(exc),
                    self.namespace,
                )
            return
        self.down_until = time.monotonic() + self.retry_after
        with self._log_lock:
            first, self._warned = not self._warned, True
        if first:
            log.warning(
                "Redis unreachable (%s); cache %r serves from the loader", exc, self.namespace
            )

    def recovered(self) -> None:
        self.down_until = 0.0
        with self._log_lock:
            was_down, self._warned = self._warned, False
        if was_down:
            log.warning("Redis reachable again; cache %r resumes", self.namespace)


def _envelope(raw: bytes | str) -> Envelope:
    if isinstance(raw, str):  # a client with decode_responses=True
        raw = raw.encode()
    if not raw.startswith(XFETCH_PREFIX):
        raise ValueError("not an XFetch payload")
    return Envelope.from_json(loads(raw[len(XFETCH_PREFIX) :]))


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
