"""The sans-I/O cores of cache-aside and the Redis lock, driven by hand: no Redis, no loader.

Each test sends the replies a server would give and checks the step the core asks for next,
so every decision (hit, miss, wait, lead, fail open, give up) is pinned down without timing.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest
import redis as redis_lib

from course_lib.caching import LocalFlight, NoProtection, RedisMutex, XFetch
from course_lib.caching.core.cache_aside import (
    FILL,
    INVALIDATE,
    MISSING,
    RESERVE,
    STAMPEDE_MODES,
    XFETCH_PREFIX,
    CacheAsideCore,
    LoaderError,
    Ticket,
    stampede_mode,
)
from course_lib.caching.core.lock import Backoff, LockCore, LockNotOwned
from course_lib.caching.core.steps import (
    Command,
    Eval,
    Load,
    Pause,
    Shared,
    TryLock,
    Unlock,
    aperform_redis,
    perform_redis,
    run,
)
from course_lib.caching.serialization import dumps

# The sans-I/O core, no server: one pass of `make test` covers it.
pytestmark = pytest.mark.one_pass


def core(stampede: Any = "lock", **settings: Any) -> CacheAsideCore:
    defaults: dict[str, Any] = {
        "ttl": 60,
        "namespace": "ns",
        "stampede": stampede,
        "negative_ttl": None,
        "lock_ttl": 5,
        "wait_timeout": 10,
        "invalidation_ttl": None,
        "beta": 1.0,
        "retry_after": 1.0,
        "rng": None,
    }
    return CacheAsideCore(**{**defaults, **settings})


class Script:
    """Steps a core asked for, and replies to send back, one at a time."""

    def __init__(self, steps: Any) -> None:
        self.steps = steps
        self.step = next(steps)

    def reply(self, value: Any) -> Any:
        self.step = self.steps.send(value)
        return self.step

    def fail(self, exc: BaseException) -> Any:
        self.step = self.steps.throw(exc)
        return self.step

    def result(self, value: Any) -> Any:
        with pytest.raises(StopIteration) as done:
            self.steps.send(value)
        return done.value.value


def test_a_hit_is_one_get() -> None:
    c = core()
    s = Script(c.get(7))
    assert s.step == Command("get", ("ns:{7}",))
    assert s.result(dumps({"id": 7})) == {"id": 7}
    assert c.stats.snapshot()["hits"] == 1


def test_a_miss_under_the_lock_reserves_loads_fills_and_releases() -> None:
    c = core()
    s = Script(c.get(7))
    shared = s.reply(None)
    assert isinstance(shared, Shared) and shared.key == "ns:{7}"
    miss = Script(shared.algorithm())
    assert miss.step == TryLock(7)
    assert miss.reply("token") == Eval(RESERVE, ["ns:{7}"])
    assert miss.reply([None, "1700000000000000"]) == Load(7)
    fill = miss.reply({"id": 7})
    assert fill.script is FILL and fill.keys == ["ns:{7}", "ns#inv:{7}"]
    assert fill.args == ["1700000000000000", dumps({"id": 7}), 60_000, 60_000]
    assert miss.reply(1) == Unlock(7, "token")
    assert miss.result(None) == {"id": 7}
    stats = c.stats.snapshot()
    assert (stats["misses"], stats["loads"], stats["stale_fills_rejected"]) == (1, 1, 0)


def test_the_leader_serves_a_value_filled_while_it_took_the_lock() -> None:
    miss = Script(core().load_under_lock(7))
    miss.reply("token")
    assert miss.reply([dumps("v"), "1"]) == Unlock(7, "token")
    assert miss.result(None) == "v"


def test_a_failed_load_leaves_its_error_for_the_waiters_and_releases() -> None:
    c = core()
    miss = Script(c.load_under_lock(7))
    miss.reply("token")
    miss.reply([None, "1"])
    record = miss.fail(ConnectionError("database unavailable"))
    assert record == Command(
        "set", ("ns#err:{7}:token", "ConnectionError: database unavailable"), {"px": 2000}
    )
    assert miss.reply(True) == Unlock(7, "token")
    with pytest.raises(ConnectionError):
        miss.fail(LockNotOwned("expired"))  # a lost lock is not the caller's concern
    assert c.stats.snapshot()["load_errors"] == 1


def test_a_waiter_polls_with_backoff_and_gets_the_holders_value() -> None:
    c = core()
    wait = Script(c.load_under_lock(7))
    assert wait.reply(None) == Command("mget", (["ns:{7}", "ns#lock:{7}"],))
    assert wait.reply([None, b"holder"]) == Pause(Backoff.FIRST)
    assert wait.reply(None) == Command("mget", (["ns:{7}", "ns#lock:{7}", "ns#err:{7}:holder"],))
    assert wait.reply([None, b"holder", None]) == Pause(Backoff.FIRST * 2)
    wait.reply(None)
    assert wait.result([dumps("v"), None, None]) == "v"
    assert c.stats.snapshot()["lock_waits"] == 1


def test_a_waiter_raises_the_holders_error() -> None:
    wait = Script(core().load_under_lock(7))
    wait.reply(None)
    wait.reply([None, b"holder"])
    wait.reply(None)
    with pytest.raises(LoaderError, match="ValueError: boom"):
        wait.reply([None, b"holder", b"ValueError: boom"])


def test_a_lock_freed_without_a_value_is_competed_for_again() -> None:
    wait = Script(core().load_under_lock(7))
    wait.reply(None)
    assert wait.reply([None, None]) == TryLock(7)


def test_a_waiter_past_wait_timeout_loads_without_the_lock() -> None:
    c = core(wait_timeout=1e-9)
    wait = Script(c.load_under_lock(7))
    wait.reply(None)
    assert wait.reply([None, b"holder"]) == Eval(RESERVE, ["ns:{7}"])
    assert c.stats.snapshot()["lock_timeouts"] == 1


def test_redis_down_fails_open_then_skips_redis() -> None:
    c = core()
    s = Script(c.get(7))
    shared = s.fail(redis_lib.ConnectionError("refused"))
    assert isinstance(shared, Shared) and shared.key == ("fail-open", "ns:{7}")
    assert Script(shared.algorithm()).step == Load(7)
    s.result("v")
    s = Script(c.get(7))  # within retry_after: Redis is not asked
    assert isinstance(s.step, Shared)
    stats = c.stats.snapshot()
    assert (stats["fail_open"], stats["redis_errors"]) == (2, 1)


def test_no_protection_loads_directly_even_when_failing_open() -> None:
    c = core(None)
    s = Script(c.get(7))
    assert Script(c.get(7)).reply(None) == Eval(RESERVE, ["ns:{7}"])
    assert s.fail(redis_lib.ConnectionError("refused")) == Load(7)


def test_a_fill_refused_as_stale_is_counted_and_invalidate_returns_the_count() -> None:
    c = core(invalidation_ttl=0.3)
    s = Script(c.fill(Ticket(7, "1"), None))
    assert s.step.args[2:] == [30_000, 300]  # None: the negative TTL; the memory: 0.3 s
    assert s.result(0) is False
    assert c.stats.snapshot()["stale_fills_rejected"] == 1
    inv = Script(c.invalidate(7))
    assert inv.step == Eval(INVALIDATE, ["ns:{7}", "ns#inv:{7}"], [300])
    assert inv.result(1) == 1


class Always(random.Random):
    """An rng whose every draw makes XFetch refresh (U close to 0)."""

    def random(self) -> float:
        return 1 - 1e-12


def test_xfetch_refreshes_early_only_when_the_lock_is_free() -> None:
    c = core("xfetch", rng=Always(), beta=1000)
    payload = c.mode.encode("old", 0.01, 60)
    s = Script(c.get(7))
    assert s.reply(payload) == TryLock(7)
    assert s.result(None) == "old"  # someone else refreshes
    s = Script(c.get(7))
    s.reply(payload)
    assert s.reply("token") == Eval(RESERVE, ["ns:{7}"])
    assert s.reply([payload, "1"]) == Load(7)
    assert s.fail(ValueError("db down")) == Unlock(7, "token")
    assert s.result(None) == "old"  # an optional refresh never fails the read
    assert c.stats.snapshot()["early_refreshes"] == 1


def test_payloads_of_another_mode_are_misses() -> None:
    plain, xfetch = core("lock"), core("xfetch")
    assert plain.read(xfetch.mode.encode(1, 0.0, 60)) == (MISSING, False)
    assert xfetch.read(dumps(1)) == (MISSING, False)
    assert xfetch.read(XFETCH_PREFIX + dumps([1])) == (MISSING, False)  # not an envelope
    assert plain.stats.snapshot()["decode_errors"] == 1
    assert xfetch.stats.snapshot()["decode_errors"] == 2


def test_stampede_names_map_to_mode_objects() -> None:
    kinds = [type(stampede_mode(name)) for name in STAMPEDE_MODES]
    assert kinds == [NoProtection, LocalFlight, RedisMutex, XFetch]
    mine = XFetch(beta=2.0)
    assert stampede_mode(mine) is mine and core(mine).mode is mine
    assert core("xfetch", beta=3.0).mode.beta == 3.0
    with pytest.raises(ValueError, match="stampede"):
        stampede_mode("redlock")
    assert core(None).flight_timeout == 10 and core("lock").flight_timeout == 15


@pytest.mark.parametrize(
    ("settings", "error", "match"),
    [
        ({"ttl": 0.0004}, ValueError, "ttl"),
        ({"invalidation_ttl": 0}, ValueError, "invalidation_ttl"),
        ({"namespace": "a{b}"}, ValueError, "namespace"),
        ({"namespace": " "}, ValueError, "namespace"),
        ({"namespace": 3}, TypeError, "namespace"),
        ({"beta": 0}, ValueError, "beta"),
    ],
)
def test_bad_settings_name_the_parameter(settings: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        core(**settings)


def test_backoff_doubles_up_to_20_ms_until_the_wait_is_over() -> None:
    backoff = Backoff(60)
    pauses = [backoff.next_pause() for _ in range(7)]
    assert pauses == [0.001, 0.002, 0.004, 0.008, 0.016, 0.02, 0.02]
    assert Backoff(0).next_pause() is None


def test_lock_core_steps() -> None:
    lock = LockCore("lk", ttl=2, wait=60)
    acquire = Script(lock.acquire())
    set_step = acquire.step
    assert set_step.name == "set" and set_step.args[0] == "lk"
    assert set_step.options == {"nx": True, "px": 2000}
    assert acquire.reply(None) == Pause(0.001)
    acquire.reply(None)
    token = acquire.step.args[1]
    assert acquire.result(True) == token
    with pytest.raises(LockNotOwned, match="extend"):
        Script(lock.extend("t", 0.5)).reply(0)
    exc = KeyError("x")
    Script(lock.exit("t", exc)).result(0)
    assert "lost" in exc.__notes__[0]


def test_run_hands_each_steps_error_back_to_the_core() -> None:
    replies: list[Any] = ["token", [None, "1"], ValueError("db down"), None]
    seen = []

    def perform(step: Any) -> Any:
        seen.append(step)
        reply = replies.pop(0)
        if isinstance(reply, Exception):
            raise reply
        return reply

    value = run(core().refresh_early(1, "current"), perform)
    assert value == "current"
    assert seen == [TryLock(1), Eval(RESERVE, ["ns:{1}"]), Load(1), Unlock(1, "token")]


def test_redis_errors_inside_a_miss_fail_open_or_are_counted() -> None:
    refused = redis_lib.ConnectionError("refused")
    for start in (lambda c: c.load_under_lock(7), lambda c: c.lead(7, "t")):
        c = core(None)
        s = Script(start(c))
        if s.step == TryLock(7):
            assert s.fail(refused) == Load(7)  # the lock could not be asked: fail open
            s = Script(c.wait_for_holder(7, Backoff(60)))
        assert s.fail(refused) == Load(7)
    c = core()
    refresh = Script(c.refresh_early(7, "cached"))
    with pytest.raises(StopIteration) as served:
        refresh.fail(redis_lib.ResponseError("WRONGTYPE"))
    assert served.value.value == "cached"
    fill = Script(c.fill_quietly(Ticket(7, "1"), "v", 0.0))
    with pytest.raises(StopIteration):
        fill.fail(redis_lib.TimeoutError("slow"))
    assert c.stats.snapshot()["redis_errors"] == 2


def test_an_xfetch_payload_read_as_text_and_the_modes_repr() -> None:
    c = core("xfetch")
    payload = c.mode.encode({"a": 1}, 0.0, 60)
    assert c.read(payload.decode())[0] == {"a": 1}  # a client with decode_responses=True
    assert repr(c.mode) == "XFetch(beta=1.0)" and repr(RedisMutex()) == "RedisMutex()"


def test_a_redis_step_is_taken_by_the_shell_not_the_redis_client() -> None:
    with pytest.raises(TypeError, match="not a Redis step"):
        perform_redis(None, Load(1))
    with pytest.raises(TypeError, match="not a Redis step"):
        asyncio.run(aperform_redis(None, Load(1)))


def test_a_failed_reserve_fails_open_and_an_abandoned_holder_just_stops() -> None:
    c = core(None)
    assert Script(c.load_and_fill(7)).fail(redis_lib.ConnectionError("refused")) == Load(7)
    held = Script(c.holding(7, "t", c.lead(7, "t")))
    held.steps.close()  # its driver gave up: no step can be taken, the lock just expires
