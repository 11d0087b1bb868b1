"""The rate limiters of the seed module (section "Rate Limiting"), as written.

Kept faithful on purpose so the notebook can run them and show where they break: the token
bucket reads the wall clock (``time.time()``) and updates its state without a lock; the
sliding window issues four separate Redis commands and uses the timestamp as the sorted-set
member. The only adaptation: the seed uses a global ``cache`` client that it never defines,
so ``is_rate_limited`` takes it as a keyword argument.
"""

import time

import redis

__all__ = ["TokenBucket", "is_rate_limited"]


class TokenBucket:
    def __init__(self, capacity, refill_rate):
        self.capacity = capacity
        self.tokens = capacity
        self.refill_rate = refill_rate  # tokens/second
        self.last_refill = time.time()

    def consume(self, tokens=1):
        # Refill tokens
        now = time.time()
        elapsed = now - self.last_refill
        self.tokens = min(self.capacity, self.tokens + elapsed * self.refill_rate)
        self.last_refill = now

        # Consume
        if self.tokens >= tokens:
            self.tokens -= tokens
            return True

        return False  # Rate limit exceeded


def is_rate_limited(user_id, max_requests=100, window=60, *, cache: redis.Redis):
    """100 requests por 60 segundos"""
    key = f"rate_limit:{user_id}"
    now = time.time()

    # Remove requests antigas
    cache.zremrangebyscore(key, 0, now - window)

    # Conta requests no window
    count = cache.zcard(key)

    if count >= max_requests:
        return True  # Rate limited

    # Adiciona request atual
    cache.zadd(key, {now: now})
    cache.expire(key, window)

    return False
