"""Rate limiting: cost per decision of the course_lib limiters against `limits`,
`throttled-py`, `pyrate-limiter` and the seed, measured in one interleaved run on a private
Redis that nothing else uses (started for the run, on a Unix socket).

- Redis limiters, one decision per call on 1000 rotating keys with a quota never exhausted
  (every decision is an admission, the common case). Yardsticks per subject:
  * ``per decision``: time / one raw PING (no target: a script does work a PING does not);
  * ``/ floor``: time / (PING + the server's own time for that subject's commands, the
    delta of ``INFO commandstats`` around its batch). Target <= 1.10x for course_lib. A
    command a script runs is counted by commandstats both on its own line and inside the
    script's EVALSHA, so only the commands the client itself sent are summed (told apart
    once, before the rounds, with ``MONITOR``, where a script's commands come from ``lua``).
  * ``/ payload floor`` (course_lib): time / (an EVALSHA of ``lua/payload_floor.lua``, a
    script that does nothing, sent with the same limiter's arguments and answering a reply
    of the same shape, + the limiter script's server time - that script's). PING sends 14
    bytes and gets 7; a decision sends about 130 and gets 35, which redis-py encodes and
    parses and the server reads, parses and answers outside the script's commandstats time.
    What is left above 1.0x here is course_lib's own client code. Target <= 1.10x.
  * ``where:`` rows split a course_lib decision into PING, what the payload adds over PING,
    the script's server time and the rest (course_lib's code plus noise: it is a difference
    of medians of round trips that vary by tens of microseconds on idle cores).
  * ``server time``: the server's microseconds per decision, against limits' fixed window.
  The spread of each floor ratio over the rounds is printed with it.
- ``fixed window trace``: the fixed window's server time built up one feature at a time
  (``lua/fw_*.lua``, then course_lib's ``fixed_window.lua``), each step with what it adds:
  limits' script (INCRBY + PEXPIRE); the server clock (windows aligned, processes with
  skewed clocks agree); refusals not counted plus the 4-value reply the RateLimit headers
  need; the window start stored beside the count (GET + SET PX: what makes the clock-step
  clamp and injected-clock replays possible); the clamp itself. Step 1 should match limits'
  own line: that is the check that the trace measures what limits pays.
- ``hit_many``: 100 decisions per pipelined round trip, cost per decision. Target <= 0.2x
  PING. Its ``where`` row is the script's server time per decision: the pipeline hides the
  round trip, not the server's work, nor redis-py's packing and parsing of each command.
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
from collections import Counter
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

from course_lib import lua, services
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
from course_lib.rate_limiting.redis_base import script

BENCH = "rate_limiting"
HUGE = 10**9  # a quota no benchmark run can exhaust
KEYS = 1000
BATCH = 100
LUA = Path(__file__).resolve().parent / "lua"
OURS = ("FixedWindow", "SlidingWindowLog", "SlidingWindowCounter", "RedisTokenBucket", "GCRA")
PAYLOAD = "payload floor"
TRACE = "fixed window trace"
# (file in benchmarks/lua, whether it reads the server clock, what the step adds)
TRACE_STEPS = (
    ("fw_1_incr_expire", False, "INCRBY + PEXPIRE in Lua (limits' script)"),
    ("fw_2_server_time", True, "+ server TIME, windows aligned"),
    ("fw_3_reply", True, "+ refusals not counted, 4-value reply"),
    ("fw_4_packed_state", True, "+ start:count string (GET + SET PX)"),
    ("fixed_window", True, "+ clock-step clamp, injected clock = course_lib"),
)


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
    payload = lua.Script(PAYLOAD, (LUA / "payload_floor.lua").read_text())
    for name, limiter in ours.items():
        # the limiter's own arguments, prepared beforehand: only the bytes are the same
        calls = itertools.cycle([limiter._call(key, 1) for key in keys])
        subjects[f"{PAYLOAD} {name}"] = lambda c=calls: payload(client, *next(c))
    clock = lua.load("course_lib.rate_limiting", "_now").source
    for step, (file, timed, _) in enumerate(TRACE_STEPS, 1):
        text = script(file).source if file == "fixed_window" else (LUA / f"{file}.lua").read_text()
        if timed and file != "fixed_window":
            text = clock + text
        traced = lua.Script(file, text)
        subjects[f"{TRACE} {step}"] = _rotating(
            lambda key, s=traced, n=step: s(
                client, (f"{ns}:t{n}:{{{key}}}",), ("", 1, HUGE, 60_000_000)
            ),
            keys,
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


def _top_level_shares(
    client, subjects: dict[str, Callable[[], object]], calls: int
) -> dict[str, dict[str, float]]:
    """Per subject, for each command it causes, the share of calls its client sent itself.

    ``INFO commandstats`` counts a command a script runs (``redis.call``) both on its own
    line and inside the script's ``EVALSHA`` time, so summing every line counts it twice.
    ``MONITOR`` tells the two apart (a script's commands come from client ``lua``).
    """
    shares = {}
    with client.monitor() as monitor:
        for name, fn in subjects.items():
            for _ in range(calls):
                fn()
            marker = f"end of {name}"
            client.echo(marker)
            top: Counter[str] = Counter()
            nested: Counter[str] = Counter()
            while (seen := monitor.next_command())["command"] != f"ECHO {marker}":
                word = seen["command"].split(" ", 1)[0].lower()
                (nested if seen["client_type"] == "lua" else top)[word] += 1
            shares[name] = {word: top[word] / (top[word] + nested[word]) for word in top}
    return shares


def _server_usec(client, shares: dict[str, float]) -> float:
    """Microseconds the server has spent, since it started, on the commands clients sent of
    those in ``shares`` (a script's own commands are inside its EVALSHA time)."""
    stats = client.info("commandstats")
    return sum(v["usec"] * shares.get(k.removeprefix("cmdstat_"), 0.0) for k, v in stats.items())


def _floor_run(
    client, subjects: dict[str, Callable[[], object]], calls: int, rounds: int
) -> dict[str, tuple[list[float], list[float]]]:
    """Per subject and round: seconds per call and server seconds per call, interleaved."""
    out: dict[str, tuple[list[float], list[float]]] = {n: ([], []) for n in subjects}
    shares = _top_level_shares(client, subjects, max(1, calls // 10))
    for _ in tqdm(range(rounds), desc="rounds", unit="round", leave=False, file=sys.stderr):
        for name, fn in subjects.items():
            before = _server_usec(client, shares[name])
            seconds = per_call(fn, calls)
            server = (_server_usec(client, shares[name]) - before) / 1e6 / calls
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
    med = statistics.median
    ping_times, _ = runs.pop("PING")
    ping = med(ping_times)
    payloads = {name: runs.pop(f"{PAYLOAD} {name}") for name in OURS}
    trace = [runs.pop(f"{TRACE} {step}")[1] for step in range(1, len(TRACE_STEPS) + 1)]
    base_server = med(runs["limits fixed window"][1])
    rows = []
    for subject, (times, servers) in runs.items():
        seconds = med(times)
        if "hit_many" in subject:
            rows += [
                Row(BENCH, subject, "per decision", seconds / BATCH * 1e6, "us", "PING",
                    ping * 1e6, target=0.2),
                Row(BENCH, subject, "where: script on the server", med(servers) / BATCH * 1e6,
                    "us", "per decision", seconds / BATCH * 1e6),
            ]  # fmt: skip
            continue
        name = subject.removeprefix("course_lib ").removesuffix(".hit")
        ours = name in payloads
        floors = [p + s for p, s in zip(ping_times, servers, strict=True)]
        spread = [t / f for t, f in zip(times, floors, strict=True)]
        rows += [
            Row(BENCH, subject, "per decision", seconds * 1e6, "us", "PING", ping * 1e6),
            Row(BENCH, subject, f"/ floor (rounds {min(spread):.2f}-{max(spread):.2f}x)",
                seconds * 1e6, "us", "PING + server time", med(floors) * 1e6,
                1.10 if ours else None),
            Row(BENCH, subject, "server time", med(servers) * 1e6, "us",
                "limits fixed window", base_server * 1e6),
        ]  # fmt: skip
        if ours:
            rows += _payload_rows(subject, times, servers, payloads[name], ping)
    return rows + _trace_rows(trace, base_server)


def _payload_rows(
    subject: str,
    times: list[float],
    servers: list[float],
    payload: tuple[list[float], list[float]],
    ping: float,
) -> list[Row]:
    """A course_lib limiter against the same EVALSHA bytes doing nothing, and where its time
    goes: PING, what the payload adds (encoding, the server parsing and replying, redis-py),
    the script's server time, and the rest: course_lib's own client code (argument checks,
    the script call, the Decision: a few microseconds) plus whatever the round trips' noise
    left in this difference of medians."""
    med = statistics.median
    payload_times, payload_servers = payload
    floors = [p + s - ps for p, s, ps in zip(payload_times, servers, payload_servers, strict=True)]
    spread = [t / f for t, f in zip(times, floors, strict=True)]
    seconds, server = med(times), med(servers)
    extra = med(payload_times) - ping - med(payload_servers)
    ours = seconds - med(payload_times) - server + med(payload_servers)
    return [
        Row(BENCH, subject, f"/ payload floor (rounds {min(spread):.2f}-{max(spread):.2f}x)",
            seconds * 1e6, "us", "same EVALSHA, no work + server time", med(floors) * 1e6, 1.10),
        Row(BENCH, subject, "where: PING round trip", ping * 1e6, "us", "per decision",
            seconds * 1e6),
        Row(BENCH, subject, "where: payload over PING", extra * 1e6, "us", "per decision",
            seconds * 1e6),
        Row(BENCH, subject, "where: script on the server", server * 1e6, "us", "per decision",
            seconds * 1e6),
        Row(BENCH, subject, "where: rest (course_lib code, noise)", ours * 1e6, "us",
            "per decision", seconds * 1e6),
    ]  # fmt: skip


def _trace_rows(trace: list[list[float]], limits_server: float) -> list[Row]:
    """Server time of the fixed window, one feature at a time (see ``TRACE_STEPS``)."""
    rows = []
    previous = 0.0
    for step, ((_, _, what), servers) in enumerate(zip(TRACE_STEPS, trace, strict=True), 1):
        server = statistics.median(servers) * 1e6
        metric = "server time" if step == 1 else f"server time ({server - previous:+.1f} us)"
        rows.append(
            Row(BENCH, f"{TRACE} {step}: {what}", metric, server, "us", "limits fixed window",
                limits_server * 1e6)
        )  # fmt: skip
        previous = server
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
