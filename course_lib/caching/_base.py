"""What the caching patterns share: key prefixes, counters, Redis health and error text.

Nothing here talks to Redis.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable

from course_lib.redis_errors import redis_unavailable

__all__ = ["RedisHealth", "Stats", "check_namespace", "describe"]

log = logging.getLogger("course_lib.caching")


class Stats:
    """Thread-safe counters of ``names``; ``snapshot()`` is the mapping a cache exposes."""

    def __init__(self, names: Iterable[str]) -> None:
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(names, 0)

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
        """Whether Redis is skipped now (an outage began less than ``retry_after`` s ago)."""
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
        """Redis answered: end the outage, if there was one (logged once)."""
        if not self.down_until:
            return
        self.down_until = 0.0
        with self._log_lock:
            was_down, self._warned = self._warned, False
        if was_down:
            log.warning("Redis reachable again; cache %r resumes", self.namespace)


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
