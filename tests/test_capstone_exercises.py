"""The checkers of notebook 06's exercises: the reference answers pass, and one planted wrong
answer per property each checker claims to check fails it, naming what went wrong."""

from __future__ import annotations

import math

import pytest

from course_lib.exercises.capstone import (
    check_capacity_plan,
    check_paid_fallback,
    reference_plan,
)
from course_lib.rate_limiting import GCRA, KeyedTokenBucket

pytestmark = pytest.mark.one_pass  # the second checker starts a Redis of its own


# -- exercise 1 ---------------------------------------------------------------------------
def no_margin(rate, cpu_ms, db_ms, *, cores):
    processes = max(1, math.ceil(rate * cpu_ms / 1000))
    connections = max(processes, math.ceil(rate * db_ms / 1000))
    pool = math.ceil(connections / processes)
    if processes > cores or pool * processes > 2 * cores:
        raise ValueError("rate")
    return processes, pool


def total_as_pool(rate, cpu_ms, db_ms, *, cores):
    processes, _ = reference_plan(rate, cpu_ms, db_ms, cores=cores)
    return processes, max(processes, math.ceil(rate * db_ms / 1000 / 0.7))


def rounds_down(rate, cpu_ms, db_ms, *, cores):
    processes = max(1, math.floor(rate * cpu_ms / 1000 / 0.7))
    connections = max(processes, math.floor(rate * db_ms / 1000 / 0.7))
    pool = max(1, connections // processes)
    if processes > cores or pool * processes > 2 * cores:
        raise ValueError("rate")
    return processes, pool


def never_refuses(rate, cpu_ms, db_ms, *, cores):
    processes = max(1, math.ceil(rate * cpu_ms / 1000 / 0.7))
    connections = max(processes, math.ceil(rate * db_ms / 1000 / 0.7))
    return processes, math.ceil(connections / processes)


def test_capacity_plan_reference_passes() -> None:
    assert check_capacity_plan(reference_plan)
    assert check_capacity_plan(reference_plan, seed=12)


@pytest.mark.parametrize(
    "wrong", [no_margin, total_as_pool, rounds_down, never_refuses], ids=lambda f: f.__name__
)
def test_capacity_plan_planted_wrong_answers_fail(wrong) -> None:
    result = check_capacity_plan(wrong)
    assert not result and "should give" in result.message


def test_capacity_plan_not_attempted() -> None:
    def plan(rate, cpu_ms, db_ms, *, cores):
        raise NotImplementedError

    assert "not attempted" in check_capacity_plan(plan).message


# -- exercise 2 ---------------------------------------------------------------------------
class Reference:
    def __init__(self, redis, *, rate, burst, processes):
        self.shared = GCRA(redis, rate, burst, prefix="paid")
        self.local = KeyedTokenBucket(max(1, burst // processes), rate / processes)

    def hit(self, key):
        decision = self.shared.hit(key)
        return self.local.hit(key) if decision.degraded else decision


def fail_open(redis, *, rate, burst, processes):
    return GCRA(redis, rate, burst, prefix="paid")


def fail_closed(redis, *, rate, burst, processes):
    return GCRA(redis, rate, burst, prefix="paid", fail_open=False)


class FullLocalRate(Reference):
    def __init__(self, redis, *, rate, burst, processes):
        super().__init__(redis, rate=rate, burst=burst, processes=processes)
        self.local = KeyedTokenBucket(burst, rate)  # each process admits the whole quota


class LocalOnly(Reference):
    def hit(self, key):
        return self.local.hit(key)  # the share even when Redis could count for everyone


class OneBucketForAll(Reference):
    def hit(self, key):
        decision = self.shared.hit(key)
        return self.local.hit("everyone") if decision.degraded else decision


def test_paid_fallback_reference_passes() -> None:
    assert check_paid_fallback(Reference)


@pytest.mark.parametrize(
    ("wrong", "says"),
    [
        (fail_open, "scraper"),
        (fail_closed, "refused"),
        (FullLocalRate, "scraper"),
        (LocalOnly, "Redis up"),
        (OneBucketForAll, "per key"),
    ],
    ids=["fail_open", "fail_closed", "full_local_rate", "local_only", "one_bucket"],
)
def test_paid_fallback_planted_wrong_answers_fail(wrong, says) -> None:
    result = check_paid_fallback(wrong)
    assert not result and says in result.message, result.message
