"""The latency ladder of notebook 00, as ratios to one Redis GET measured in the same run."""

from __future__ import annotations

from harness import Row

from course_lib import services
from course_lib.ladder import measure_ladder


def run(quick: bool) -> list[Row]:
    client = services.redis_client()
    engine = services.engine()
    try:
        ladder = measure_ladder(client, engine, samples=40 if quick else 2000)
    finally:
        client.close()
        engine.dispose()
    baseline = float(ladder.loc["Redis GET", "p50_s"])
    return [
        Row("ladder", rung, "p50 per op", float(p50) * 1e6, "us", "Redis GET", baseline * 1e6)
        for rung, p50 in ladder["p50_s"].items()
    ]
