"""The latency ladder of notebook 00: what one operation costs, from a dict to a new connection.

Each rung is measured on the real services and summarised by its median and p99, so the
course can keep referring to it ("that is one Redis round trip, about 100x a dict lookup").
Rungs with ``per > 1`` (dict lookups, pipelined GETs) are timed a batch at a time and divided
by the batch: their p50 and p99 are percentiles of batch averages, per operation, not the
latency of single operations (one lookup is too short to time alone; a pipeline's point is
the batch).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd
import redis
from sqlalchemy import Engine, NullPool, create_engine, text

from .measure import percentiles, time_calls

__all__ = ["RUNGS", "Rung", "measure_ladder"]


@dataclass(frozen=True)
class Rung:
    """One step of the ladder: its name, what it teaches, and how many keys one call covers."""

    name: str
    why: str
    per: int = 1


RUNGS = (
    Rung("Python dict lookup", "In-process memory: no system call, no network."),
    Rung("Redis GET", "One network round trip to Redis: the unit every cache hit pays."),
    Rung(
        "Redis pipelined GET (per key)",
        "100 GETs share one round trip, so each key costs a small fraction of a GET.",
        per=100,
    ),
    Rung(
        "PostgreSQL SELECT 1 (pooled)",
        "Pool checkout plus one round trip to PostgreSQL on an open connection (autocommit).",
    ),
    Rung(
        "PostgreSQL new connection",
        "Connect, authenticate and start a backend process: why pools exist.",
    ),
)


def _sample(fn: Callable[[], object], n: int, per: int) -> list[float]:
    return [s / per for s in time_calls(fn, n, warmup=max(1, n // 20))]


def measure_ladder(
    client: redis.Redis,
    engine: Engine,
    *,
    samples: int = 400,
    batch: int = 100,
) -> pd.DataFrame:
    """Measure every rung of :data:`RUNGS`; one row per rung with p50/p99 in seconds, ``n``
    samples and ``per`` operations per sample (p50/p99 of batch averages when ``per > 1``).

    ``engine`` only supplies the URL. ``samples`` calls per rung (a tenth of that for new
    connections, which are slow); ``batch`` keys per pipeline and dict-lookup sample.
    Keys it writes are deleted afterwards.
    """
    if samples < 20:
        raise ValueError(f"samples must be at least 20, got {samples}")
    if batch < 1:
        raise ValueError(f"batch must be positive, got {batch}")
    prefix = f"ladder:{uuid.uuid4().hex[:8]}"
    keys = [f"{prefix}:{i}" for i in range(batch)]
    client.mset({k: "x" * 64 for k in keys})
    table = {k: "x" * 64 for k in keys}
    # Pre-ping and the implicit BEGIN/ROLLBACK would each add a round trip and blur the rung.
    pooled = create_engine(
        engine.url, pool_size=1, pool_pre_ping=False, isolation_level="AUTOCOMMIT"
    )
    fresh = create_engine(engine.url, poolclass=NullPool)

    def dict_lookups() -> None:
        for k in keys:
            table[k]

    def pipelined() -> None:
        pipe = client.pipeline(transaction=False)
        for k in keys:
            pipe.get(k)
        pipe.execute()

    def pooled_select() -> None:
        with pooled.connect() as conn:
            conn.execute(text("SELECT 1")).scalar_one()

    def new_connection() -> None:
        with fresh.connect() as conn:
            conn.execute(text("SELECT 1")).scalar_one()

    plan = {
        RUNGS[0].name: (dict_lookups, samples, batch),
        RUNGS[1].name: (lambda: client.get(keys[0]), samples, 1),
        RUNGS[2].name: (pipelined, samples // 4, batch),
        RUNGS[3].name: (pooled_select, samples, 1),
        RUNGS[4].name: (new_connection, max(10, samples // 10), 1),
    }
    rows = []
    try:
        for rung in RUNGS:
            fn, n, per = plan[rung.name]
            values = _sample(fn, n, per)
            p = percentiles(values)
            rows.append(
                {
                    "rung": rung.name,
                    "p50_s": p["p50"],
                    "p99_s": p["p99"],
                    "n": n,
                    "per": per,
                    "why": rung.why,
                }
            )
    finally:
        client.delete(*keys)
        pooled.dispose()
        fresh.dispose()
    return pd.DataFrame(rows).set_index("rung")
