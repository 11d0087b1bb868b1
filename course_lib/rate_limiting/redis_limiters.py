"""The five Redis limiters of the course, each one Lua script (``*.lua`` beside it).

=======================  =================================  ================  ==========
limiter                  state per key                      accuracy          memory
=======================  =================================  ================  ==========
``FixedWindow``          string "window start:count"        2x at the edge    constant
``SlidingWindowLog``     sorted set: one entry per unit     exact             O(limit)
``SlidingWindowCounter`` string "start:current:previous"    approximate       constant
``RedisTokenBucket``     string "micro-tokens:time"         exact bucket      constant
``GCRA``                 one integer (theoretical arrival)  exact bucket      constant
=======================  =================================  ================  ==========

Small state is packed into one string so a decision is ``TIME`` + ``GET`` + ``SET ... PX``:
every extra command inside a script costs about a microsecond of server time.

All share :class:`~course_lib.rate_limiting.redis_base.RedisLimiter`: ``hit(key, cost=1)``
and ``hit_many(...)`` return :class:`~course_lib.rate_limiting.decision.Decision`, one round
trip each, server time, hash-tagged keys, a documented ``fail_open`` default.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from typing import ClassVar

import redis

from course_lib.validation import positive_int, positive_number

from .redis_base import RedisLimiter

__all__ = [
    "GCRA",
    "MAX_BUCKET_CAPACITY",
    "FixedWindow",
    "RedisTokenBucket",
    "SlidingWindowCounter",
    "SlidingWindowLog",
]

Clock = Callable[[], float] | None

MAX_BUCKET_CAPACITY = 10**9
"""Largest ``RedisTokenBucket`` capacity: its script counts micro-tokens (1e15 at most)."""
_MAX_SPAN_US = 10**15
"""Largest GCRA ``burst / rate`` in microseconds (about 31 years): epoch time plus the span
must stay an exact integer in Lua's doubles (below 2^53, about 9e15)."""


def _window_us(window: object) -> int:
    seconds = positive_number("window", window)
    micros = round(seconds * 1_000_000)
    if micros < 1000:
        raise ValueError(f"window must be at least 1 ms, got {window}")
    return micros


class _WindowLimiter(RedisLimiter):
    """Shared constructor of the limiters configured by ``limit`` units per ``window`` s."""

    default_prefix: ClassVar[str]

    def __init__(
        self,
        redis: redis.Redis,
        limit: int,
        window: float,
        *,
        prefix: str | None = None,
        fail_open: bool = True,
        clock: Clock = None,
    ) -> None:
        self.quota = self.limit = positive_int("limit", limit)
        self._window_us = _window_us(window)
        self.window = self._window_us / 1_000_000
        self._params = (self.limit, self._window_us)
        super().__init__(
            redis,
            prefix=self.default_prefix if prefix is None else prefix,
            fail_open=fail_open,
            clock=clock,
        )


class FixedWindow(_WindowLimiter):
    """At most ``limit`` units per window of ``window`` seconds aligned on multiples of the
    window (since the epoch, or since 0 of an injected clock). Cheap and simple, but a
    client can spend ``limit`` at the end of one window and ``limit`` again at the start of
    the next: up to ``2 * limit`` within one window length."""

    script = "fixed_window"

    default_prefix = "rl:fw"


class _Nonces:
    """Per-process unique tokens for log members; reseeded in a forked child so two
    processes never share a sequence."""

    def __init__(self) -> None:
        self.reseed()

    def reseed(self) -> None:
        self._prefix = os.urandom(4).hex()
        self._counter = itertools.count()

    def next(self) -> str:
        return f"{self._prefix}{next(self._counter):x}"


_NONCES = _Nonces()
os.register_at_fork(after_in_child=_NONCES.reseed)


class SlidingWindowLog(_WindowLimiter):
    """Exactly at most ``limit`` units in any ``window`` seconds: every admitted unit is a
    sorted-set entry scored by its time. Exact, at the price of memory proportional to the
    limit. Members are unique (time, per-call nonce, index in the call, unit), so requests
    arriving in the same microsecond, or repeated in one batch, are all counted."""

    script = "sliding_window_log"

    default_prefix = "rl:swl"

    def _nonce(self) -> str:
        return _NONCES.next()


class SlidingWindowCounter(_WindowLimiter):
    """Cloudflare's approximation of a sliding window: the current fixed window's count
    plus the previous window's count weighted by its overlap with the sliding window.
    Constant memory; exact when traffic is evenly spread over the previous window, off by
    at most the previous window's unevenness otherwise."""

    script = "sliding_window_counter"

    default_prefix = "rl:swc"


class RedisTokenBucket(RedisLimiter):
    """``capacity`` tokens per key refilled at ``refill_rate`` tokens per second, shared by
    every process that uses the same Redis: over any period of ``t`` seconds at most
    ``capacity + refill_rate * t`` units are admitted. A full bucket is deleted (no key =
    full), so idle clients cost no memory."""

    script = "token_bucket"
    quota_name = "capacity"

    def __init__(
        self,
        redis: redis.Redis,
        capacity: int,
        refill_rate: float,
        *,
        prefix: str = "rl:tb",
        fail_open: bool = True,
        clock: Clock = None,
    ) -> None:
        self.quota = self.capacity = positive_int("capacity", capacity)
        if self.capacity > MAX_BUCKET_CAPACITY:
            # the script counts micro-tokens in Lua doubles, exact only below 2^53
            raise ValueError(f"capacity must be <= {MAX_BUCKET_CAPACITY:.0e}, got {self.capacity}")
        self.refill_rate = positive_number("refill_rate", refill_rate)
        self.window = self.capacity / self.refill_rate
        self._params = (self.capacity, repr(self.refill_rate))
        super().__init__(redis, prefix=prefix, fail_open=fail_open, clock=clock)


class GCRA(RedisLimiter):
    """Generic cell rate algorithm, the token bucket of redis-cell and Stripe-style limiters:
    ``rate`` requests per second on average, up to ``burst`` at once, stored as one integer
    per key (the theoretical arrival time). Same admissions as a token bucket of capacity
    ``burst`` refilled at ``rate``."""

    script = "gcra"
    quota_name = "burst"

    def __init__(
        self,
        redis: redis.Redis,
        rate: float,
        burst: int,
        *,
        prefix: str = "rl:gcra",
        fail_open: bool = True,
        clock: Clock = None,
    ) -> None:
        self.rate = positive_number("rate", rate)
        self.quota = self.burst = positive_int("burst", burst)
        exact = 1_000_000 / self.rate
        interval = round(exact)
        # The script keeps whole microseconds (Lua doubles are exact below 2^53, and epoch
        # time in nanoseconds is not): refuse a rate the rounding would change by over 1 %.
        if interval < 1 or abs(interval - exact) > 0.01 * exact:
            raise ValueError(
                f"rate must be such that 1/rate is a whole number of microseconds within "
                f"1 % (at most about 1e4 per second unless it divides 1e6), got {rate}"
            )
        if self.burst * interval > _MAX_SPAN_US:
            raise ValueError(
                f"burst / rate must be at most {_MAX_SPAN_US / 1e6:.0e} s, "
                f"got burst={burst}, rate={rate}"
            )
        self._interval_us = interval
        self.window = self.burst / self.rate
        self._params = (interval, self.burst)
        super().__init__(redis, prefix=prefix, fail_open=fail_open, clock=clock)
