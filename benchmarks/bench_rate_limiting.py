"""Rate limiting: cost per decision of the course_lib limiters against `limits`,
`pyrate-limiter` and the seed, as a ratio to one raw Redis PING measured in the same run.

- Redis limiters: one decision per call on 1000 rotating keys with a quota that is never
  exhausted (every decision is an admission, the common case), subjects interleaved round by
  round. Target: course_lib <= 1.10x PING.
- ``hit_many``: 100 decisions per pipelined round trip, cost per decision. Target <= 0.2x PING.
- In-process: ``TokenBucket.consume`` against limits' in-memory fixed window. Target <= 0.25x.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Callable

from harness import Row, interleaved
from limits import RateLimitItemPerMinute
from limits.storage import MemoryStorage, RedisStorage
from limits.strategies import (
    FixedWindowRateLimiter,
    MovingWindowRateLimiter,
    SlidingWindowCounterRateLimiter,
)
from pyrate_limiter import Duration, InMemoryBucket, Limiter, Rate, RedisBucket

from course_lib import services
from course_lib.rate_limiting import (
    GCRA,
    FixedWindow,
    RedisTokenBucket,
    SlidingWindowCounter,
    SlidingWindowLog,
    TokenBucket,
)
from course_lib.rate_limiting.lesson import as_written

BENCH = "rate_limiting"
HUGE = 10**9  # a quota no benchmark run can exhaust
KEYS = 1000
BATCH = 100


def _limits_uri(url: str) -> str:
    return "redis+unix://" + url.removeprefix("unix://") if url.startswith("unix://") else url


def _rotating(fn: Callable[[str], object], keys: list[str]) -> Callable[[], object]:
    cycle = itertools.cycle(keys)
    return lambda: fn(next(cycle))


def _redis_subjects(client, ns: str) -> dict[str, Callable[[], object]]:
    keys = [f"k{i}" for i in range(KEYS)]
    ours = {
        "FixedWindow": FixedWindow(client, HUGE, 60, prefix=f"{ns}:fw"),
        "SlidingWindowLog": SlidingWindowLog(client, HUGE, 60, prefix=f"{ns}:swl"),
        "SlidingWindowCounter": SlidingWindowCounter(client, HUGE, 60, prefix=f"{ns}:swc"),
        "RedisTokenBucket": RedisTokenBucket(client, HUGE, HUGE / 60, prefix=f"{ns}:tb"),
        "GCRA": GCRA(client, 1e6, HUGE, prefix=f"{ns}:gcra"),
    }
    uri = _limits_uri(services.redis_url())
    item = RateLimitItemPerMinute(HUGE)
    theirs = {
        name: strategy(RedisStorage(uri, key_prefix=f"{ns}:{tag}"))
        for name, strategy, tag in (
            ("limits fixed window", FixedWindowRateLimiter, "lfw"),
            ("limits sliding window counter", SlidingWindowCounterRateLimiter, "lswc"),
            ("limits moving window", MovingWindowRateLimiter, "lmw"),
        )
    }
    pyrate = Limiter(RedisBucket.init([Rate(HUGE, Duration.MINUTE)], client, f"{ns}:pyrate"))
    subjects: dict[str, Callable[[], object]] = {"PING": client.ping}
    for name, limiter in ours.items():
        subjects[f"course_lib {name}.hit"] = _rotating(limiter.hit, keys)
    for name, strategy in theirs.items():
        subjects[name] = _rotating(lambda key, s=strategy: s.hit(item, key), keys)
    subjects["pyrate-limiter RedisBucket"] = _rotating(
        lambda key: pyrate.try_acquire(key, blocking=False), keys
    )
    subjects["seed is_rate_limited"] = _rotating(
        lambda key: as_written.is_rate_limited(f"{ns}:{key}", HUGE, 60, cache=client), keys
    )
    batches = itertools.cycle([keys[i : i + BATCH] for i in range(0, KEYS, BATCH)])
    batch_limiter = ours["FixedWindow"]
    subjects[f"course_lib FixedWindow.hit_many x{BATCH}"] = lambda: batch_limiter.hit_many(
        next(batches)
    )
    return subjects


def _in_process_subjects() -> dict[str, Callable[[], object]]:
    item = RateLimitItemPerMinute(HUGE)
    limits_memory = FixedWindowRateLimiter(MemoryStorage())
    pyrate = Limiter(InMemoryBucket([Rate(HUGE, Duration.MINUTE)]))
    bucket = TokenBucket(HUGE, HUGE / 60)
    return {
        "limits in-memory fixed window": lambda: limits_memory.hit(item, "k"),
        "pyrate-limiter InMemoryBucket": lambda: pyrate.try_acquire("k", blocking=False),
        "course_lib TokenBucket.consume": bucket.consume,
    }


def run(quick: bool) -> list[Row]:
    client = services.redis_client()
    ns = f"bench:rl:{uuid.uuid4().hex[:8]}"
    try:
        calls, rounds = (100, 3) if quick else (1000, 15)
        times = interleaved(_redis_subjects(client, ns), calls=calls, rounds=rounds)
    finally:
        leftovers = list(client.scan_iter(match=f"*{ns}*", count=1000))
        for start in range(0, len(leftovers), 500):
            client.delete(*leftovers[start : start + 500])
        client.close()
    ping = times.pop("PING")
    rows = []
    for subject, seconds in times.items():
        if "hit_many" in subject:
            rows.append(
                Row(BENCH, subject, "per decision", seconds / BATCH * 1e6, "us", "PING",
                    ping * 1e6, target=0.2)
            )  # fmt: skip
            continue
        target = 1.10 if subject.startswith("course_lib") else None
        rows.append(
            Row(BENCH, subject, "per decision", seconds * 1e6, "us", "PING", ping * 1e6, target)
        )
    local = interleaved(
        _in_process_subjects(), calls=2000 if quick else 50000, rounds=3 if quick else 9
    )
    base = local.pop("limits in-memory fixed window")
    for subject, seconds in local.items():
        target = 0.25 if subject.startswith("course_lib") else None
        rows.append(
            Row(BENCH, subject, "per decision", seconds * 1e6, "us",
                "limits in-memory fixed window", base * 1e6, target)
        )  # fmt: skip
    return rows
