"""An in-process token bucket that is safe to share between threads.

Guarantees, for one ``TokenBucket`` object in one process:

- Never admits more than ``capacity + refill_rate * elapsed`` tokens over any period: the
  refill and the take happen under one lock, so concurrent threads cannot both spend the
  same token.
- Reads a monotonic clock by default, so wall-clock steps (NTP corrections, a laptop waking
  up) neither lock the bucket nor refill it. An injected clock that does go backwards is
  treated as no time passing.
- Knows nothing about other processes: N processes with a bucket each admit N times the
  rate. For a limit shared by several processes or servers, use the Redis limiters.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from course_lib.validation import positive_number

from .decision import Decision

__all__ = ["TokenBucket"]

_COST_TYPES = (int, float)
"""What a cost may be (``bool`` aside): built once, not on every call."""


class TokenBucket:
    """``capacity`` tokens, refilled continuously at ``refill_rate`` tokens per second."""

    __slots__ = ("_capacity", "_clock", "_last", "_lock", "_rate", "_tokens")

    def __init__(
        self,
        capacity: float,
        refill_rate: float,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._capacity = positive_number("capacity", capacity)
        self._rate = positive_number("refill_rate", refill_rate)
        if not callable(clock):
            raise TypeError(f"clock must be callable, got {type(clock).__name__}")
        self._clock = clock
        self._lock = threading.Lock()
        self._tokens = self._capacity
        self._last = clock()

    @property
    def capacity(self) -> float:
        return self._capacity

    @property
    def refill_rate(self) -> float:
        return self._rate

    @property
    def tokens(self) -> float:
        """Tokens available now (refilled up to the current time, nothing consumed)."""
        with self._lock:
            elapsed = self._clock() - self._last
            return min(self._capacity, self._tokens + max(elapsed, 0.0) * self._rate)

    def consume(self, tokens: float = 1.0) -> Decision:
        """Take ``tokens`` if they are all available; otherwise take nothing.

        Raises ``ValueError`` if ``tokens`` is negative, NaN or larger than ``capacity`` (such
        a request could never be admitted; within 1e-9 of a full bucket, the float rounding
        allowance, it takes the whole bucket), ``TypeError`` if it is not a number (``True``
        is not a number of tokens).
        """
        # Plain ints and floats: checked on every call, so not with the general
        # numbers.Real check of course_lib.validation, which costs a third of a decision.
        if isinstance(tokens, bool) or not isinstance(tokens, _COST_TYPES):
            raise TypeError(f"tokens must be an int or a float, got {type(tokens).__name__}")
        if not tokens >= 0.0:  # NaN fails every comparison
            raise ValueError(self._impossible(tokens))
        # The bucket counts in floats (capacity, rate, level, the default cost), so each
        # step below is float arithmetic.
        with self._lock:  # the refill and the take as one step
            now = self._clock()
            elapsed = now - self._last
            self._last = now
            level = self._tokens
            if elapsed > 0.0:  # an injected clock that steps back counts as no time passing
                level += elapsed * self._rate
                if level > self._capacity:
                    level = self._capacity
            # 1e-9: float refills accumulate rounding error; that close to a token is a token.
            allowed = tokens <= level + 1e-9
            if allowed:
                level = level - tokens if level > tokens else 0.0
            self._tokens = level
        reset_after = (self._capacity - level) / self._rate
        if allowed:
            return Decision(True, int(level), 0.0, reset_after)
        # A cost above capacity is never admitted, so it is looked for among refusals only.
        if tokens > self._capacity:
            raise ValueError(self._impossible(tokens))
        return Decision(False, int(level), (tokens - level) / self._rate, reset_after)

    def _impossible(self, tokens: float) -> str:
        return f"tokens must be between 0 and capacity={self._capacity:g}, got {tokens}"
