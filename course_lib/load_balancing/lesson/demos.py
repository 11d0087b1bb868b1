"""Small demos for notebook 02: the module's round robin with a log line, the naive weighted
expansion, burst length, modulo hashing, remap counts and load spread.
Bookkeeping only; the strategies are in the library."""

from __future__ import annotations

import itertools
import logging
import math
import os
import random
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence

from ..strategies import Strategy
from . import as_written

__all__ = [
    "PolledLeastLoaded",
    "PolledTwoChoices",
    "get_server_with_log",
    "longest_run",
    "modulo_pick",
    "naive_weighted",
    "remapped",
    "route_log",
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


# The log line of get_server_with_log goes to a real file, so each record is a write(2):
# the thread releases the GIL there, as it does in any service that logs to a file or a pipe.
route_log = logging.getLogger("course_lib.lesson.routing")
route_log.propagate = False
route_log.setLevel(logging.INFO)
route_log.addHandler(logging.StreamHandler(open(os.devnull, "w")))  # noqa: SIM115 - lives with the process


def get_server_with_log() -> object:
    """The module's ``get_server`` with the log line a real service puts in it.

    Nothing else changes: it reads ``current``, logs which server it picked, then writes
    ``current + 1`` back. Writing the log record releases the GIL, so another thread can
    read the same ``current`` before this one writes it.
    """
    server = as_written.servers[as_written.current]
    route_log.info("routing request to %s", server)
    as_written.current = (as_written.current + 1) % len(as_written.servers)
    return server


class _Polled(Strategy):
    """A balancer that learns backend load by polling it every ``refresh_s`` seconds,
    as a fleet of balancers that do not share in-flight counts has to: between two
    polls every pick sees the same snapshot."""

    def __init__(self, servers: Sequence[str], *, refresh_s: float, seed: int = 0) -> None:
        self._refresh_s = refresh_s
        self._rng = random.Random(seed)
        self._polled_at = -math.inf
        self._snapshot: dict[str, int] = {}
        super().__init__(servers)

    def _rebuild(self) -> None:
        self._ring = self._up_list()

    def _loads(self) -> dict[str, int]:
        now = time.monotonic()
        if now - self._polled_at >= self._refresh_s:
            self._snapshot = {s: self._active[s] for s in self._ring}
            self._polled_at = now
        return self._snapshot


class PolledLeastLoaded(_Polled):
    """The least loaded server of the last poll, the first one on a tie (as ``min`` does):
    every pick until the next poll goes to the same server, a herd."""

    def _pick(self, key: str | None) -> str:
        loads = self._loads()
        return min(self._ring, key=loads.__getitem__)


class PolledTwoChoices(_Polled):
    """The less loaded of two random servers, judged on the same stale poll."""

    def _pick(self, key: str | None) -> str:
        loads = self._loads()
        a, b = self._rng.sample(self._ring, 2)
        return b if loads[b] < loads[a] else a
