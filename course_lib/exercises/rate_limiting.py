"""Exercises of notebook 03 (rate limiting); each checker runs the student's code for real.

- :func:`check_window_counter`: an in-process sliding window counter per client,
  thread-safe (checked with a thread switch forced between every bytecode of the student's
  code) and unmoved by a clock stepping back.
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
from course_lib.concurrency import admission_count, hammer_threads, switch_between_bytecodes

from .result import CheckResult, failed, not_attempted, passed

__all__ = ["check_atomic_limiter", "check_retry_delays", "check_window_counter"]


def _attempted(fn: Callable[[], Any], exercise: str, what: str) -> tuple[bool, Any]:
    try:
        return True, fn()
    except NotImplementedError:
        return False, not_attempted(exercise, what)


def _code_file(method: Any) -> str | None:
    """The source file of a function or bound method (a notebook cell has its own)."""
    function = getattr(method, "__func__", method)
    code = getattr(function, "__code__", None)
    return None if code is None else code.co_filename


def check_window_counter(make_limiter: Callable[..., Any]) -> CheckResult:
    """``make_limiter(limit, window, clock)`` returns an object whose ``allow(key)`` is
    truthy when a request of client ``key`` is admitted by a sliding window counter:
    windows aligned on the clock (``start = now - now % window``), a request admitted if
    ``previous * (1 - (now - start) / window) + current + 1 <= limit``, counts kept per key,
    and a clock reading earlier than the latest time the limiter saw counting as that time.

    Checked on a manual clock (limit 10, window 2 s): a full window, another key, the
    previous window's weight at half and a quarter of the next, a long idle, a clock stepping
    back an hour; then exactness from 8 threads on a frozen clock with a thread switch
    forced between every bytecode of the student's code, so an answer without a lock fails
    every time (not only when a switch happens to land in its read-modify-write).
    """
    name = "check_window_counter"
    clock = ManualClock(1000.0)
    ok, limiter = _attempted(lambda: make_limiter(10, 2.0, clock), name, "implement make_limiter")
    if not ok:
        return limiter

    def burst(key: str, n: int) -> int:
        return sum(bool(limiter.allow(key)) for _ in range(n))

    expectations = []
    try:
        expectations.append(
            ("window 1000-1002 s, limit 10: 12 requests of 'a'", 10, burst("a", 12))
        )
        expectations.append(("same instant, another client 'b'", 10, burst("b", 12)))
        clock.set(1003.0)  # previous window held 10 and weighs 0.5: 5 + current + 1 <= 10
        expectations.append(("t=1003 s, previous window 10 at weight 0.5", 5, burst("a", 8)))
        clock.set(1004.5)  # previous held 5, weight 0.75: 3.75 + current + 1 <= 10
        expectations.append(("t=1004.5 s, previous window 5 at weight 0.75", 6, burst("a", 10)))
        clock.set(1010.0)  # two whole windows idle: nothing carries over
        expectations.append(("t=1010 s, after two idle windows", 10, burst("a", 12)))
        clock.advance(-3600)
        expectations.append(
            ("clock stepped back 1 h (counts as no time passing)", 0, burst("a", 3))
        )
        clock.advance(1.0)
        expectations.append(("1 s after the step, still before t=1010 s", 0, burst("a", 3)))
    except NotImplementedError:
        return not_attempted(name, "implement allow")
    except Exception as exc:
        return failed(name, f"allow raised {type(exc).__name__}: {exc}")
    for what, expected, got in expectations:
        if got != expected:
            return failed(name, f"{what}: expected {expected} allowed, got {got}")

    frozen = make_limiter(50, 2.0, ManualClock(0.0))
    filename = _code_file(frozen.allow)
    if filename is None:
        return failed(name, "allow must be a Python function or method")
    try:
        with switch_between_bytecodes(filename):
            allowed = hammer_threads(lambda: frozen.allow("shared"), threads=8, calls=30)
    except RuntimeError as exc:
        return failed(name, f"allow raised under 8 threads: {exc}")
    if allowed != 50:
        return failed(
            name,
            f"8 threads x 30 calls on one key, limit 50: allowed {allowed}, not 50 "
            "(the check and the increment must happen as one step: a lock)",
        )
    return passed(
        name,
        "window weights, per-key counts and a 1 h clock step exact; 8 threads with a "
        "switch between every bytecode allowed exactly 50",
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
