"""The process py-spy records: ``python -m course_lib.profiling.lesson.workload SCHEMA NS``.

Runs the blog's slow listing (``--variant slow``) or the fixed one for ``--requests``
requests against a schema the caller has seeded (:func:`.service.seed_blog`), after one
untimed warm-up request, then prints how many it served and the seconds the request loop
took (``served 60 slow requests in 2.345 s``), so a parent can compare the loop's time with
and without a profiler attached.
Services come from :mod:`course_lib.services` (pass ``REDIS_URL`` / ``DATABASE_URL`` in the
environment to reuse the parent's choice).
"""

from __future__ import annotations

import argparse
import time

from course_lib import services

from .service import Blog


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("schema", help="schema holding the seeded blog")
    parser.add_argument("namespace", help="Redis key prefix of this run")
    parser.add_argument("--variant", choices=("slow", "fast"), default="slow")
    parser.add_argument("--requests", type=int, default=100)
    args = parser.parse_args(argv)
    engine = services.schema_engine(args.schema)
    client = services.redis_client()
    blog = Blog(engine, client, args.namespace)
    handler = blog.slow_listing if args.variant == "slow" else blog.fast_listing
    try:
        # The first request opens the pool's connection, compiles the SQL and loads the
        # limiter's script: a one-off cost that would add noise to the loop's time.
        handler()
        start = time.perf_counter()
        for _ in range(args.requests):
            handler()
        elapsed = time.perf_counter() - start
    finally:
        blog.clear()
        client.close()
        engine.dispose()
    print(f"served {args.requests} {args.variant} requests in {elapsed:.3f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
