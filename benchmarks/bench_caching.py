"""Caching: course_lib's CacheAside against dogpile.cache (Redis backend, distributed lock) and
cachetools, in the same run.

1. Hit path: seconds per ``get`` of a cached user row, divided by a raw ``GET`` + ``json.loads``
   on the same connection (target <= 1.10x for course_lib). dogpile is configured with a JSON
   serialiser (its default is pickle, which the course never reads from Redis). cachetools is
   an in-process dict, shown for scale: it never leaves the process.
2. Stampede: 100 concurrent misses of one key, 4 processes x 25 threads, loader of ``delay``
   seconds; loader calls counted in Redis (target 1), and the p99 latency of the 100 callers
   divided by the loader's own duration.
"""

from __future__ import annotations

import json
import threading
import time
import uuid

import cachetools
from dogpile.cache import make_region
from harness import Row, interleaved

from course_lib import services
from course_lib.caching import CacheAside
from course_lib.measure import percentiles, run_processes, run_threads

ROW = {
    "id": 1,
    "name": "Ana Silva",
    "email": "ana.silva1@example.com",
    "plan": "pro",
    "score": 731,
    "version": 3,
}


def _dogpile(namespace: str, lock_timeout: float):
    region = make_region(
        key_mangler=lambda key: f"{namespace}:{key}",
        serializer=lambda value: json.dumps(value).encode(),
        deserializer=json.loads,
    )
    return region.configure(
        "dogpile.cache.redis",
        expiration_time=600,
        arguments={
            "url": services.redis_url(),
            "distributed_lock": True,
            "lock_timeout": lock_timeout,
            "redis_expiration_time": 600,
            "thread_local_lock": False,
        },
    )


def _hit_path(quick: bool, ns: str) -> list[Row]:
    client = services.redis_client()
    raw_key = f"{ns}:raw:1"
    client.set(raw_key, json.dumps(ROW))
    ours = CacheAside(client, lambda k: ROW, ttl=600, namespace=f"{ns}:cl")
    ours.get(1)
    region = _dogpile(f"{ns}:dp", lock_timeout=10)
    region.get_or_create("1", lambda: ROW)
    memo = cachetools.cached(cachetools.TTLCache(1024, 600), lock=threading.Lock())(lambda k: ROW)
    memo(1)
    assert ours.get(1) == region.get_or_create("1", lambda: ROW) == memo(1) == ROW
    subjects = {
        "raw GET+json.loads": lambda: json.loads(client.get(raw_key)),
        "course_lib": lambda: ours.get(1),
        "dogpile.cache": lambda: region.get_or_create("1", lambda: ROW),
        "cachetools": lambda: memo(1),
    }
    times = interleaved(subjects, calls=300 if quick else 3000, rounds=3 if quick else 15)
    client.close()
    base = times["raw GET+json.loads"] * 1e6
    return [
        Row(
            "caching hit path",
            name,
            "time per hit",
            times[name] * 1e6,
            "µs",
            "raw GET+json.loads",
            base,
            target=1.10 if name == "course_lib" else None,
        )
        for name in ("course_lib", "dogpile.cache", "cachetools")
    ]


def _stampede(subject: str, ns: str, delay: float) -> tuple[int, float]:
    counter = f"{ns}:{subject}:loads"

    def body() -> list[float]:
        client = services.redis_client()

        def loader(key=None):
            client.incr(counter)
            time.sleep(delay)
            return ROW

        if subject == "course_lib":
            cache = CacheAside(client, loader, ttl=600, namespace=f"{ns}:{subject}")

            def get():
                return cache.get(1)

        elif subject == "dogpile.cache":
            region = _dogpile(f"{ns}:{subject}", lock_timeout=30)

            def get():
                return region.get_or_create("1", loader)

        else:
            memo = cachetools.cached(
                cachetools.TTLCache(1024, 600),
                lock=threading.Lock(),
                condition=threading.Condition(),
            )(loader)

            def get():
                return memo(1)

        run_threads(lambda: client.ping(), 25)  # a warm connection pool, as in a live service
        return run_threads(get, 25, timeout=60).latencies

    latencies = [x for chunk in run_processes(body, 4, timeout=120).values for x in chunk]
    client = services.redis_client()
    loads = int(client.get(counter) or 0)
    client.close()
    return loads, percentiles(latencies)["p99"]


def run(quick: bool) -> list[Row]:
    ns = f"bench:caching:{uuid.uuid4().hex[:8]}"
    try:
        rows = _hit_path(quick, ns)
        delay = 0.05 if quick else 0.2
        for subject in ("course_lib", "dogpile.cache", "cachetools"):
            loads, p99 = _stampede(subject, ns, delay)
            rows.append(
                Row(
                    "caching stampede 4x25",
                    subject,
                    "loader calls",
                    loads,
                    "calls",
                    "one call",
                    1,
                    target=1.0 if subject == "course_lib" else None,
                )
            )
            rows.append(
                Row(
                    "caching stampede 4x25",
                    subject,
                    "p99 of 100 callers",
                    p99 * 1e3,
                    "ms",
                    "loader time",
                    delay * 1e3,
                )
            )
        return rows
    finally:
        client = services.redis_client()
        keys = list(client.scan_iter(match=f"{ns}*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()
