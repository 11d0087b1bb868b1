"""The latency ladder of notebook 00: what one operation costs, from a dict to a new connection.

Each rung is measured on the real services and summarised by its median and p99, so the
course can keep referring to it ("that is one Redis round trip, about 100x a dict lookup").
Rungs with ``per > 1`` (dict lookups, pipelined GETs) are timed a batch at a time and divided
by the batch: their p50 and p99 are percentiles of batch averages, per operation, not the
latency of single operations (one lookup is too short to time alone; a pipeline's point is
the batch).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import redis
from sqlalchemy import Engine, NullPool, create_engine, text

from .measure import percentiles, time_calls

__all__ = ["RATIOS", "RUNGS", "RUNS_FILE", "Rung", "measure_ladder", "ratios", "record_run"]


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
    """Measure every rung of :data:`RUNGS`; one row per rung with p50/p99 and the best
    (fastest) sample in seconds, ``n`` samples and ``per`` operations per sample (of batch
    averages when ``per > 1``). The best sample is the cost with the least interference from
    other processes: on loaded cores medians swing, the best moves far less.

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
                    "best_s": min(values),
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


# The four ratios notebook 00 quotes: (name, numerator rung, denominator rung).
RATIOS = (
    ("GET / dict lookup", RUNGS[1].name, RUNGS[0].name),
    ("pipelined key / GET", RUNGS[2].name, RUNGS[1].name),
    ("pooled SELECT 1 / GET", RUNGS[3].name, RUNGS[1].name),
    ("new connection / pooled SELECT 1", RUNGS[4].name, RUNGS[3].name),
)

# Runs of the ladder the project keeps, on idle and on loaded cores (see record_run).
RUNS_FILE = Path(__file__).resolve().parents[1] / "data" / "ladder_runs.csv"


def ratios(p50: Mapping[str, float]) -> dict[str, float]:
    """The :data:`RATIOS` of one ladder's medians (``p50[rung name]`` in seconds)."""
    return {name: p50[top] / p50[bottom] for name, top, bottom in RATIOS}


def _spin(stop: float) -> None:
    while time.monotonic() < stop:
        pass


def record_run(
    client: redis.Redis, engine: Engine, *, busy: int, path: Path = RUNS_FILE
) -> dict[str, object]:
    """Measure the ladder while ``busy`` extra processes spin on the CPU (0: as the machine
    is), append its ratios to ``path`` (CSV), of the medians (``p50 ...``) and of the best
    samples (``best ...``), and return the row.

    The row keeps the conditions with the numbers: the extra processes, the 1-minute load
    average when the run started and the machine's core count, so a reader can see which
    ratios hold on a loaded machine and which swing.
    """
    if busy < 0:
        raise ValueError(f"busy must be 0 or more, got {busy}")
    load = os.getloadavg()[0]
    ctx = mp.get_context("fork")
    spinners = [ctx.Process(target=_spin, args=(time.monotonic() + 120,)) for _ in range(busy)]
    for proc in spinners:
        proc.start()
    try:
        ladder = measure_ladder(client, engine)
    finally:
        for proc in spinners:
            proc.terminate()
            proc.join()
    row: dict[str, object] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M"),
        "busy_processes": busy,
        "load_1min": round(load, 2),
        "cores": os.cpu_count(),
        **{
            f"{stat} {name}": round(value, 4)
            for stat in ("p50", "best")
            for name, value in ratios(ladder[f"{stat}_s"].to_dict()).items()
        },
    }
    frame = pd.DataFrame([row])
    frame.to_csv(path, mode="a", header=not path.exists(), index=False)
    return row


if __name__ == "__main__":  # pragma: no cover - run by hand to add rows to RUNS_FILE
    import argparse

    from . import services

    parser = argparse.ArgumentParser(description="Append one ladder run to data/ladder_runs.csv")
    parser.add_argument("--busy", type=int, default=0, help="extra processes spinning on a CPU")
    args = parser.parse_args()
    redis_client, sql_engine = services.redis_client(), services.engine()
    try:
        print(record_run(redis_client, sql_engine, busy=args.busy))
    finally:
        redis_client.close()
        sql_engine.dispose()
