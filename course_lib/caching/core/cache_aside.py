"""Cache-aside without I/O: key names, payloads, the stampede modes and the miss algorithm.

:class:`CacheAsideCore` is the whole algorithm of :class:`~course_lib.caching.CacheAside`
and :class:`~course_lib.caching.aio.AsyncCacheAside` as generators of steps
(:mod:`.steps`): each ``yield`` is one round trip, a pause or a call of the loader. The two
shells only take those steps, so they behave the same by construction; a test drives the
core by sending replies by hand, with no Redis. See :mod:`course_lib.caching.cache_aside`
for the guarantees.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from redis.exceptions import RedisError

from course_lib import lua
from course_lib.validation import function, positive_number, redis_ttl, text

from .._base import RedisHealth, Stats, check_namespace, describe
from ..serialization import dumps, loads
from ..single_flight import FlightTimeout
from ..xfetch import Envelope, should_refresh
from .lock import Backoff, LockNotOwned
from .steps import Command, Eval, Load, Pause, Shared, Steps, TryLock, Unlock

__all__ = [
    "MISSING",
    "STAMPEDE_MODES",
    "CacheAsideCore",
    "CacheAsideShell",
    "LoaderError",
    "LocalFlight",
    "NoProtection",
    "RedisMutex",
    "Stampede",
    "Ticket",
    "XFetch",
    "stampede_mode",
]

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
RELEASED: Any = object()  # the lock holder left without a value: compete for the lock again
# How long an invalidation is remembered by default (at least the TTL); a load that took
# longer is returned but not cached, since an invalidation during it may have been forgotten.
INVALIDATION_TTL_MIN = 60.0
# Long enough for every waiter polling the lock to see the leader's error once.
ERROR_TTL_MS = 2000

RESERVE = lua.load("course_lib.caching", "reserve")
FILL = lua.load("course_lib.caching", "fill")
INVALIDATE = lua.load("course_lib.caching", "invalidate")


class LoaderError(RuntimeError):
    """The loader raised in another process that held the lock; the message says what."""


@dataclass(frozen=True)
class Ticket:
    """A reservation to fill ``key``: the Redis server time (microseconds, as a decimal
    string) at which the load began; an invalidation at or after it refuses the fill."""

    key: Any
    started: str


# The stampede modes: what concurrent misses of one key do, and how values are stored.
class Stampede:
    """Base of the modes; as it is, no protection: every miss calls the loader."""

    name: str | None = None
    shares_loads = False  # concurrent misses of this process share one load
    across_processes = False  # ... and of every process, through the Redis lock

    def encode(self, value: Any, delta: float, ttl: float) -> bytes:
        """The payload of ``value``, loaded in ``delta`` s, cached for ``ttl`` s."""
        return dumps(value)

    def decode(self, raw: bytes | str) -> tuple[Any, bool]:
        """The value in ``raw`` and whether to refresh it now; ``ValueError``/``TypeError``
        if ``raw`` is not a payload of this mode."""
        return loads(raw), False

    def miss(self, cache: CacheAsideCore, key: Any) -> Steps[Any]:
        """What a miss of ``key`` does: here, load and fill, whoever else is loading it."""
        return cache.load_and_fill(key)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class NoProtection(Stampede):
    """``stampede=None``: N concurrent misses, N loads (the naive pattern)."""


class LocalFlight(Stampede):
    """``"local"``: single-flight within the process, so one load per process."""

    name = "local"
    shares_loads = True

    def miss(self, cache: CacheAsideCore, key: Any) -> Steps[Any]:
        return cache.shared_load(key, lambda: cache.load_and_fill(key))


class RedisMutex(LocalFlight):
    """``"lock"``: single-flight plus the Redis lock of the key, so one load across every
    process; the others poll for the value, up to ``wait_timeout``, then load themselves."""

    name = "lock"
    across_processes = True

    def miss(self, cache: CacheAsideCore, key: Any) -> Steps[Any]:
        return cache.shared_load(key, lambda: cache.load_under_lock(key))


class XFetch(RedisMutex):
    """``"xfetch"``: ``"lock"`` plus probabilistic early refresh (:mod:`..xfetch`): each
    payload carries its load time and expiry, and a reader may reload a hot key before it
    expires, so its readers never all miss at once."""

    name = "xfetch"

    def __init__(self, beta: float = 1.0, rng: random.Random | None = None) -> None:
        self.beta = positive_number("beta", beta)
        self.rng = rng if rng is not None else random.Random()

    def encode(self, value: Any, delta: float, ttl: float) -> bytes:
        return XFETCH_PREFIX + dumps(Envelope(value, delta, time.time() + ttl).to_json())

    def decode(self, raw: bytes | str) -> tuple[Any, bool]:
        if isinstance(raw, str):  # a client with decode_responses=True
            raw = raw.encode()
        if not raw.startswith(XFETCH_PREFIX):
            raise ValueError("not an XFetch payload")
        envelope = Envelope.from_json(loads(raw[len(XFETCH_PREFIX) :]))
        refresh = should_refresh(
            now=time.time(),
            delta=envelope.delta,
            expiry=envelope.expiry,
            beta=self.beta,
            rng=self.rng,
        )
        return envelope.value, refresh

    def __repr__(self) -> str:
        return f"XFetch(beta={self.beta})"


STAMPEDE_MODES = (None, "local", "lock", "xfetch")


def stampede_mode(
    stampede: Stampede | str | None, *, beta: float = 1.0, rng: random.Random | None = None
) -> Stampede:
    """The mode object for ``stampede``: one already, or one of :data:`STAMPEDE_MODES`."""
    if isinstance(stampede, Stampede):
        return stampede
    match stampede:
        case None:
            return NoProtection()
        case "local":
            return LocalFlight()
        case "lock":
            return RedisMutex()
        case "xfetch":
            return XFetch(beta, rng)
    raise ValueError(f"stampede must be a Stampede or one of {STAMPEDE_MODES}, got {stampede!r}")


class CacheAsideCore:
    """Validated settings, key names, payloads, counters, Redis health, and the algorithm."""

    def __init__(
        self,
        *,
        ttl: float,
        namespace: str,
        stampede: Stampede | str | None,
        negative_ttl: float | None,
        lock_ttl: float,
        wait_timeout: float,
        invalidation_ttl: float | None,
        beta: float,
        retry_after: float,
        rng: random.Random | None,
    ) -> None:
        self.ttl = redis_ttl("ttl", ttl)
        self.namespace = check_namespace("namespace", text("namespace", namespace))
        positive_number("beta", beta)
        self.mode = stampede_mode(stampede, beta=beta, rng=rng)
        self.negative_ttl = redis_ttl(
            "negative_ttl", min(self.ttl, 30.0) if negative_ttl is None else negative_ttl
        )
        self.lock_ttl = redis_ttl("lock_ttl", lock_ttl)
        self.wait_timeout = positive_number("wait_timeout", wait_timeout)
        self.invalidation_ttl = redis_ttl(
            "invalidation_ttl",
            max(self.ttl, INVALIDATION_TTL_MIN) if invalidation_ttl is None else invalidation_ttl,
        )
        self.retry_after = positive_number("retry_after", retry_after)
        self.stats = Stats(STAT_NAMES)
        self.health = RedisHealth(self.namespace, self.retry_after, self.stats)

    @property
    def flight_timeout(self) -> float:
        """How long a caller waits for this process's load of a key: a leader may itself
        wait for the Redis lock first."""
        return self.wait_timeout + (self.lock_ttl if self.mode.across_processes else 0)

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

    def read(self, raw: bytes | str, *, count: bool = True) -> tuple[Any, bool]:
        """The value in ``raw`` and whether to refresh it early; :data:`MISSING` (counted in
        ``decode_errors`` unless ``count`` is false: a re-read) if it is not ours to read
        (bad bytes, or another stampede mode's payload): it then costs a reload and is
        overwritten, never an exception."""
        try:
            return self.mode.decode(raw)
        except DECODE_ERRORS:
            if count:
                self.stats.incr("decode_errors")
            return MISSING, False

    # The algorithm.
    def get(self, key: Any) -> Steps[Any]:
        """The value of ``key``: from Redis, else from the loader (then cached)."""
        if self.health.bypassing():
            return (yield from self.without_redis(key))
        try:
            raw = yield Command("get", (self.value_key(key),))
        except RedisError as exc:
            return (yield from self.without_redis(key, exc))
        self.health.recovered()
        if raw is not None:
            value, refresh = self.read(raw)
            if value is not MISSING:
                self.stats.incr("hits")
                return (yield from self.refresh_early(key, value)) if refresh else value
        self.stats.incr("misses")
        return (yield from self.mode.miss(self, key))

    def shared_load(self, key: Any, load: Callable[[], Steps[Any]]) -> Steps[Any]:
        """``load()`` once for every concurrent miss of ``key`` in this process. Keyed by the
        Redis key: 1, 1.0 and True are equal in Python but name different Redis keys."""
        try:
            return (yield Shared(self.value_key(key), load))
        except FlightTimeout:
            self.stats.incr("lock_timeouts")
            return (yield from self.load_and_fill(key))

    def load_and_fill(self, key: Any) -> Steps[Any]:
        """A miss without the lock: reserve, load, fill (refused if invalidated meanwhile)."""
        try:
            ticket = yield from self.reserve(key)
        except RedisError as exc:
            return (yield from self.without_redis(key, exc))
        value, delta = yield from self.load(key)
        yield from self.fill_quietly(ticket, value, delta)
        return value

    def load_under_lock(self, key: Any) -> Steps[Any]:
        """A miss across processes: take the key's lock and load, or wait for the holder's
        value; if the holder leaves without one, compete again."""
        backoff = Backoff(self.wait_timeout)
        waited = False
        while True:
            try:
                token = yield TryLock(key)
            except RedisError as exc:
                return (yield from self.without_redis(key, exc))
            if token is not None:
                return (yield from self.holding(key, token, self.lead(key, token)))
            if not waited:
                waited = True
                self.stats.incr("lock_waits")
            value = yield from self.wait_for_holder(key, backoff)
            if value is not RELEASED:
                return value

    def wait_for_holder(self, key: Any, backoff: Backoff) -> Steps[Any]:
        """Poll the value, the lock and the holder's error record (one ``MGET``) until the
        value is cached (returned), the holder failed (its error raised), the lock is free
        without a value (:data:`RELEASED`), or the wait is over (then load without the lock)."""
        holder: str | None = None
        while True:
            keys = [self.value_key(key), self.lock_key(key)]
            if holder is not None:
                keys.append(self.error_key(key, holder))
            try:
                found = yield Command("mget", (keys,))
            except RedisError as exc:
                return (yield from self.without_redis(key, exc))
            if found[0] is not None:
                value, _ = self.read(found[0], count=False)
                if value is not MISSING:
                    return value
            if holder is not None and found[2] is not None:
                raise LoaderError(_text(found[2]))
            if found[1] is None:
                return RELEASED  # a rejected fill, or the lock expired
            holder = _text(found[1])
            pause = backoff.next_pause()
            if pause is None:
                self.stats.incr("lock_timeouts")
                return (yield from self.load_and_fill(key))
            yield Pause(pause)

    def lead(self, key: Any, token: str) -> Steps[Any]:
        """Holding the lock: load and fill, unless another process filled the key while we
        took the lock. A failed load leaves its error for the waiters, then is raised."""
        try:
            raw, started = yield Eval(RESERVE, [self.value_key(key)])
        except RedisError as exc:
            return (yield from self.without_redis(key, exc))
        if raw is not None:
            value, _ = self.read(raw, count=False)
            if value is not MISSING:
                return value
        try:
            value, delta = yield from self.load(key)
        except Exception as exc:
            record = (self.error_key(key, token), describe(exc))
            yield from self.quietly(Command("set", record, {"px": ERROR_TTL_MS}))
            raise
        yield from self.fill_quietly(Ticket(key, _text(started)), value, delta)
        return value

    def refresh_early(self, key: Any, current: Any) -> Steps[Any]:
        """XFetch chose this reader: reload now if no one else is, else serve ``current``.
        The cached value is still valid, so an optional refresh never fails the read."""
        try:
            token = yield TryLock(key)
        except RedisError as exc:
            self.health.failed(exc)
            return current
        if token is None:
            return current
        self.stats.incr("early_refreshes")
        try:
            return (yield from self.holding(key, token, self.load_and_fill_or_fail(key)))
        except Exception:
            return current

    def load_and_fill_or_fail(self, key: Any) -> Steps[Any]:
        """Reserve, load, fill, with any error raised (an early refresh gives up on it)."""
        ticket = yield from self.reserve(key)
        value, delta = yield from self.load(key)
        yield from self.fill(ticket, value, delta)
        return value

    def holding(self, key: Any, token: str, steps: Steps[Any]) -> Steps[Any]:
        """``steps`` under the lock of ``key``, released after them whatever they did. Unless
        the driver abandoned the algorithm (``GeneratorExit``): then no step can be taken,
        and the lock expires by itself after ``lock_ttl``."""
        try:
            result = yield from steps
        except GeneratorExit:
            raise
        except BaseException:
            yield from self.quietly(Unlock(key, token))
            raise
        yield from self.quietly(Unlock(key, token))
        return result

    def without_redis(self, key: Any, exc: BaseException | None = None) -> Steps[Any]:
        """Fail open: the loader's value, shared by this process's concurrent callers."""
        if exc is not None:
            self.health.failed(exc)
        self.stats.incr("fail_open")
        if not self.mode.shares_loads:
            return (yield from self.loaded_value(key))
        return (yield Shared(("fail-open", self.value_key(key)), lambda: self.loaded_value(key)))

    # The halves of a miss, and the invalidation.
    def reserve(self, key: Any) -> Steps[Ticket]:
        """Note the server time before the load begins."""
        _, started = yield Eval(RESERVE, [self.value_key(key)])
        return Ticket(key, _text(started))

    def fill(self, ticket: Ticket, value: Any, delta: float = 0.0) -> Steps[bool]:
        """Cache ``value`` unless ``ticket.key`` was invalidated since its reservation."""
        ttl = self.negative_ttl if value is None else self.ttl
        stored = yield Eval(
            FILL,
            [self.value_key(ticket.key), self.invalidation_key(ticket.key)],
            [ticket.started, self.mode.encode(value, delta, ttl), _ms(ttl), self.invalidation_ms],
        )
        if not stored:
            self.stats.incr("stale_fills_rejected")
        return bool(stored)

    def invalidate(self, key: Any) -> Steps[int]:
        """Delete ``key`` and refuse any fill from a load that began before; 1 if cached."""
        deleted = yield Eval(
            INVALIDATE,
            [self.value_key(key), self.invalidation_key(key)],
            [self.invalidation_ms],
        )
        return int(deleted)

    @property
    def invalidation_ms(self) -> int:
        return _ms(self.invalidation_ttl)

    def load(self, key: Any) -> Steps[tuple[Any, float]]:
        """The loader's value and how long it took (XFetch's ``delta``)."""
        self.stats.incr("loads")
        start = time.perf_counter()
        try:
            value = yield Load(key)
        except Exception:
            self.stats.incr("load_errors")
            raise
        return value, time.perf_counter() - start

    def loaded_value(self, key: Any) -> Steps[Any]:
        value, _ = yield from self.load(key)
        return value

    def fill_quietly(self, ticket: Ticket, value: Any, delta: float) -> Steps[None]:
        """Fill; a Redis error is counted, not raised (the caller has its value)."""
        try:
            yield from self.fill(ticket, value, delta)
        except RedisError as exc:
            self.health.failed(exc)

    def quietly(self, step: Command | Unlock) -> Steps[None]:
        """A best-effort step (the lock expires anyway, an error record is a courtesy)."""
        with contextlib.suppress(RedisError, LockNotOwned):
            yield step


def _text(raw: bytes | str) -> str:
    """A reply as text, whether the client decodes responses or not."""
    return raw.decode() if isinstance(raw, bytes) else raw


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


class CacheAsideShell:
    """What both shells are apart from their I/O: construction (every setting checked
    here), the settings, the counters and the key names. A shell adds ``get``,
    ``invalidate``, ``reserve``, ``fill`` and ``mutex``, each driving :attr:`core`."""

    def __init__(
        self,
        redis: Any,
        loader: Any,
        *,
        ttl: float,
        namespace: str,
        stampede: Stampede | str | None = "lock",
        negative_ttl: float | None = None,
        lock_ttl: float = 5.0,
        wait_timeout: float = 10.0,
        invalidation_ttl: float | None = None,
        beta: float = 1.0,
        retry_after: float = 1.0,
        rng: random.Random | None = None,
    ) -> None:
        # beta and rng are XFetch's: stampede="xfetch" builds XFetch(beta, rng); a mode
        # object passed as stampede carries its own.
        self.loader = function("loader", loader)
        self.core = CacheAsideCore(
            ttl=ttl,
            namespace=namespace,
            stampede=stampede,
            negative_ttl=negative_ttl,
            lock_ttl=lock_ttl,
            wait_timeout=wait_timeout,
            invalidation_ttl=invalidation_ttl,
            beta=beta,
            retry_after=retry_after,
            rng=rng,
        )
        self.redis = redis
        self.flight = self.flight_type(timeout=self.core.flight_timeout)

    @property
    def namespace(self) -> str:
        return self.core.namespace

    @property
    def ttl(self) -> float:
        return self.core.ttl

    @property
    def mode(self) -> Stampede:
        """The stampede mode object (:class:`RedisMutex` for ``stampede="lock"``, ...)."""
        return self.core.mode

    @property
    def stampede(self) -> str | None:
        """The stampede mode's name: ``None``, ``"local"``, ``"lock"`` or ``"xfetch"``."""
        return self.core.mode.name

    @property
    def invalidation_ttl(self) -> float:
        """How long an invalidation is remembered (s); a load that took longer is not cached."""
        return self.core.invalidation_ttl

    @property
    def stats(self) -> dict[str, int]:
        """Counters: hits, misses, loads, load_errors, stale_fills_rejected, lock_waits,
        lock_timeouts, early_refreshes, fail_open, redis_errors, decode_errors."""
        return self.core.stats.snapshot()

    def key(self, key: Any) -> str:
        """The Redis key holding ``key``'s value."""
        return self.core.value_key(key)
