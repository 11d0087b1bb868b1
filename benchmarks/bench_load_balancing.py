"""Load balancing: cost of one ``pick`` per strategy, as a ratio to ``random.choice`` over
the same server list, measured in the same run (subjects interleaved round by round).

At 3 and 100 backends. Target at 100 backends: <= 5x ``random.choice`` (O(1) or O(log n)
per pick: a precomputed schedule, count buckets, two samples, an ``inet_pton`` and a few
multiplications, a binary search; never a scan of the servers). Keys rotate over 1000
client addresses / strings so hashing strategies do real work; their baseline is
``random.choice`` behind the same key rotation.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable

from harness import Row, interleaved

from course_lib.load_balancing import (
    ConsistentHash,
    IpHash,
    LeastConnections,
    PowerOfTwoChoices,
    RoundRobin,
    WeightedRoundRobin,
)

BENCH = "load_balancing"
TARGET_AT_100 = 5.0


def _rotating(fn: Callable[[str], object], keys: list[str]) -> Callable[[], object]:
    cycle = itertools.cycle(keys)
    return lambda: fn(next(cycle))


def _subjects(n: int) -> dict[str, Callable[[], object]]:
    servers = [f"10.0.{i // 250}.{i % 250}:8080" for i in range(n)]
    rng = random.Random(1)
    ips = [
        f"{rng.randrange(1, 224)}.{rng.randrange(256)}.{rng.randrange(256)}.7" for _ in range(1000)
    ]
    strings = [f"user:{i}" for i in range(1000)]
    weights = {s: 1 + i % 5 for i, s in enumerate(servers)}
    return {
        "random.choice": lambda: random.choice(servers),
        # the keyed strategies pay for rotating keys too: their baseline does the same
        "random.choice keyed": _rotating(lambda key: random.choice(servers), strings),
        "RoundRobin": RoundRobin(servers).pick,
        "WeightedRoundRobin": WeightedRoundRobin(weights).pick,
        "LeastConnections": LeastConnections(servers, seed=1).pick,
        "PowerOfTwoChoices": PowerOfTwoChoices(servers, seed=1).pick,
        "IpHash": _rotating(IpHash(servers).pick, ips),
        "ConsistentHash": _rotating(ConsistentHash(servers).pick, strings),
        "ConsistentHash bounded": _rotating(
            ConsistentHash(servers, load_factor=1.25).pick, strings
        ),
    }


def run(quick: bool) -> list[Row]:
    calls, rounds = (2_000, 5) if quick else (20_000, 15)
    rows = []
    for n in (3, 100):
        timings = interleaved(_subjects(n), calls, rounds)
        plain = timings.pop("random.choice")
        keyed = timings.pop("random.choice keyed")
        for name, seconds in timings.items():
            is_keyed = name.startswith(("IpHash", "ConsistentHash"))
            rows.append(
                Row(
                    benchmark=BENCH,
                    subject=f"{name} ({n} backends)",
                    metric="pick",
                    value=seconds * 1e9,
                    unit="ns",
                    baseline="random.choice keyed" if is_keyed else "random.choice",
                    baseline_value=(keyed if is_keyed else plain) * 1e9,
                    target=TARGET_AT_100 if n == 100 else None,
                )
            )
    return rows
