"""Warm-up exercise of notebook 00: fetch many keys in one round trip."""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable, Sequence

import redis

from .. import services
from ..measure import RoundTripCounter
from .result import CheckResult, failed, not_attempted, passed

__all__ = ["check_get_many"]

GetMany = Callable[[redis.Redis, Sequence[str]], Sequence[bytes | None]]


def check_get_many(student_fn: GetMany, *, keys: int = 50) -> CheckResult:
    """``student_fn(client, keys)`` must return each key's value (``None`` if missing), in
    order, using exactly one round trip to Redis, whatever the number of keys.

    Whatever the student's function does (raise, return garbage), the checker prints one
    FAIL line with the reason instead of raising, and cleans up its keys and clients.
    """
    if keys < 2:
        raise ValueError(f"keys must be at least 2 (some present, some missing), got {keys}")
    name = "check_get_many"
    prefix = f"exercise:get_many:{uuid.uuid4().hex[:8]}"
    names = [f"{prefix}:{i}" for i in range(keys)]
    present = {k: f"value-{i}".encode() for i, k in enumerate(names) if i % 5}
    random.Random(0).shuffle(names)
    expected = [present.get(k) for k in names]
    client = services.redis_client()
    counter = RoundTripCounter(services.redis_url())
    try:
        client.mset(present)
        counter.reset()
        try:
            got = list(student_fn(counter.client, names))
        except NotImplementedError:
            return not_attempted(name, "implement get_many")
        except Exception as exc:
            return failed(name, f"get_many raised {type(exc).__name__}: {exc}")
        trips = counter.count
    finally:
        client.delete(*present)
        client.close()
        counter.client.close()
    if got != expected:
        wrong = sum(a != b for a, b in zip(got, expected, strict=False))
        wrong += abs(len(got) - len(expected))
        return failed(name, f"{wrong} of {keys} values wrong or missing (order matters)")
    if trips != 1:
        return failed(name, f"{keys} keys fetched in {trips} round trips; expected 1")
    return passed(name, f"{keys} keys ({keys - len(present)} missing) fetched in 1 round trip")
