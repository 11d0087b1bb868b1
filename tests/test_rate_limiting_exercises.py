"""Each checker of notebook 03 passes the reference solution and fails planted wrong answers
(one per property it checks, the lock-free ones included)."""

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
    check_window_counter,
)
from course_lib.exercises.result import CheckResult


class ReferenceCounter:
    """The reference answer of exercise 1: a sliding window counter per key, one lock."""

    def __init__(self, limit, window, clock):
        self.limit, self.window, self.clock = limit, window, clock
        self.latest = clock()
        self.counts = {}  # key -> (window start, current count, previous count)
        self.lock = threading.Lock()

    def allow(self, key):
        with self.lock:
            now = max(self.clock(), self.latest)  # a clock stepping back counts as no time
            self.latest = now
            start = now - now % self.window
            since, current, previous = self.counts.get(key, (start, 0, 0))
            if since != start:
                previous = current if since == start - self.window else 0
                current = 0
            weight = 1 - (now - start) / self.window
            allowed = previous * weight + current + 1 <= self.limit
            self.counts[key] = (start, current + allowed, previous)
            return allowed


class UnlockedCounter(ReferenceCounter):
    """Right arithmetic, no lock."""

    def allow(self, key):
        now = max(self.clock(), self.latest)
        self.latest = now
        start = now - now % self.window
        since, current, previous = self.counts.get(key, (start, 0, 0))
        if since != start:
            previous = current if since == start - self.window else 0
            current = 0
        weight = 1 - (now - start) / self.window
        allowed = previous * weight + current + 1 <= self.limit
        self.counts[key] = (start, current + allowed, previous)
        return allowed


class FloatUnlockedCounter(UnlockedCounter):
    """No lock, every number converted with float() first: the checker's thread switches
    are forced between bytecodes, not carried by the numbers, so conversion strips nothing."""

    def __init__(self, limit, window, clock):
        super().__init__(float(limit), float(window), lambda: float(clock()))


class LockPerCallCounter(ReferenceCounter):
    """A lock, but a new one per call: it excludes nobody."""

    def allow(self, key):
        self.lock = threading.Lock()
        return super().allow(key)


class FixedWindowCounter(ReferenceCounter):
    """Ignores the previous window: a fixed window."""

    def allow(self, key):
        with self.lock:
            now = max(self.clock(), self.latest)
            self.latest = now
            start = now - now % self.window
            since, current, _ = self.counts.get(key, (start, 0, 0))
            current = current if since == start else 0
            allowed = current + 1 <= self.limit
            self.counts[key] = (start, current + allowed, 0)
            return allowed


class UnclampedCounter(ReferenceCounter):
    """Trusts a clock that steps back: an earlier window looks fresh."""

    def allow(self, key):
        self.latest = self.clock()
        return super().allow(key)


class OneCounterForAll(ReferenceCounter):
    """Counts every client in one counter."""

    def allow(self, key):
        return super().allow("everyone")


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


def _fails(result: CheckResult, reason: str) -> bool:
    """The checker failed, and for the reason the planted bug should cause."""
    return not result and reason in result.message


@pytest.mark.one_pass
def test_window_counter_checker_reports_what_failed(capsys: pytest.CaptureFixture[str]) -> None:
    assert not check_window_counter(UnclampedCounter)
    line = capsys.readouterr().out
    assert line.startswith("FAIL check_window_counter") and "clock stepped back 1 h" in line


@pytest.mark.one_pass
def test_window_counter_checker_passes_the_reference() -> None:
    assert check_window_counter(ReferenceCounter)


@pytest.mark.one_pass
@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (FixedWindowCounter, "previous window 10 at weight 0.5: expected 5 allowed, got 8"),
        (UnclampedCounter, "clock stepped back 1 h (counts as no time passing): expected 0"),
        (OneCounterForAll, "another client 'b': expected 10 allowed, got 0"),
        (LockPerCallCounter, "8 threads x 30 calls on one key, limit 50"),
    ],
    ids=["fixed window", "no clamp", "one counter", "lock per call"],
)
def test_window_counter_checker_fails_planted_answers(answer: type, reason: str) -> None:
    assert _fails(check_window_counter(answer), reason)


@pytest.mark.one_pass
@pytest.mark.parametrize("answer", [UnlockedCounter, FloatUnlockedCounter])
def test_window_counter_checker_refuses_a_lock_free_answer_every_time(answer: type) -> None:
    # every run, not by luck: a thread switch is forced between every bytecode of the answer
    for _ in range(5):
        assert _fails(check_window_counter(answer), "8 threads x 30 calls on one key")


@pytest.mark.one_pass
def test_window_counter_checker_needs_time_from_the_clock_it_is_given() -> None:
    class WallClock(ReferenceCounter):
        def __init__(self, limit, window, clock):
            super().__init__(limit, window, time.time)

    assert _fails(check_window_counter(WallClock), "expected")


def test_checkers_report_not_attempted(capsys: pytest.CaptureFixture[str]) -> None:
    def todo(*args):
        raise NotImplementedError

    assert not check_window_counter(todo)
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


@pytest.mark.one_pass
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
