"""Small demos for notebook 02: the naive weighted expansion, burst length, modulo hashing,
remap counts and load spread. Bookkeeping only; the strategies are in the library."""

from __future__ import annotations

import itertools
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence

__all__ = [
    "YieldingList",
    "longest_run",
    "modulo_pick",
    "naive_weighted",
    "remapped",
    "spread",
]


def naive_weighted(weights: Mapping[str, int]) -> Callable[[], str]:
    """Weighted round robin by expansion: each server repeated ``weight`` times, cycled."""
    cycle = itertools.cycle([s for s, w in weights.items() for _ in range(w)])
    return lambda: next(cycle)


def longest_run(sequence: Sequence[str]) -> tuple[str, int]:
    """The server with the longest run of consecutive picks, and that run's length."""
    best = ("", 0)
    for server, group in itertools.groupby(sequence):
        n = sum(1 for _ in group)
        if n > best[1]:
            best = (server, n)
    return best


def modulo_pick(servers: Sequence[str]) -> Callable[[str], str]:
    """``hash(key) % n``: the simplest hash balancing (CRC32, stable across processes)."""
    return lambda key: servers[zlib.crc32(key.encode()) % len(servers)]


def remapped(before: Mapping[str, str], after: Mapping[str, str]) -> int:
    """How many keys changed server between two assignments."""
    return sum(before[k] != after[k] for k in before)


def spread(picks: Iterable[str], servers: Sequence[str]) -> float:
    """Most loaded server's share divided by the mean share (1.0 = perfectly even)."""
    counts = Counter(picks)
    loads = [counts.get(s, 0) for s in servers]
    return max(loads) / (sum(loads) / len(loads))


class YieldingList(list):
    """A list whose ``len()`` gives the GIL away (``time.sleep(0)``).

    The module's round robin calls ``len(servers)`` between reading ``current`` and
    writing it back; with this list another thread runs exactly there, which widens the
    race window from a few bytecodes to a thread switch (the magnitude is staged, the race
    is the module's).
    """

    def __len__(self) -> int:
        time.sleep(0)
        return super().__len__()
