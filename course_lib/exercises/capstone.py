"""Exercises of notebook 06 (the capstone); each checker runs the student's code for real.

- :func:`check_capacity_plan`: processes and pool size for a target rate, from a request's
  measured CPU and database time (utilisation per process, Little's law for connections,
  notebook 04's ``2 x cores`` rule), refusing a target the machine cannot serve; checked on
  cases drawn at random (so no fixed table passes) and on the boundaries.
- :func:`check_paid_fallback`: the limiter of a paid API when Redis is down: neither open
  (a scraper gets through) nor closed (paying clients get 429s), but a local bucket with a
  share of the quota per process; checked on a Redis of the checker's own, up and down, with
  the requests of one client spread over several "processes" (limiter instances).
"""

from __future__ import annotations

import math
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from course_lib.services import EmbeddedRedis, fail_fast_redis

from .result import CheckResult, failed, not_attempted, passed

__all__ = ["BUSY_SHARE", "check_capacity_plan", "check_paid_fallback", "reference_plan"]

BUSY_SHARE = 0.7  # a process (or a connection) busier than this queues too long for p99


def reference_plan(rate: float, cpu_ms: float, db_ms: float, *, cores: int) -> tuple[int, int]:
    """The answer :func:`check_capacity_plan` expects (see its docstring)."""
    processes = max(1, math.ceil(rate * cpu_ms / 1000 / BUSY_SHARE))
    if processes > cores:
        raise ValueError(f"rate: {processes} busy processes needed, only {cores} cores")
    connections = max(processes, math.ceil(rate * db_ms / 1000 / BUSY_SHARE))
    pool_size = math.ceil(connections / processes)
    if pool_size * processes > 2 * cores:
        raise ValueError(f"rate: {pool_size * processes} connections needed, 2 x {cores} allowed")
    return processes, pool_size


def _cases(rng: random.Random) -> list[tuple[float, float, float, int]]:
    fixed = [
        (100.0, 7.0, 3.0, 2),  # exactly 1 process at 70 %: not 2
        (100.0, 7.01, 3.0, 2),  # a hair more: 2 processes
        (300.0, 2.0, 7.0, 2),  # 3 connections, 1 process: pool 3
        (300.0, 5.0, 7.0, 4),  # 3 connections over 3 processes: 1 each
        (400.0, 5.0, 7.0, 4),  # 4 connections over 3 processes: 2 each (6 in all)
        (500.0, 1.0, 9.0, 2),  # 7 connections > 2 x 2 cores: impossible
        (900.0, 2.0, 1.0, 2),  # 3 processes on 2 cores: impossible
        (10.0, 0.5, 0.5, 1),  # tiny: one process, one connection
    ]
    drawn = [
        (
            float(rng.randrange(20, 900, 10)),
            round(rng.uniform(0.3, 8.0), 2),
            round(rng.uniform(0.3, 12.0), 2),
            rng.choice([2, 4, 8]),
        )
        for _ in range(40)
    ]
    return fixed + drawn


def check_capacity_plan(
    plan: Callable[..., tuple[int, int]], *, seed: int | None = None
) -> CheckResult:
    """``plan(rate, cpu_ms, db_ms, cores=...)`` returns ``(processes, pool_size)`` for a
    target ``rate`` (requests/s) when one request costs ``cpu_ms`` of an app process's CPU
    and holds a database connection ``db_ms``, on ``cores`` cores shared by the app and
    PostgreSQL:

    - the fewest processes that keep each under 70 % busy (one process uses one core);
    - connections: Little's law gives ``rate x db time`` busy on average; keep them under
      70 % busy too, at least one per process, spread evenly (``pool_size`` per process);
    - ``ValueError`` (the target needs a cache, not more processes) when more processes
      than cores would be needed, or more than ``2 x cores`` connections in all.

    Checked on fixed boundary cases and 40 drawn at random (``seed``)."""
    name = "check_capacity_plan"
    rng = random.Random(seed)
    for rate, cpu_ms, db_ms, cores in _cases(rng):
        try:
            expected: Any = reference_plan(rate, cpu_ms, db_ms, cores=cores)
        except ValueError:
            expected = ValueError
        call = f"plan({rate:g}, cpu_ms={cpu_ms:g}, db_ms={db_ms:g}, cores={cores})"
        try:
            got: Any = plan(rate, cpu_ms, db_ms, cores=cores)
        except NotImplementedError:
            return not_attempted(name, "implement plan")
        except ValueError:
            got = ValueError
        if got != expected:
            want = "ValueError" if expected is ValueError else f"{expected}"
            said = "ValueError" if got is ValueError else f"{got!r}"
            return failed(name, f"{call} should give {want}, gave {said}")
    return passed(name, "48 cases, boundaries and random ones, processes and pools as expected")


class _OwnRedis:
    """A Redis of the checker's own (a private folder, a Unix socket), and a URL where no
    Redis answers."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="pc-ex06-"))
        self.server = EmbeddedRedis(self.root)
        self.url = self.server.start()
        self.dead_url = f"unix://{self.root / 'nobody.sock'}"

    def close(self) -> None:
        self.server.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def _admitted(limiters: list[Any], key: str, seconds: float, *, spread: bool) -> int:
    """Hit ``key`` as fast as possible for ``seconds``, on every limiter in turn
    (``spread``) or on the first only (a client whose requests all reach one process)."""
    admitted = 0
    end = time.monotonic() + seconds
    i = 0
    while time.monotonic() < end:
        limiter = limiters[i % len(limiters)] if spread else limiters[0]
        admitted += bool(limiter.hit(key))
        i += 1
    return admitted


def check_paid_fallback(
    paid_limiter: Callable[..., Any], *, rate: float = 40.0, burst: int = 8, processes: int = 4
) -> CheckResult:
    """``paid_limiter(redis, rate=, burst=, processes=)`` returns one process's limiter (a
    ``hit(key)`` whose result is truthy when admitted) on a synchronous ``redis.Redis``.

    Checked with ``processes`` instances (the service's processes) for one client sending
    as fast as it can for 0.6 s:

    - Redis up, every request reaching one process: the client gets its whole quota
      (``burst + rate x t``, within 15 %), as the shared limiter gives it;
    - Redis down, requests spread over the processes: in all, no more than the quota (plus
      one request per process) and at least half of it: a paying client is served and a
      scraper is still held back;
    - Redis down: a second client has a quota of its own (at least 3/4 of its burst at
      once, right after the first client used up its own).
    """
    name = "check_paid_fallback"
    seconds = 0.6
    quota = burst + rate * seconds
    own = _OwnRedis()
    clients = []
    try:
        up = fail_fast_redis(own.url, timeout=0.5)
        down = fail_fast_redis(own.dead_url, timeout=0.5)
        clients = [up, down]
        try:
            live = [
                paid_limiter(up, rate=rate, burst=burst, processes=processes)
                for _ in range(processes)
            ]
        except NotImplementedError:
            return not_attempted(name, "implement paid_limiter")
        got = _admitted(live, "alice", seconds, spread=False)
        if not 0.85 * quota <= got <= 1.15 * quota + 1:
            return failed(
                name,
                f"Redis up, one process: admitted {got} in {seconds} s, expected the shared "
                f"quota, about {quota:.0f} (burst {burst} + {rate:g}/s)",
            )
        dead = [
            paid_limiter(down, rate=rate, burst=burst, processes=processes)
            for _ in range(processes)
        ]
        got = _admitted(dead, "bob", seconds, spread=True)
        if got > quota + processes:
            return failed(
                name,
                f"Redis down: {processes} processes admitted {got} in {seconds} s, more than "
                f"the quota of about {quota:.0f}: a scraper gets through",
            )
        if got < 0.5 * quota:
            return failed(
                name,
                f"Redis down: {processes} processes admitted {got} in {seconds} s, under half "
                f"the quota of about {quota:.0f}: paying clients are refused",
            )
        # right after bob emptied his quota, carol's burst is hers: 2 x burst requests at once
        other = sum(bool(dead[i % processes].hit("carol")) for i in range(2 * burst))
        if other < 0.75 * burst:
            return failed(
                name,
                f"Redis down: a second client got {other} of {2 * burst} requests sent at once "
                f"right after the first used its quota, under 3/4 of its burst of {burst}: "
                "quotas must be per key",
            )
    finally:
        for client in clients:
            client.close()
        own.close()
    # the admitted counts vary with timing: the message stays the same so outputs compare
    return passed(
        name,
        f"Redis up: the shared quota; Redis down: between half and all of the quota across "
        f"{processes} processes, per client",
    )
