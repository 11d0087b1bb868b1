"""The token bucket as notebook 03 teaches it: the algorithm in a dozen plain lines.

:class:`course_lib.rate_limiting.TokenBucket` is the same algorithm with argument checks and
a :class:`~course_lib.rate_limiting.Decision` for an answer; the notebook measures what
they cost.
"""

from __future__ import annotations

import threading
import time

__all__ = ["PlainTokenBucket"]


class PlainTokenBucket:
    def __init__(self, capacity: float, refill_rate: float, clock=time.monotonic) -> None:
        self.capacity, self.rate, self.clock = capacity, refill_rate, clock
        self.tokens, self.last = capacity, clock()
        self.lock = threading.Lock()  # refill and take happen as one step

    def consume(self, tokens: float = 1) -> bool:
        with self.lock:
            now = self.clock()  # monotonic: never steps back
            elapsed = max(0.0, now - self.last)  # an injected clock that does counts as 0
            self.tokens = min(self.capacity, self.tokens + elapsed * self.rate)
            self.last = now
            if self.tokens >= tokens:
                self.tokens -= tokens
                return True
            return False
