"""Token buckets per key, in process: a :class:`~course_lib.rate_limiting.middleware.Limiter`
that needs no Redis.

Guarantees, for one ``KeyedTokenBucket`` in one process:

- Each key has its own :class:`TokenBucket` (``capacity``, ``refill_rate``), with that
  class's guarantees: thread-safe, monotonic clock, never more than capacity + refill.
- Memory is bounded: at most ``max_keys`` buckets are kept. When a new key arrives at the
  bound, the least recently used bucket is dropped; that key starts full again if it
  returns, so the bound must exceed the number of clients active within one refill time
  (``capacity / refill_rate``) for the limit to hold for all of them.
- Like any in-process limiter it knows nothing of other processes: N workers admit N times
  the rate. Use the Redis limiters for a limit shared by processes or servers.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from course_lib.validation import positive_int, positive_number

from .decision import Decision
from .token_bucket import TokenBucket

__all__ = ["KeyedTokenBucket"]


class KeyedTokenBucket:
    """``hit(key, cost=1)`` against the bucket of ``key``; see the module docstring."""

    def __init__(
        self,
        capacity: int,
        refill_rate: float,
        *,
        max_keys: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.quota = positive_int("capacity", capacity)
        self.refill_rate = positive_number("refill_rate", refill_rate)
        self.max_keys = positive_int("max_keys", max_keys)
        if not callable(clock):
            raise TypeError(f"clock must be callable, got {type(clock).__name__}")
        self.window = self.quota / self.refill_rate
        """Seconds an empty bucket takes to refill: the ``w`` of ``RateLimit-Policy``."""
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def __len__(self) -> int:
        with self._lock:
            return len(self._buckets)

    def _bucket(self, key: str) -> TokenBucket:
        with self._lock:
            bucket = self._buckets.get(key)
            if bucket is None:
                if len(self._buckets) >= self.max_keys:
                    self._buckets.popitem(last=False)
                bucket = TokenBucket(self.quota, self.refill_rate, clock=self._clock)
                self._buckets[key] = bucket
            else:
                self._buckets.move_to_end(key)
            return bucket

    def hit(self, key: str, cost: int = 1) -> Decision:
        """Take ``cost`` tokens from ``key``'s bucket if they are all there.

        ``TypeError`` for a key that is not a string; ``ValueError`` for a cost that could
        never be admitted (negative, or above ``capacity``).
        """
        if not isinstance(key, str):
            raise TypeError(f"key must be a str, got {type(key).__name__}")
        return self._bucket(key).consume(cost)

    def __repr__(self) -> str:
        return (
            f"KeyedTokenBucket(capacity={self.quota}, refill_rate={self.refill_rate:g}/s, "
            f"keys={len(self)}/{self.max_keys})"
        )
