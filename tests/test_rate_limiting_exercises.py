"""Each checker of notebook 03 passes the reference solution and fails planted wrong answers."""

from __future__ import annotations

import random
import threading
import time

import pytest
import redis as redis_lib

from course_lib import lua
from course_lib.exercises.rate_limiting import (
    check_atomic_limiter,
    check_retry_delays,
    check_token_bucket,
)
from course_lib.exercises.result import CheckResult
from course_lib.rate_limiting.lesson import as_written


class ReferenceBucket:
    def __init__(self, capacity, refill_rate, clock=time.monotonic):
        self.capacity, self.rate, self.clock = capacity, refill_rate, clock
        self.tokens, self.last = capacity, clock()
        self.lock = threading.Lock()

    def consume(self, tokens=1):
        with self.lock:
            now = self.clock()
            elapsed = max(0.0, now - self.last)
            self.last = now
            self.tokens = min(self.capacity, self.tokens + elapsed * self.rate)
            if self.tokens >= tokens:
                self.tokens -= tokens
                return True
            return False


class UnlockedBucket(ReferenceBucket):
    def consume(self, tokens=1):
        now = self.clock()
        elapsed = max(0.0, now - self.last)
        self.last = now
        self.tokens = min(self.capacity, self.tokens + elapsed * self.rate)
        if self.tokens >= tokens:
            self.tokens -= tokens
            return True
        return False


REFERENCE_FIXED_WINDOW = """
local count = redis.call('INCR', KEYS[1])
if count == 1 then redis.call('EXPIRE', KEYS[1], ARGV[2]) end
return count <= tonumber(ARGV[1]) and 1 or 0
"""


FIXED_WINDOW = lua.Script("reference_fixed_window", REFERENCE_FIXED_WINDOW)


def reference_allow(client: redis_lib.Redis, key: str, limit: int, window: int) -> bool:
    return FIXED_WINDOW(client, [key], [limit, window]) == 1


def reference_delay(retry_after: float, attempt: int, rng: random.Random) -> float:
    # exponential back-off from Retry-After, capped at 30 s, then up to 100 % jitter on top
    base = min(30.0, retry_after * 2 ** (attempt - 1))
    return base * (1 + rng.uniform(0, 1))


class AbsoluteElapsedBucket(ReferenceBucket):
    """Refills by |elapsed|: a clock stepping back an hour fills it to the brim."""

    def consume(self, tokens=1):
        with self.lock:
            now = self.clock()
            elapsed = abs(now - self.last)
            self.last = now
            self.tokens = min(self.capacity, self.tokens + elapsed * self.rate)
            if self.tokens >= tokens:
                self.tokens -= tokens
                return True
            return False


def _fails(result: CheckResult, reason: str) -> bool:
    """The checker failed, and for the reason the planted bug should cause."""
    return not result and reason in result.message


def test_token_bucket_checker_reports_what_failed(capsys: pytest.CaptureFixture[str]) -> None:
    assert not check_token_bucket(lambda c, r, clock: AbsoluteElapsedBucket(c, r, clock))
    line = capsys.readouterr().out
    assert line.startswith("FAIL check_token_bucket") and "request at the step was allowed" in line


def test_token_bucket_checker() -> None:
    assert check_token_bucket(lambda c, r, clock: ReferenceBucket(c, r, clock))
    # the seed: its clock-step bug (a wall clock jumping back locks it for an hour)
    assert _fails(
        check_token_bucket(lambda c, r, clock: _seed_bucket(c, r, clock)),
        "expected 2 allowed, got 0",
    )
    # a lock is missing: the race lets more than the capacity through
    assert _fails(
        check_token_bucket(lambda c, r, clock: UnlockedBucket(c, r, clock)), "8 threads x 100"
    )


def _seed_bucket(capacity, refill_rate, clock):
    class Clocked(as_written.TokenBucket):
        def consume(self, tokens=1):
            from course_lib.clocks import replaced_time

            with replaced_time(as_written, clock):
                return super().consume(tokens)

    bucket = Clocked(capacity, refill_rate)
    bucket.last_refill = clock()
    return bucket


def test_checkers_report_not_attempted(capsys: pytest.CaptureFixture[str]) -> None:
    def todo(*args):
        raise NotImplementedError

    assert not check_token_bucket(todo)
    assert not check_atomic_limiter(todo)
    assert not check_retry_delays(todo)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and all("not attempted yet" in line for line in lines)


@pytest.mark.timeout(120)
def test_atomic_limiter_checker() -> None:
    assert check_atomic_limiter(reference_allow)

    def without_ttl(client, key, limit, window):
        return client.incr(key) <= limit

    assert _fails(check_atomic_limiter(without_ttl), "without a TTL")

    def always(client, key, limit, window):
        client.set(key, 1, ex=window)
        return True

    assert _fails(check_atomic_limiter(always), "admitted")

    def get_then_incr(client, key, limit, window):
        # read, decide, write: two round trips with room for others in between (the sleep
        # widens the gap so the race shows on every run, as it would under real load)
        if int(client.get(key) or 0) >= limit:
            return False
        time.sleep(0.005)
        pipe = client.pipeline()
        pipe.incr(key)
        pipe.expire(key, window)
        pipe.execute()
        return True

    assert _fails(check_atomic_limiter(get_then_incr), "admitted")


@pytest.mark.timeout(120)
def test_atomic_limiter_checker_drops_the_connection_between_commands() -> None:
    def incr_then_expire(client, key, limit, window):
        # exact under concurrency (INCR is atomic, the first caller sets the TTL), but a
        # connection lost between the two commands leaves a counter that never expires
        count = client.incr(key)
        if count == 1:
            client.expire(key, window)
        return count <= limit

    # redis-py sends incr() as INCRBY key 1
    assert _fails(
        check_atomic_limiter(incr_then_expire),
        "dropped right after INCRBY (separate command 1 of the call)",
    )

    def per_window_key(client, key, limit, window):
        # the same gap on a key derived from the one given (one counter per window)
        window_key = f"{key}:{int(time.time() // window)}"
        count = client.incr(window_key)
        if count == 1:
            client.expire(window_key, window)
        return count <= limit

    assert _fails(check_atomic_limiter(per_window_key), "dropped right after INCRBY")

    def expiry_first(client, key, limit, window):
        # two commands, but the key is born with its TTL: every drop leaves it expiring
        client.set(key, 0, ex=window, nx=True)
        return client.incr(key) <= limit

    assert check_atomic_limiter(expiry_first)

    def transaction(client, key, limit, window):
        pipe = client.pipeline(transaction=True)
        pipe.incr(key)
        pipe.expire(key, window)
        count, _ = pipe.execute()
        return count <= limit

    assert check_atomic_limiter(transaction)


def test_retry_delays_checker() -> None:
    assert check_retry_delays(reference_delay)
    # the old reference: jittered, never early, but the same pace however often refused
    flat = check_retry_delays(lambda retry_after, attempt, rng: retry_after * (1 + rng.random()))
    assert _fails(flat, "must grow with repeated refusals")
    uncapped = check_retry_delays(
        lambda retry_after, attempt, rng: retry_after * 2 ** (attempt - 1) * (1 + rng.random())
    )
    assert _fails(uncapped, "cap the back-off at 60 s")
    no_jitter = check_retry_delays(lambda retry_after, attempt, rng: retry_after)
    assert _fails(no_jitter, "add jitter")
    too_early = check_retry_delays(lambda retry_after, attempt, rng: rng.uniform(0, retry_after))
    assert _fails(too_early, "came back before Retry-After")
    assert _fails(
        check_retry_delays(lambda retry_after, attempt, rng: retry_after * 5), "waited more than"
    )
