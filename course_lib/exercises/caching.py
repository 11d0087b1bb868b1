"""Exercises of the caching notebook (01), checked against the real Redis.

- :func:`check_cache_aside`: ``get_user(r, key, load)`` — cache-aside with JSON and negative
  caching: one load per key, however many calls, also when the row does not exist; a 60 s TTL
  for a row, 5 s for ``None`` (a user created meanwhile shows up soon); and fail-open: with
  Redis unreachable it answers from ``load`` instead of raising.
- :func:`check_safe_release`: ``release(r, lock_key, token) -> bool`` — delete the lock only if
  it still holds ``token``, atomically: another client taking the lock between a ``GET`` and a
  ``DEL`` is staged on purpose, so a two-step release fails.
- :func:`check_single_flight`: ``get_once(key, fn)`` — concurrent calls for one key share one
  ``fn()`` call, its result or its exception, and the next call after a flight finished (a
  success or a failure) runs ``fn`` again: single flight is not a cache. The keys it passes
  hash slowly (:class:`SlowKey`), so a check-then-insert with no lock around it fails every
  time, not only when the interpreter happens to switch threads in between.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import redis

import course_lib.services as services
from course_lib.measure import run_threads

from .result import CheckResult, failed, not_attempted, passed

__all__ = ["SlowKey", "check_cache_aside", "check_safe_release", "check_single_flight"]


def _namespace(exercise: str) -> str:
    return f"ex01:{exercise}:{uuid.uuid4().hex[:8]}"


def _cleanup(r: Any, namespace: str) -> None:
    keys = list(r.scan_iter(match=f"{namespace}*", count=1000))
    if keys:
        r.delete(*keys)


class _RedisDown(redis.Redis):
    """A client whose every command fails as if the server were unreachable."""

    def execute_command(self, *args: Any, **options: Any) -> Any:
        raise redis.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")


def check_cache_aside(get_user: Callable[[Any, str, Callable[[str], Any]], Any]) -> CheckResult:
    """``get_user(r, key, load)`` must return ``load(key)``'s value, calling ``load`` once per
    key for 5 calls; store JSON, a found row for 60 s and a missing one (``None``) for 5 s;
    and answer from ``load`` when Redis is unreachable (fail open) instead of raising."""
    name = "check_cache_aside"
    r = services.redis_client()
    ns = _namespace("cache_aside")
    rows = {f"{ns}:user:1": {"id": 1, "name": "Ana"}, f"{ns}:user:2": None}
    ttls_expected = {f"{ns}:user:1": 60_000, f"{ns}:user:2": 5_000}
    loads: dict[str, int] = dict.fromkeys(rows, 0)

    def load(key: str) -> Any:
        loads[key] += 1
        return rows[key]

    try:
        for key, expected in rows.items():
            for _ in range(5):
                got = get_user(r, key, load)
                if got != expected:
                    return failed(
                        name, f"get_user(r, {key!r}, load) returned {got!r}, expected {expected!r}"
                    )
        raw = {key: r.get(key) for key in rows}
        ttls = {key: r.pttl(key) for key in rows}
        loads_before_outage = dict(loads)
        down = _RedisDown(connection_pool=r.connection_pool)
        outage_error: redis.RedisError | None = None
        try:
            during = [get_user(down, key, load) for key in rows]
        except redis.RedisError as exc:  # reported after the checks of the normal case
            outage_error, during = exc, []
    except NotImplementedError:
        return not_attempted(name, "write get_user")
    finally:
        _cleanup(r, ns)
        r.close()
    existing, missing = (loads_before_outage[key] for key in rows)
    if existing != 1:
        return failed(
            name, f"5 calls for an existing user called load {existing} times, expected 1"
        )
    if missing != 1:
        return failed(
            name,
            f"5 calls for a missing user called load {missing} times, expected 1 (cache None too)",
        )
    for key, value in raw.items():
        try:
            if value is None or json.loads(value) != rows[key]:
                return failed(
                    name, f"Redis holds {value!r} under {key!r}, not the JSON of {rows[key]!r}"
                )
        except ValueError:
            return failed(name, f"Redis holds {value!r} under {key!r}: not JSON")
    for key, pttl in ttls.items():
        want = ttls_expected[key]
        lowest = want - 10_000 if want > 10_000 else 1  # the calls above took some time
        if not lowest <= pttl <= want:
            shown = "no TTL" if pttl < 0 else f"a TTL of {pttl / 1000:.1f} s"
            what = "a found user" if rows[key] is not None else "a missing user (None)"
            return failed(name, f"{what} was cached with {shown}, expected {want // 1000} s")
    if outage_error is not None:
        return failed(
            name,
            f"with Redis unreachable get_user raised {type(outage_error).__name__}: a cache "
            "outage must cost latency, not availability (catch redis.RedisError, call load)",
        )
    if during != list(rows.values()) or sum(loads.values()) != 2 + len(rows):
        return failed(
            name,
            f"with Redis unreachable get_user returned {during!r}, "
            f"expected {list(rows.values())!r} from load",
        )
    return passed(
        name,
        "5 calls per key: 1 load for an existing user, 1 for a missing one; JSON; 60 s for a "
        "row, 5 s for None; answers from load while Redis is unreachable",
    )


class _TakenAfterGet(redis.Redis):
    """A client on which the lock is taken by another owner right after a ``GET`` of it
    reaches Redis: the moment a two-step release (``GET``, compare, ``DEL``) is exposed to.

    A script runs its ``GET`` inside Redis, so it never triggers this.
    """

    def __init__(self, other: redis.Redis, lock_key: str, new_owner: str) -> None:
        super().__init__(connection_pool=other.connection_pool)
        self._other = other
        self._lock_key = lock_key.encode()
        self._new_owner = new_owner
        self.raced = False

    def execute_command(self, *args: Any, **options: Any) -> Any:
        result = super().execute_command(*args, **options)
        command = str(args[0]).upper() if args else ""
        key = args[1] if len(args) > 1 else None
        if isinstance(key, str):
            key = key.encode()
        if command == "GET" and key == self._lock_key and not self.raced:
            self.raced = True
            self._other.set(self._lock_key, self._new_owner, px=10_000)
        return result


def check_safe_release(release: Callable[[Any, str, str], bool]) -> CheckResult:
    """``release(r, lock_key, token)`` deletes the lock only while it holds ``token``, in one
    atomic step: a lock taken by another client right after a separate ``GET`` must survive."""
    name = "check_safe_release"
    r = services.redis_client()
    ns = _namespace("release")
    key = f"{ns}:lock"
    racing = _TakenAfterGet(r, key, "new-owner")
    try:
        r.set(key, "someone-else", px=10_000)
        foreign = release(r, key, "my-token")
        still_there = r.get(key)
        r.set(key, "my-token", px=10_000)
        own = release(r, key, "my-token")
        gone = r.get(key) is None
        r.delete(key)
        absent = release(r, key, "my-token")
        r.set(key, "my-token", px=10_000)
        release(racing, key, "my-token")
        after_race = r.get(key)
    except NotImplementedError:
        return not_attempted(name, "write release")
    finally:
        _cleanup(r, ns)
        r.close()
    if foreign or still_there != b"someone-else":
        return failed(
            name,
            f"released a lock held by another token "
            f"(returned {foreign!r}, lock now {still_there!r})",
        )
    if not own or not gone:
        return failed(name, f"did not release our own lock (returned {own!r}, deleted: {gone})")
    if absent:
        return failed(name, "returned True for a lock that did not exist")
    if racing.raced and after_race != b"new-owner":
        return failed(
            name,
            "another client took the lock between your GET and your DEL, and your DEL deleted "
            "its lock: GET and DEL must run as one atomic step (a Lua script)",
        )
    return passed(
        name,
        "foreign token kept, own token released, missing lock reported False, "
        "a lock re-taken mid-release kept",
    )


class SlowKey:
    """A dictionary key whose hashing gives the other threads the CPU for ``pause`` seconds.

    CPython switches threads only between bytecodes, when the running thread blocks or its
    5 ms switch interval ends, so the gap between a dictionary lookup (``key in flights``)
    and the insert that follows it (``flights[key] = ...``) is rarely hit by luck: an unlocked
    check-then-insert passes most runs. Every lookup and insert hashes the key, so a key that
    sleeps while being hashed opens that gap every time, the way any I/O between a check and
    the write that depends on it would. Equal keys have equal hashes, as a key must.

    ``on_hash``, if given, is called (in the hashing thread) each time the key is hashed: a
    checker learns from it that a caller has reached its lookup.
    """

    def __init__(
        self, name: str, pause: float = 0.002, on_hash: Callable[[], None] | None = None
    ) -> None:
        self.name = name
        self.pause = pause
        self.on_hash = on_hash

    def __hash__(self) -> int:
        if self.on_hash is not None:
            self.on_hash()
        time.sleep(self.pause)
        return hash(self.name)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SlowKey) and other.name == self.name

    def __repr__(self) -> str:
        return f"SlowKey({self.name!r})"


def check_single_flight(get_once: Callable[[Any, Callable[[], Any]], Any]) -> CheckResult:
    """50 threads call ``get_once(key, fn)`` together: 1 call of ``fn``, all get its result;
    with a failing ``fn``: 1 call, all 50 raise within 6 s (``fn`` lasts until every caller
    has looked its key up, then 0.2 s). Once a flight has finished, the next call for its
    key calls ``fn`` again, after a success as after a failure. The keys are
    :class:`SlowKey`: an unlocked check-then-insert lets several threads lead, every run."""
    name = "check_single_flight"
    run = uuid.uuid4().hex[:8]
    callers: dict[str, set[int]] = {"ok": set(), "bad": set()}
    looked_up: dict[str, set[int]] = {"ok": set(), "bad": set()}
    everyone = {"ok": threading.Event(), "bad": threading.Event()}
    calls = {"ok": 0, "bad": 0}
    lock = threading.Lock()

    def lookup_by(which: str) -> Callable[[], None]:
        # A caller's thread hashing the key is inside get_once, at its lookup: once all 50
        # have got there, every one of them is concurrent with the flight.
        def note() -> None:
            me = threading.get_ident()
            with lock:
                if me in callers[which]:
                    looked_up[which].add(me)
                    if len(looked_up[which]) == 50:
                        everyone[which].set()

        return note

    key = SlowKey(f"ex01:flight:{run}", on_hash=lookup_by("ok"))
    bad_key = SlowKey(f"ex01:flight:{run}:bad", on_hash=lookup_by("bad"))

    def caller(which: str, flight_key: Any, fn: Callable[[], Any]) -> Callable[[], Any]:
        def call() -> Any:
            with lock:
                callers[which].add(threading.get_ident())
            return get_once(flight_key, fn)

        return call

    # fn holds its flight until all 50 callers have looked the key up (at most 4 s, for an
    # answer that never hashes the key), then 0.2 s more: on a busy machine a caller that
    # starts late still finds the flight, not its result.
    def slow() -> str:
        with lock:
            calls["ok"] += 1
        everyone["ok"].wait(4)
        time.sleep(0.2)
        return "value"

    def broken() -> str:
        with lock:
            calls["bad"] += 1
        everyone["bad"].wait(4)
        time.sleep(0.2)
        raise ConnectionError("database unavailable")

    try:
        get_once(SlowKey(f"ex01:flight:{run}:probe"), lambda: "probe")
    except NotImplementedError:
        return not_attempted(name, "write get_once")
    race = (
        "several callers found no flight and each started one: the check and the insert "
        "must be one step, under a lock"
    )

    def stuck(runs: int) -> str:
        if runs > 1:
            # Two leaders raced to insert: a waiter that read the flight which lost the
            # race waits on an event no leader will ever set.
            return (
                f"fn ran {runs} times and some callers were still waiting after 6 s: {race} "
                "(a caller left waiting on a flight nobody runs never wakes)"
            )
        return "some callers were still waiting after 6 s (a waiter that never wakes?)"

    def why(runs: int) -> str:
        return f" ({race})" if runs > 1 else ""

    try:
        good = run_threads(caller("ok", key, slow), 50, timeout=6)
    except TimeoutError:
        return failed(name, stuck(calls["ok"]))
    if calls["ok"] != 1 or good.values.count("value") != 50:
        return failed(
            name,
            f"50 concurrent calls: fn ran {calls['ok']} times, "
            f"{good.values.count('value')} callers got its value; expected 1 and 50"
            + why(calls["ok"]),
        )
    try:
        bad = run_threads(caller("bad", bad_key, broken), 50, timeout=6)
    except TimeoutError:
        return failed(name, stuck(calls["bad"]))
    raised = sum("ConnectionError" in e for e in bad.errors)
    if calls["bad"] != 1 or raised != 50:
        return failed(
            name,
            f"failing fn: ran {calls['bad']} times, {raised}/50 callers got its exception; "
            "expected 1 and 50" + why(calls["bad"]),
        )
    with contextlib.suppress(ConnectionError):
        get_once(bad_key, broken)
    if calls["bad"] != 2:
        return failed(name, "the call after a failure did not run fn again (the key stayed stuck)")
    again = get_once(key, slow)
    if calls["ok"] != 2 or again != "value":
        return failed(
            name,
            "a call made after the first flight had finished returned without running fn "
            "again: the result was kept forever. Single flight shares one call among "
            "concurrent callers only; keeping results is the cache's job, with a TTL",
        )
    return passed(
        name,
        "50 callers -> 1 call (keys that yield while hashed); failure shared by 50/50 callers "
        "in bounded time; the next call runs fn again, after a failure and after a success",
    )
