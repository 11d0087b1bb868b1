"""Each caching checker passes the reference solution and fails a planted wrong answer."""

from __future__ import annotations

import contextlib
import json
import threading
from typing import Any

import pytest
import redis

from course_lib.exercises.caching import (
    SlowKey,
    check_cache_aside,
    check_safe_release,
    check_single_flight,
)


def in_memory(*values: object) -> Any:
    """A case of check_single_flight: it runs in memory, with no server, so one pass of
    `make test` covers it."""
    return pytest.param(*values, marks=pytest.mark.one_pass)


RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def good_get_user(r, key, load):
    try:
        raw = r.get(key)
    except redis.RedisError:
        return load(key)
    if raw is not None:
        return json.loads(raw)
    value = load(key)
    with contextlib.suppress(redis.RedisError):
        r.set(key, json.dumps(value), ex=60 if value is not None else 5)
    return value


def no_negative_caching(r, key, load):
    raw = r.get(key)
    if raw is not None:
        return json.loads(raw)
    value = load(key)
    if value is not None:
        r.set(key, json.dumps(value), ex=60)
    return value


def wrong_ttl(r, key, load):
    try:
        raw = r.get(key)
    except redis.RedisError:
        return load(key)
    if raw is not None:
        return json.loads(raw)
    value = load(key)
    r.set(key, json.dumps(value), ex=3600 if value is not None else 5)
    return value


def one_ttl_for_both(r, key, load):
    """The seed's get_user with the loader swapped in: a missing user is cached as long as a row."""
    try:
        cached = r.get(key)
    except redis.RedisError:
        return load(key)
    if cached:
        return json.loads(cached)
    value = load(key)
    r.setex(key, 60, json.dumps(value))
    return value


def fails_closed(r, key, load):
    """Right while Redis answers; raises when it does not."""
    raw = r.get(key)
    if raw is not None:
        return json.loads(raw)
    value = load(key)
    r.set(key, json.dumps(value), ex=60 if value is not None else 5)
    return value


def good_release(r, key, token):
    return bool(r.eval(RELEASE, 1, key, token))


def plain_delete(r, key, token):
    return bool(r.delete(key))


def get_then_del(r, key, token):
    """Right on a quiet server, wrong when the lock changes hands between GET and DEL."""
    if r.get(key) == token.encode():
        return bool(r.delete(key))
    return False


_lock = threading.Lock()
_flights: dict = {}


def good_get_once(key, fn):
    with _lock:
        flight = _flights.get(key)
        leader = flight is None
        if leader:
            flight = _flights[key] = {"done": threading.Event()}
    if not leader:
        flight["done"].wait()
        if "error" in flight:
            raise flight["error"]
        return flight["value"]
    try:
        flight["value"] = fn()
        return flight["value"]
    except Exception as exc:
        flight["error"] = exc
        raise
    finally:
        with _lock:
            del _flights[key]
        flight["done"].set()


def hangs_on_error(key, fn):
    """Like the seed's get_with_lock: an exception leaves the waiters waiting."""
    with _lock:
        flight = _flights.get(key)
        leader = flight is None
        if leader:
            flight = _flights[key] = {"done": threading.Event()}
    if not leader:
        flight["done"].wait(30)
        return flight.get("value")
    flight["value"] = fn()
    flight["done"].set()
    with _lock:
        del _flights[key]
    return flight["value"]


_unlocked: dict = {}


def check_then_insert(key, fn):
    """The same flight table with no lock: right whenever no thread switch falls between the
    lookup and the insert, which on CPython with the GIL is most runs."""
    flight = _unlocked.get(key)
    leader = flight is None
    if leader:
        flight = _unlocked[key] = {"done": threading.Event()}
    if not leader:
        flight["done"].wait()
        if "error" in flight:
            raise flight["error"]
        return flight["value"]
    try:
        flight["value"] = fn()
        return flight["value"]
    except Exception as exc:
        flight["error"] = exc
        raise
    finally:
        _unlocked.pop(key, None)
        flight["done"].set()


def membership_then_insert(key, fn):
    """``if key not in flights`` then insert, no lock: the check-then-insert written another way."""
    if key not in _unlocked:
        _unlocked[key] = {"done": threading.Event()}
        flight, leader = _unlocked[key], True
    else:
        flight, leader = _unlocked[key], False
    if not leader:
        flight["done"].wait()
        if "error" in flight:
            raise flight["error"]
        return flight["value"]
    try:
        flight["value"] = fn()
        return flight["value"]
    except Exception as exc:
        flight["error"] = exc
        raise
    finally:
        _unlocked.pop(key, None)
        flight["done"].set()


_memo: dict = {}


def memoises_forever(key, fn):
    """Shares the flight and its failure, but keeps a success for ever: a cache without a TTL.
    (The memo is read inside the flight, so its callers reach the flight's lookup first.)"""

    def remembered():
        if key not in _memo:
            _memo[key] = fn()
        return _memo[key]

    return good_get_once(key, remembered)


def not_attempted(*args):
    raise NotImplementedError


@pytest.mark.parametrize(
    ("checker", "good", "bad", "why"),
    [
        (check_cache_aside, good_get_user, no_negative_caching, "missing user called load 5"),
        (check_cache_aside, good_get_user, wrong_ttl, "expected 60 s"),
        (check_cache_aside, good_get_user, one_ttl_for_both, "missing user (None) was cached"),
        (check_cache_aside, good_get_user, fails_closed, "must cost latency, not availability"),
        (check_safe_release, good_release, plain_delete, "released a lock held by another"),
        (check_safe_release, good_release, get_then_del, "one atomic step"),
        in_memory(check_single_flight, good_get_once, hangs_on_error, "still waiting after 6 s"),
        in_memory(check_single_flight, good_get_once, memoises_forever, "without running fn again"),
        in_memory(check_single_flight, good_get_once, check_then_insert, "under a lock"),
        in_memory(check_single_flight, good_get_once, membership_then_insert, "under a lock"),
    ],
)
@pytest.mark.timeout(60)
def test_checker_passes_reference_and_fails_planted_bug(checker, good, bad, why, capsys):
    assert checker(good)
    assert "PASS" in capsys.readouterr().out
    result = checker(bad)
    assert not result
    assert why in result.message


@pytest.mark.parametrize(
    "checker", [check_cache_aside, check_safe_release, in_memory(check_single_flight)]
)
def test_checker_reports_not_attempted(checker):
    result = checker(not_attempted)
    assert not result and "not attempted yet" in result.message


@pytest.mark.one_pass
@pytest.mark.timeout(120)
@pytest.mark.parametrize("bad", [check_then_insert, membership_then_insert])
def test_single_flight_refuses_a_lock_free_answer_every_time(bad):
    """Not by luck: the keys yield while hashed, so each of several runs catches the race."""
    results = [check_single_flight(bad) for _ in range(5)]
    assert [bool(r) for r in results] == [False] * 5, [r.message for r in results]
    assert all("under a lock" in r.message for r in results)


@pytest.mark.one_pass
def test_slow_key_is_a_proper_key():
    a, b = SlowKey("k", pause=0), SlowKey("k", pause=0)
    assert a == b and hash(a) == hash(b) and {a: 1}[b] == 1 and a != SlowKey("j", pause=0)
