"""Rate limiting: cost per decision of the course_lib limiters against `limits`,
`throttled-py`, `pyrate-limiter` and the seed, measured in one interleaved run on a private
Redis that nothing else uses (started for the run, on a Unix socket).

- Redis limiters, one decision per call on 1000 rotating keys with a quota never exhausted
  (every decision is an admission, the common case). Two yardsticks per subject:
  * ``per decision``: time / one raw PING (no target: a script does work a PING does not);
  * ``/ floor``: time / (PING + the server's own time for that subject's commands, the
    delta of ``INFO commandstats`` around its batch). What is left above 1.0x is what the
    client adds (argument encoding, reply parsing, the call path). Target <= 1.10x for
    course_lib. The spread of that ratio over the rounds is printed with it.
  * ``server time``: the server's microseconds per decision, against limits' fixed window
    (a bare INCR with expiry, the cheapest possible). course_lib's scripts pay for: reading
    the server clock (``TIME``, so processes with skewed clocks agree), the clock-step clamp,
    and computing ``remaining`` / ``retry_after`` / ``reset_after`` for the headers.
- ``hit_many``: 100 decisions per pipelined round trip, cost per decision. Target <= 0.2x PING.
- In-process: ``TokenBucket.consume`` against limits' in-memory fixed window. Target <= 0.25x.
- ASGI middleware, requests per second with a sync limiter (a worker-thread hop per request)
  against the asyncio limiter (awaited on the loop), 32 concurrent requests driven in
  process. No target: which wins depends on the machine. The thread hop costs a context
  switch per request, but redis-py's asyncio client spends more CPU per command than the
  blocking one, and with 32 requests in flight the thread pool overlaps their round trips
  as well as the event loop does. The async limiter's gain is elsewhere: no thread pool to
  size (anyio's default is 40 threads, a hidden concurrency cap) and no blocked threads
  when Redis stalls.
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import redis.asyncio
from harness import Row, interleaved, per_call
from limits import RateLimitItemPerMinute
from limits.storage import MemoryStorage, RedisStorage
from limits.strategies import (
    FixedWindowRateLimiter,
    MovingWindowRateLimiter,
    SlidingWindowCounterRateLimiter,
)
from pyrate_limiter import Duration, InMemoryBucket, Limiter, Rate, RedisBucket
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from throttled import RedisStore, Throttled, per_min
from tqdm import tqdm

from course_lib import services
from course_lib.rate_limiting import (
    GCRA,
    FixedWindow,
    RateLimitMiddleware,
    RedisTokenBucket,
    SlidingWindowCounter,
    SlidingWindowLog,
    TokenBucket,
    aio,
)
from course_lib.rate_limiting.lesson import as_written

BENCH = "rate_limiting"
HUGE = 10**9  # a quota no benchmark run can exhaust
KEYS = 1000
BATCH = 100


def _limits_uri(url: str) -> str:
    return "redis+unix://" + url.removeprefix("unix://") if url.startswith("unix://") else url


def _rotating(fn: Callable[[str], object], keys: list[str]) -> Callable[[], object]:
    cycle = itertools.cycle(keys)
    return lambda: fn(next(cycle))


def _redis_subjects(client, url: str, ns: str) -> dict[str, Callable[[], object]]:
    keys = [f"k{i}" for i in range(KEYS)]
    ours = {
        "FixedWindow": FixedWindow(client, HUGE, 60, prefix=f"{ns}:fw"),
        "SlidingWindowLog": SlidingWindowLog(client, HUGE, 60, prefix=f"{ns}:swl"),
        "SlidingWindowCounter": SlidingWindowCounter(client, HUGE, 60, prefix=f"{ns}:swc"),
        "RedisTokenBucket": RedisTokenBucket(client, HUGE, HUGE / 60, prefix=f"{ns}:tb"),
        "GCRA": GCRA(client, 1e6, HUGE, prefix=f"{ns}:gcra"),
    }
    uri = _limits_uri(url)
    item = RateLimitItemPerMinute(HUGE)
    theirs = {
        name: strategy(RedisStorage(uri, key_prefix=f"{ns}:{tag}"))
        for name, strategy, tag in (
            ("limits fixed window", FixedWindowRateLimiter, "lfw"),
            ("limits sliding window counter", SlidingWindowCounterRateLimiter, "lswc"),
            ("limits moving window", MovingWindowRateLimiter, "lmw"),
        )
    }
    pyrate = Limiter(RedisBucket.init([Rate(HUGE, Duration.MINUTE)], client, f"{ns}:pyrate"))
    store = RedisStore(server=url)
    throttled = {
        f"throttled-py {using}": Throttled(
            using=using, quota=per_min(HUGE), store=store, key_prefix=f"{ns}:thr"
        )
        for using in ("fixed_window", "sliding_window", "token_bucket", "gcra")
    }
    subjects: dict[str, Callable[[], object]] = {"PING": client.ping}
    for name, limiter in ours.items():
        subjects[f"course_lib {name}.hit"] = _rotating(limiter.hit, keys)
    for name, strategy in theirs.items():
        subjects[name] = _rotating(lambda key, s=strategy: s.hit(item, key), keys)
    for name, limiter in throttled.items():
        subjects[name] = _rotating(lambda key, t=limiter: t.limit(key), keys)
    subjects["pyrate-limiter RedisBucket"] = _rotating(
        lambda key: pyrate.try_acquire(key, blocking=False), keys
    )
    subjects["seed is_rate_limited"] = _rotating(
        lambda key: as_written.is_rate_limited(f"{ns}:{key}", HUGE, 60, cache=client), keys
    )
    batches = itertools.cycle([keys[i : i + BATCH] for i in range(0, KEYS, BATCH)])
    batch_limiter = ours["FixedWindow"]
    subjects[f"course_lib FixedWindow.hit_many x{BATCH}"] = lambda: batch_limiter.hit_many(
        next(batches)
    )
    return subjects


def _in_process_subjects() -> dict[str, Callable[[], object]]:
    item = RateLimitItemPerMinute(HUGE)
    limits_memory = FixedWindowRateLimiter(MemoryStorage())
    pyrate = Limiter(InMemoryBucket([Rate(HUGE, Duration.MINUTE)]))
    bucket = TokenBucket(HUGE, HUGE / 60)
    return {
        "limits in-memory fixed window": lambda: limits_memory.hit(item, "k"),
        "pyrate-limiter InMemoryBucket": lambda: pyrate.try_acquire("k", blocking=False),
        "course_lib TokenBucket.consume": bucket.consume,
    }


def _server_usec(client) -> float:
    """Microseconds the server has spent on every command but INFO, since it started."""
    stats = client.info("commandstats")
    return sum(v["usec"] for k, v in stats.items() if k != "cmdstat_info")


def _floor_run(
    client, subjects: dict[str, Callable[[], object]], calls: int, rounds: int
) -> dict[str, tuple[list[float], list[float]]]:
    """Per subject and round: seconds per call and server seconds per call, interleaved."""
    out: dict[str, tuple[list[float], list[float]]] = {n: ([], []) for n in subjects}
    for fn in subjects.values():
        per_call(fn, max(1, calls // 10))
    for _ in tqdm(range(rounds), desc="rounds", unit="round", leave=False, file=sys.stderr):
        for name, fn in subjects.items():
            before = _server_usec(client)
            seconds = per_call(fn, calls)
            server = (_server_usec(client) - before) / 1e6 / calls
            out[name][0].append(seconds)
            out[name][1].append(server)
    return out


def _redis_rows(url: str, quick: bool) -> list[Row]:
    calls, rounds = (100, 3) if quick else (1000, 15)
    client = redis.Redis.from_url(url)
    try:
        runs = _floor_run(client, _redis_subjects(client, url, "b"), calls, rounds)
    finally:
        client.close()
    ping_times, _ = runs.pop("PING")
    ping = statistics.median(ping_times)
    base_server = statistics.median(runs["limits fixed window"][1])
    rows = []
    for subject, (times, servers) in runs.items():
        seconds = statistics.median(times)
        if "hit_many" in subject:
            rows.append(
                Row(BENCH, subject, "per decision", seconds / BATCH * 1e6, "us", "PING",
                    ping * 1e6, target=0.2)
            )  # fmt: skip
            continue
        ours = subject.startswith("course_lib")
        floors = [p + s for p, s in zip(ping_times, servers, strict=True)]
        spread = [t / f for t, f in zip(times, floors, strict=True)]
        floor = statistics.median(floors)
        rows += [
            Row(BENCH, subject, "per decision", seconds * 1e6, "us", "PING", ping * 1e6),
            Row(BENCH, subject, f"/ floor (rounds {min(spread):.2f}-{max(spread):.2f}x)",
                seconds * 1e6, "us", "PING + server time", floor * 1e6, 1.10 if ours else None),
            Row(BENCH, subject, "server time", statistics.median(servers) * 1e6, "us",
                "limits fixed window", base_server * 1e6),
        ]  # fmt: skip
    return rows


def _middleware_rps(
    make_limiter: Callable[[], object], requests: int, concurrency: int = 32
) -> float:
    """Requests per second through the middleware; ``make_limiter`` runs on the loop used
    (an asyncio client belongs to one loop)."""

    async def home(request: object) -> PlainTextResponse:
        return PlainTextResponse("ok")

    scope = {
        "type": "http", "http_version": "1.1", "method": "GET", "path": "/", "raw_path": b"/",
        "query_string": b"", "headers": [], "client": ("127.0.0.1", 1), "server": ("t", 80),
        "scheme": "http", "root_path": "",
    }  # fmt: skip

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, object]) -> None:
        return None

    async def main() -> float:
        limiter = make_limiter()
        app = RateLimitMiddleware(Starlette(routes=[Route("/", home)]), limiter)  # type: ignore[arg-type]

        async def worker(n: int) -> None:
            for _ in range(n):
                await app(dict(scope), receive, send)

        try:
            await worker(20)  # warm up: connections, thread pool
            start = time.perf_counter()
            await asyncio.gather(*(worker(requests // concurrency) for _ in range(concurrency)))
            return (requests // concurrency * concurrency) / (time.perf_counter() - start)
        finally:
            if isinstance(limiter.redis, redis.asyncio.Redis):
                await limiter.redis.aclose()

    return asyncio.run(main())


def _middleware_rows(url: str, quick: bool) -> list[Row]:
    requests, rounds = (640, 3) if quick else (6400, 7)
    sync_client = redis.Redis.from_url(url, max_connections=64)
    sync_rps, async_rps = [], []
    try:
        for _ in tqdm(range(rounds), desc="middleware", leave=False, file=sys.stderr):
            sync_rps.append(
                _middleware_rps(lambda: GCRA(sync_client, 1e6, HUGE, prefix="mw:s"), requests)
            )
            async_rps.append(
                _middleware_rps(
                    lambda: aio.GCRA(redis.asyncio.Redis.from_url(url), 1e6, HUGE, prefix="mw:a"),
                    requests,
                )
            )
    finally:
        sync_client.close()
    base = statistics.median(sync_rps)
    return [
        Row(BENCH, "middleware, sync GCRA (thread hop)", "requests/s", base, "req/s",
            "sync limiter", base),
        Row(BENCH, "middleware, aio.GCRA (awaited)", "requests/s", statistics.median(async_rps),
            "req/s", "sync limiter", base, higher_is_better=True),
    ]  # fmt: skip


def run(quick: bool) -> list[Row]:
    # A private server: nothing else's commands land in its INFO commandstats.
    with tempfile.TemporaryDirectory(prefix="bench-rl-", dir="/tmp") as folder:
        server = services.EmbeddedRedis(Path(folder) / "redis")
        url = server.start()
        try:
            rows = _redis_rows(url, quick) + _middleware_rows(url, quick)
        finally:
            server.stop()
    local = interleaved(
        _in_process_subjects(), calls=2000 if quick else 50000, rounds=3 if quick else 9
    )
    base = local.pop("limits in-memory fixed window")
    for subject, seconds in local.items():
        target = 0.25 if subject.startswith("course_lib") else None
        rows.append(
            Row(BENCH, subject, "per decision", seconds * 1e6, "us",
                "limits in-memory fixed window", base * 1e6, target)
        )  # fmt: skip
    return rows
