"""Profiling: what each profiler and OpenTelemetry tracing add to one request, as a ratio to
the same request unprofiled, all measured in the same interleaved rounds.

Workloads: the blog's slow listing of notebook 05 (an N+1 of 52 SQL statements, a GCRA
check on Redis, JSON built one call per character) and its fixed listing (one statement, one
cached Redis GET, ``json.dumps``). Subjects: cProfile, pyinstrument (1 ms), tracemalloc and
OpenTelemetry (every SQL statement and Redis command a span, in-memory exporter). Target:
tracing <= 1.5x the unprofiled request (what an always-on agent may cost).
"""

from __future__ import annotations

import uuid

from harness import Row

from course_lib import services
from course_lib.profiling import (
    BUILTIN_PROFILERS,
    UNPROFILED,
    builtin_profiler,
    overhead,
    tracing,
)
from course_lib.profiling.lesson.service import Blog, seed_blog

BENCH = "profiling"
TRACING_TARGET = 1.5


def run(quick: bool) -> list[Row]:
    schema = services.unique_schema("bench05")
    engine = services.schema_engine(schema)
    client = services.redis_client()
    blog = Blog(engine, client, f"bench05:{uuid.uuid4().hex[:8]}")
    calls, rounds = (2, 3) if quick else (5, 9)
    rows: list[Row] = []
    try:
        seed_blog(engine)
        subjects = {name: builtin_profiler(name) for name in BUILTIN_PROFILERS}
        subjects["opentelemetry"] = lambda: tracing(engines=[engine])
        for workload, handler in (
            ("slow listing", blog.slow_listing),
            ("fixed listing", blog.fast_listing),
        ):
            table = overhead(handler, subjects, calls=calls, rounds=rounds)
            per_call = dict(zip(table["profiler"], table["per_call_s"], strict=True))
            base = per_call.pop(UNPROFILED)
            for name, seconds in per_call.items():
                rows.append(
                    Row(
                        BENCH,
                        f"{name} ({workload})",
                        "time per request",
                        seconds * 1e3,
                        "ms",
                        "unprofiled",
                        base * 1e3,
                        TRACING_TARGET if name == "opentelemetry" else None,
                    )
                )
    finally:
        blog.clear()
        client.close()
        engine.dispose()
        services.drop_schema(schema)
    return rows
