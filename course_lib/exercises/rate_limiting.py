"""Exercises of notebook 03 (rate limiting); each checker runs the student's code for real.

- :func:`check_token_bucket`: a thread-safe token bucket that survives clock steps.
- :func:`check_atomic_limiter`: a Redis limiter that admits exactly the limit under
  8 threads x 2 processes and leaves no key without a TTL, also when the connection drops
  between two of its commands (the checker drops it there on purpose).
- :func:`check_retry_delays`: a client back-off that honours ``Retry-After``, grows with
  repeated refusals up to a cap, and spreads a crowd of refused clients out with jitter.
"""

from __future__ import annotations

import contextlib
import random
import statistics
import time
import uuid
from collections.abc import Callable
from typing import Any

import redis

from course_lib import services
from course_lib.clocks import ManualClock
from course_lib.concurrency import admission_count, hammer_threads
from course_lib.rate_limiting.lesson.races import Yielding

from .result import CheckResult, failed, not_attempted, passed

__all__ = ["check_atomic_limiter", "check_retry_delays", "check_token_bucket"]


def _attempted(fn: Callable[[], Any], exercise: str, what: str) -> tuple[bool, Any]:
    try:
        return True, fn()
    except NotImplementedError:
        return False, not_attempted(exercise, what)


def check_token_bucket(make_bucket: Callable[..., Any]) -> CheckResult:
    """``make_bucket(capacity, refill_rate, clock)`` returns an object whose
    ``consume(tokens=1)`` is truthy when allowed. Checked: refill arithmetic on a manual
    clock, a clock stepping back an hour, and exactly ``capacity`` admissions from 8
    threads on a frozen clock."""
    name = "check_token_bucket"
    clock = ManualClock(1000.0)
    ok, bucket = _attempted(lambda: make_bucket(5, 2.0, clock), name, "implement make_bucket")
    if not ok:
        return bucket
    try:
        first = [bool(bucket.consume()) for _ in range(6)]
        clock.advance(0.5)
        after_half_second = [bool(bucket.consume()) for _ in range(2)]
        clock.advance(100)
        after_idle = sum(bool(bucket.consume()) for _ in range(8))
        clock.advance(-3600)
        at_step = bool(bucket.consume())
        clock.advance(1.0)
        after_step_back = sum(bool(bucket.consume()) for _ in range(3))
    except NotImplementedError:
        return not_attempted(name, "implement consume")
    if first != [True] * 5 + [False]:
        return failed(name, f"capacity 5: expected 5 allowed then 1 denied, got {first}")
    if after_half_second != [True, False]:
        return failed(name, f"0.5 s at 2 tokens/s refills 1 token, got {after_half_second}")
    if after_idle != 5:
        return failed(
            name, f"after 100 s idle the bucket holds capacity=5, it allowed {after_idle}"
        )
    if at_step:
        return failed(
            name,
            "clock stepped back 1 h with the bucket empty: the request at the step was "
            "allowed (a clock running backwards must count as no time passing)",
        )
    if after_step_back != 2:
        return failed(
            name,
            "clock stepped back 1 h, then 1 s passed at 2 tokens/s: expected 2 allowed, "
            f"got {after_step_back}",
        )
    frozen = make_bucket(Yielding(100), Yielding(1.0), ManualClock(0.0))
    try:
        allowed = hammer_threads(frozen.consume, threads=8, calls=100)
    except RuntimeError as exc:
        return failed(name, f"consume raised under 8 threads: {exc}")
    if allowed != 100:
        return failed(name, f"8 threads x 100 calls, capacity 100: allowed {allowed}, not 100")
    return passed(
        name,
        "refill and capacity exact, survives a 1 h clock step, 8 threads allowed exactly 100",
    )


# Commands that run as one step inside Redis: the connection cannot drop half-way through one.
_ATOMIC = frozenset({"EVAL", "EVALSHA", "EVAL_RO", "EVALSHA_RO", "FCALL", "FCALL_RO"})


class _DropsAfterCommand(redis.Redis):
    """A client whose connection "drops" right after its ``n``-th command on ``key`` (or on a
    key containing it, as a limiter's per-window keys do) has run in Redis: the command took
    effect, the caller gets a ``ConnectionError`` and its next commands never run, as when a
    process dies or a network link fails between two commands.

    A script (``EVAL``/``EVALSHA``/``FCALL``) or a ``MULTI``/``EXEC`` pipeline is one step
    (pipelines do not go through this client's ``execute_command``), so it is never cut.
    """

    def __init__(self, other: redis.Redis, key: str, n: int) -> None:
        super().__init__(connection_pool=other.connection_pool)
        self._key = key.encode()
        self._n = n
        self.seen = 0
        self.dropped_after: str | None = None

    def _touches(self, args: tuple[Any, ...]) -> bool:
        return any(
            self._key in (a.encode() if isinstance(a, str) else a)
            for a in args
            if isinstance(a, str | bytes)
        )

    def execute_command(self, *args: Any, **options: Any) -> Any:
        result = super().execute_command(*args, **options)
        command = str(args[0]).upper() if args else ""
        if self.dropped_after is None and command not in _ATOMIC and self._touches(args[1:]):
            self.seen += 1
            if self.seen == self._n:
                self.dropped_after = command
                raise redis.ConnectionError(
                    f"connection dropped by the checker after {command} (staged failure)"
                )
        return result


def _immortal_after_drop(
    allow: Callable[[redis.Redis, str, int, int], bool],
    client: redis.Redis,
    token: str,
    limit: int,
    window: int,
) -> str | None:
    """Cut the connection after the 1st, 2nd, ... separate command ``allow`` sends for a fresh
    key, until a call completes uncut; describe the cut after which a key was left without a
    TTL, or return ``None`` when every cut left its keys expiring (or absent)."""
    for n in range(1, 11):
        key = f"{token}:drop{n:02d}"  # zero-padded: no key contains another one
        dying = _DropsAfterCommand(client, key, n)
        with contextlib.suppress(redis.ConnectionError):
            allow(dying, key, limit, window)
        if any(client.ttl(k) == -1 for k in client.scan_iter(match=f"*{key}*", count=1000)):
            return f"{dying.dropped_after} (separate command {n} of the call)"
        if dying.dropped_after is None:
            return None
    return None


def _seconds_to_boundary(client: redis.Redis, window: float) -> float:
    seconds, micros = client.time()
    return window - (seconds + micros / 1e6) % window


def check_atomic_limiter(allow: Callable[[redis.Redis, str, int, int], bool]) -> CheckResult:
    """``allow(client, key, limit, window_seconds)`` returns ``True`` to admit. Run from
    8 threads in each of 2 processes (400 attempts, limit 50, window 3600 s): exactly 50
    must be admitted, and every key it created must expire within the window. Then the
    connection is dropped after each of its separate commands in turn: no drop may leave a
    key without a TTL (``INCR`` then a separate ``EXPIRE`` does, after the ``INCR``)."""
    name = "check_atomic_limiter"
    limit, window = 50, 3600
    token = f"ex03:{uuid.uuid4().hex[:10]}"
    client = services.redis_client()
    try:
        ok, first = _attempted(
            lambda: allow(client, f"{token}:probe", limit, window), name, "implement allow"
        )
        if not ok:
            return first
        left = _seconds_to_boundary(client, window)
        if left < 10:  # a window aligned on the clock may roll over mid-check: start after it
            time.sleep(left + 0.05)

        def make_decide() -> Callable[[], object]:
            own = services.redis_client()
            return lambda: allow(own, f"{token}:client", limit, window)

        admitted = admission_count(make_decide, processes=2, threads=8, attempts=400).allowed
        keys = list(client.scan_iter(match=f"*{token}*", count=1000))
        ttls = {k: client.ttl(k) for k in keys}
        cut_after = _immortal_after_drop(allow, client, token, limit, window)
    finally:
        leftovers = list(client.scan_iter(match=f"*{token}*", count=1000))
        if leftovers:
            client.delete(*leftovers)
        client.close()
    if admitted != limit:
        return failed(name, f"400 concurrent attempts, limit {limit}: admitted {admitted}")
    immortal = sorted(k.decode() for k, ttl in ttls.items() if not 0 < ttl <= window)
    if immortal:
        return failed(name, f"{len(immortal)} key(s) without a TTL within the window")
    if cut_after is not None:
        return failed(
            name,
            f"the connection dropped right after {cut_after} and left the counter "
            "without a TTL: it never resets, so that client stays refused for ever once it hits "
            "the limit. Create the key and its expiry in one atomic step (a Lua script or "
            "MULTI/EXEC)",
        )
    return passed(
        name,
        f"8 threads x 2 processes: admitted exactly {limit} of 400; keys expire, "
        "also when the connection drops mid-call",
    )


# The back-off's cap: however many refusals in a row, a client comes back within a minute.
MAX_DELAY = 60.0


def _busiest_slot(waits: list[float]) -> int:
    """The most retries landing in one 100 ms slot."""
    slots: dict[int, int] = {}
    for w in waits:
        slots[int(w * 10)] = slots.get(int(w * 10), 0) + 1
    return max(slots.values())


def check_retry_delays(delay: Callable[[float, int, random.Random], float]) -> CheckResult:
    """``delay(retry_after, attempt, rng)`` is how long a client waits after its
    ``attempt``-th 429 in a row. 200 clients are refused together with ``Retry-After: 2``:
    on the first refusal each must wait at least 2 s and at most 6 s; on every attempt 1..5
    and 30, never less than 2 s, at most ``MAX_DELAY`` (60 s), with no 100 ms slot holding
    more than 20 % of the retries; and the median wait must grow with the attempt, attempt 5
    waiting at least twice as long as attempt 1."""
    name = "check_retry_delays"
    rng = random.Random(3)
    attempts = (1, 2, 3, 4, 5, 30)
    ok, waits = _attempted(
        lambda: {a: [float(delay(2.0, a, rng)) for _ in range(200)] for a in attempts},
        name,
        "implement delay",
    )
    if not ok:
        return waits
    first = waits[1]
    late = sum(w > 6.0 for w in first)
    if late:
        return failed(
            name, f"{late} of 200 clients waited more than 6 s (3x Retry-After) on attempt 1"
        )
    medians: dict[int, float] = {}
    for attempt, ws in waits.items():
        early = sum(w < 2.0 for w in ws)
        if early:
            return failed(
                name,
                f"{early} of 200 clients came back before Retry-After (2 s) on attempt {attempt}",
            )
        over = max(ws)
        if over > MAX_DELAY:
            return failed(
                name,
                f"attempt {attempt}: a client waits {over:.0f} s; cap the back-off "
                f"at {MAX_DELAY:.0f} s (a client refused 30 times must still come back)",
            )
        busiest = _busiest_slot(ws)
        if busiest > 40:
            return failed(
                name,
                f"{busiest} of 200 retries land in one 100 ms slot on attempt {attempt}: "
                "add jitter",
            )
        medians[attempt] = statistics.median(ws)
    shrinks = [a for a in range(2, 6) if medians[a] < medians[a - 1]]
    if shrinks or medians[5] < 2 * medians[1]:
        shown = ", ".join(f"{medians[a]:.1f}" for a in range(1, 6))
        return failed(
            name,
            f"median waits on attempts 1..5: {shown} s; the delay must grow with repeated "
            "refusals (attempt 5 at least 2x attempt 1), or the refused crowd keeps "
            "coming back at the same pace",
        )
    shown = ", ".join(f"{medians[a]:.1f}" for a in range(1, 6))
    return passed(
        name,
        f"never before Retry-After, capped at {MAX_DELAY:.0f} s, jittered; "
        f"median waits on attempts 1..5: {shown} s",
    )
