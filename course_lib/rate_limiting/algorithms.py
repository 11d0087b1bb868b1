"""The five Redis limiters of the course, each one Lua script (``*.lua`` beside it): their
sans-I/O cores (constructor arguments, checks, the script's parameters).

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

Each core is a :class:`~course_lib.rate_limiting.redis_base.LimiterCore` (keys, arguments,
decisions, the ``fail_open`` policy; no I/O). The limiters to use put a shell on it:
:mod:`course_lib.rate_limiting.redis_limiters` for a blocking client,
:mod:`course_lib.rate_limiting.aio` for an asyncio one. ``hit(key, cost=1)`` and
``hit_many(...)`` return :class:`~course_lib.rate_limiting.decision.Decision`, one round
trip each, server time, hash-tagged keys, a documented ``fail_open`` default.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from typing import Any, ClassVar

from course_lib.validation import positive_int, positive_number

from .redis_base import LimiterCore

__all__ = [
    "MAX_BUCKET_CAPACITY",
    "FixedWindowCore",
    "GCRACore",
    "RedisTokenBucketCore",
    "SlidingWindowCounterCore",
    "SlidingWindowLogCore",
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


class _WindowCore(LimiterCore):
    """Shared constructor of the limiters configured by ``limit`` units per ``window`` s."""

    default_prefix: ClassVar[str]

    def __init__(
        self,
        redis: Any,
        limit: int,
        window: float,
        *,
        prefix: str | None = None,
        fail_open: bool = True,
        clock: Clock = None,
    ) -> None:
        self.quota = self.limit = positive_int("limit", limit)
        window_us = _window_us(window)
        self.window = window_us / 1_000_000
        self._params = (self.limit, window_us)
        super().__init__(
            redis,
            prefix=self.default_prefix if prefix is None else prefix,
            fail_open=fail_open,
            clock=clock,
        )


class FixedWindowCore(_WindowCore):
    """At most ``limit`` units per window of ``window`` seconds aligned on multiples of the
    window (since the epoch, or since 0 of an injected clock). Cheap and simple, but a
    client can spend ``limit`` at the end of one window and ``limit`` again at the start of
    the next: up to ``2 * limit`` within one window length."""

    script_name = "fixed_window"

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


class SlidingWindowLogCore(_WindowCore):
    """Exactly at most ``limit`` units in any ``window`` seconds: every admitted unit is a
    sorted-set entry scored by its time. Exact, at the price of memory proportional to the
    limit. Members are unique (time, per-call nonce, index in the call, unit), so requests
    arriving in the same microsecond, or repeated in one batch, are all counted."""

    script_name = "sliding_window_log"

    default_prefix = "rl:swl"

    def _nonce(self) -> str:
        return _NONCES.next()


class SlidingWindowCounterCore(_WindowCore):
    """Cloudflare's approximation of a sliding window: the current fixed window's count
    plus the previous window's count weighted by its overlap with the sliding window.
    Constant memory; exact when traffic is evenly spread over the previous window, off by
    at most the previous window's unevenness otherwise."""

    script_name = "sliding_window_counter"

    default_prefix = "rl:swc"


class RedisTokenBucketCore(LimiterCore):
    """``capacity`` tokens per key refilled at ``refill_rate`` tokens per second, shared by
    every process that uses the same Redis: over any period of ``t`` seconds at most
    ``capacity + refill_rate * t`` units are admitted. A full bucket is deleted (no key =
    full), so idle clients cost no memory."""

    script_name = "token_bucket"
    quota_name = "capacity"

    def __init__(
        self,
        redis: Any,
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


class GCRACore(LimiterCore):
    """Generic cell rate algorithm, the token bucket of redis-cell and Stripe-style limiters:
    ``rate`` requests per second on average, up to ``burst`` at once, stored as one integer
    per key (the theoretical arrival time). Same admissions as a token bucket of capacity
    ``burst`` refilled at ``rate``."""

    script_name = "gcra"
    quota_name = "burst"

    def __init__(
        self,
        redis: Any,
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
        self.window = self.burst / self.rate
        self._params = (interval, self.burst)
        super().__init__(redis, prefix=prefix, fail_open=fail_open, clock=clock)
