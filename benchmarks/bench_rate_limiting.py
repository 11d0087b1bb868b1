"""Rate limiting: cost per decision of the course_lib limiters against `limits`,
`throttled-py`, `pyrate-limiter` and the seed, measured in one interleaved run on a private
Redis that nothing else uses (started for the run, on a Unix socket).

How: each subject takes turns with its floors call by call (PING; for a course_lib
limiter also three payload-matched floors), every call timed on its own, 400 calls each per
round, 15 rounds; a round's figure is its median call and the table shows the median round,
with the spread of the ratio over rounds. On idle cores a round trip drifts by tens of
microseconds within a round and has a long tail of scheduling delays (a round's mean was
up to 1.5x its median here): only calls made side by side, and medians, give ratios that
repeat. Server time is the delta of ``INFO commandstats`` around a separate batch of each
subject, counting only the commands its client sent: a command a script runs
(``redis.call``) is counted on its own line and again inside the script's EVALSHA, so the
two are told apart once, before the rounds, with ``MONITOR`` (a script's commands come from
client ``lua``).

- Redis limiters, one decision per call on 1000 rotating keys with a quota never exhausted
  (every decision is an admission, the common case):
  * ``per decision``: time / one PING (no target: a script does work a PING does not);
  * ``/ floor``: time / (PING + the subject's server time): the issue's yardstick, target
    <= 1.10x for course_lib. It misses what PING does not pay: a decision sends about 130
    bytes and gets 35 (PING 14 and 7), and while the server works the client's core idles;
  * ``/ payload floor``, ``/ busy floor``, ``/ bare script`` (course_lib): time / a script
    call with the limiter's own arguments, corrected by the gap between its server time
    and the limiter's: a script that does nothing (``lua/payload_floor.lua``), one that
    spins about as long as the limiter's (``lua/busy_floor.lua``), and the limiter's own
    script through ``course_lib.lua`` without the limiter's code around it. Target <= 1.10x;
  * ``where:`` rows split a course_lib decision into PING, the bytes over PING, the script's
    server time, the idle-core penalty of a longer server time, what real keys cost beyond
    a spin of the same length, and course_lib's own code plus noise (differences of
    medians: a few microseconds either way are noise);
  * ``server time``: the server's microseconds per decision, against limits' fixed window.
- ``fixed window trace``: the fixed window's server time built up one feature at a time
  (``lua/fw_*.lua``, then course_lib's ``fixed_window.lua``), each step with what it adds:
  limits' script (INCRBY + PEXPIRE); the server clock (windows aligned, processes with
  skewed clocks agree); refusals not counted plus the 4-value reply the RateLimit headers
  need; the window start stored beside the count (GET + SET PX, what makes the clock-step
  clamp and injected-clock replays possible); the clamp and the injected-clock expiry. Step
  1 should match limits' own line: the check that the trace measures what limits pays.
- ``hit_many``: 100 decisions per batch, for each course_lib limiter: one script call that
  loops over the 100 keys on the server (a plain Redis is one slot group), cost per decision
  against the run's PING. Target <= 0.2x. Its ``where`` rows: the script's server time per
  decision, and the rest (redis-py packing the command and parsing the 100 replies,
  course_lib's checks and Decisions, the round trip shared by the batch).
- In-process: ``TokenBucket.consume`` against limits' in-memory fixed window. Target <= 0.35x
  (issue #23: plain code, a ``with`` lock and a real ``Decision``, rather than 0.25x by
  micro-tricks).
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
from collections.abc import Callable, Iterator
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
BUSY = "busy floor"
BARE = "bare script"
SPIN = 2000  # loop turns of the busy floor's calibration run
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
        calls = itertools.cycle([limiter.script_call(key, 1) for key in keys])
        subjects[f"{PAYLOAD} {name}"] = lambda c=calls: payload(client, *next(c))
        subjects[f"{BUSY} {name}"] = _busy_floor(client, limiter, calls, keys)
        subjects[f"{BARE} {name}"] = lambda c=calls, s=limiter.script: s(client, *next(c))
    clock = lua.load("course_lib.rate_limiting", "_now").source
    for step, (file, timed, _) in enumerate(TRACE_STEPS, 1):
        text = script(file).source if file == "fixed_window" else (LUA / f"{file}.lua").read_text()
        if timed and file != "fixed_window":
            text = clock + text
        traced = lua.Script(file, text)
        # the trace steps take (now, cost, limit, window); course_lib's script takes (now,
        # nonce, limit, window), then one cost per key unless every cost is 1
        args = ("", "", HUGE, 60_000_000) if file == "fixed_window" else ("", 1, HUGE, 60_000_000)
        subjects[f"{TRACE} {step}"] = _rotating(
            lambda key, s=traced, n=step, a=args: s(client, (f"{ns}:t{n}:{{{key}}}",), a),
            keys,
        )
    for name, limiter in ours.items():
        batches = itertools.cycle([keys[i : i + BATCH] for i in range(0, KEYS, BATCH)])
        subjects[f"course_lib {name}.hit_many x{BATCH}"] = (
            lambda b=batches, hit_many=limiter.hit_many: hit_many(next(b))
        )
    return subjects


def _evalsha_usec(client, fn: Callable[[], object], calls: int) -> float:
    """Server microseconds per call of ``fn``, whose only own command is one EVALSHA."""
    fn()  # loads the script if it is new, outside the count
    before = client.info("commandstats")["cmdstat_evalsha"]["usec"]
    for _ in range(calls):
        fn()
    return (client.info("commandstats")["cmdstat_evalsha"]["usec"] - before) / calls


def _busy_floor(client, limiter, calls: Iterator[tuple], keys: list[str]) -> Callable[[], object]:
    """``lua/busy_floor.lua`` with the limiter's arguments (``calls``, as prepared for its
    other floors), its loop sized so the script spends about the limiter's server time (the
    run corrects what is left of the gap)."""
    text = (LUA / "busy_floor.lua").read_text()

    def spinning(turns: int) -> Callable[[], object]:
        busy = lua.Script(f"{BUSY} {turns}", text.replace("ITERATIONS", str(turns)))
        return lambda: busy(client, *next(calls))

    target = _evalsha_usec(client, _rotating(limiter.hit, keys), 200)
    idle, spin = (_evalsha_usec(client, spinning(turns), 200) for turns in (0, SPIN))
    return spinning(max(0, round((target - idle) / max(spin - idle, 1e-3) * SPIN)))


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


Samples = tuple[list[float], list[float]]
"""Per round: seconds per call and server seconds per call."""


def _floor_run(
    client, subjects: dict[str, Callable[[], object]], calls: int, rounds: int
) -> dict[str, dict[str, Samples]]:
    """Per subject, its samples and those of its floors (PING and, for a course_lib limiter,
    the three payload-matched floors), round by round.

    Time: the subject and its floors take turns call by call, each call timed on its own,
    and a round's figure is its median call. On idle cores a round trip drifts by tens of
    microseconds within a round and has a long tail of scheduling delays (a round's mean
    was up to 1.5x its median here), so only calls made side by side, and medians, give
    ratios that repeat. Server time: the delta of ``INFO commandstats`` around a separate
    batch of each member.
    """
    shares = _top_level_shares(client, subjects, max(1, calls // 10))
    mains = [n for n in subjects if n != "PING" and not n.startswith((PAYLOAD, BUSY, BARE))]
    out: dict[str, dict[str, Samples]] = {}
    for name in mains:
        floors = [f"{floor} {_limiter(name)}" for floor in (PAYLOAD, BUSY, BARE)]
        # a trace step is measured for its server time; a PING right after a 100-script
        # batch is slower than most, so a batch is compared with the run's PING
        alone = name.startswith(TRACE) or "hit_many" in name
        group = [name] if alone else [name, "PING"]
        out[name] = {member: ([], []) for member in group + [f for f in floors if f in subjects]}
    clock = time.perf_counter
    server_calls = max(10, calls // 5)
    for _ in tqdm(range(rounds), desc="rounds", unit="round", leave=False, file=sys.stderr):
        for members in out.values():
            turns = [(subjects[member], []) for member in members]
            orders = (turns, turns[::-1])  # each member follows a different one in turn
            for i in range(calls):
                for fn, spent in orders[i % 2]:
                    start = clock()
                    fn()
                    spent.append(clock() - start)
            for (member, (times, servers)), (fn, spent) in zip(members.items(), turns, strict=True):
                before = _server_usec(client, shares[member])
                per_call(fn, server_calls)
                servers.append((_server_usec(client, shares[member]) - before) / 1e6 / server_calls)
                times.append(statistics.median(spent))
    return out


def _limiter(subject: str) -> str:
    return subject.removeprefix("course_lib ").removesuffix(".hit")


def _redis_rows(url: str, quick: bool) -> list[Row]:
    calls, rounds = (60, 3) if quick else (400, 15)
    client = redis.Redis.from_url(url)
    try:
        runs = _floor_run(client, _redis_subjects(client, url, "b"), calls, rounds)
    finally:
        client.close()
    med = statistics.median
    steps = [f"{TRACE} {step}" for step in range(1, len(TRACE_STEPS) + 1)]
    trace = [runs.pop(step)[step][1] for step in steps]
    base_server = med(runs["limits fixed window"]["limits fixed window"][1])
    all_pings = med(t for run in runs.values() if "PING" in run for t in run["PING"][0])
    rows = []
    for subject, run in runs.items():
        times, servers = run[subject]
        seconds = med(times)
        if "hit_many" in subject:
            spread = [t / BATCH / all_pings for t in times]
            rows += [
                Row(BENCH, subject, f"per decision (rounds {min(spread):.2f}-{max(spread):.2f}x)",
                    seconds / BATCH * 1e6, "us", "PING", all_pings * 1e6, target=0.2),
                Row(BENCH, subject, "where: script on the server", med(servers) / BATCH * 1e6,
                    "us", "per decision", seconds / BATCH * 1e6),
                Row(BENCH, subject, "where: rest (pack, parse, Decision)",
                    (seconds - med(servers)) / BATCH * 1e6, "us", "per decision",
                    seconds / BATCH * 1e6),
            ]  # fmt: skip
            continue
        ping_times = run["PING"][0]  # measured beside this subject, turn by turn
        ping = med(ping_times)
        payload = run.get(f"{PAYLOAD} {_limiter(subject)}")
        floors = [p + s for p, s in zip(ping_times, servers, strict=True)]
        spread = [t / f for t, f in zip(times, floors, strict=True)]
        rows += [
            Row(BENCH, subject, "per decision", seconds * 1e6, "us", "PING", ping * 1e6),
            Row(BENCH, subject, f"/ floor (rounds {min(spread):.2f}-{max(spread):.2f}x)",
                seconds * 1e6, "us", "PING + server time", med(floors) * 1e6,
                None if payload is None else 1.10),
            Row(BENCH, subject, "server time", med(servers) * 1e6, "us",
                "limits fixed window", base_server * 1e6),
        ]  # fmt: skip
        if payload is not None:
            rows += _payload_rows(subject, run, ping)
    return rows + _trace_rows(trace, base_server)


def _payload_rows(subject: str, run: dict[str, Samples], ping: float) -> list[Row]:
    """A course_lib limiter against its three payload-matched floors, and where its time goes.

    Each floor is a script call with the limiter's own arguments (the same bytes), and each
    is corrected by the gap between its server time and the limiter's:
    ``payload floor``, a script that does nothing; ``busy floor``, a script that spins for
    about the limiter's server time; ``bare script``, the limiter's own script called
    through ``course_lib.lua`` with prepared arguments (no limiter code around it).
    The ``where`` rows split a decision into: PING; the bytes (encoding, the server reading,
    parsing and answering them, redis-py's handling); the script's server time; the
    idle-core penalty of a longer server time (while the server works, the client's core
    sleeps deeper and wakes later); what real keys cost beyond a spin of the same length
    (outside the script's commandstats time: the server's bookkeeping of written keys);
    and what is left, course_lib's own client code (argument checks, the Decision) plus
    the noise of a difference of medians.
    """
    med = statistics.median
    name = _limiter(subject)
    times, servers = run[subject]
    rows = []
    for floor in (PAYLOAD, BUSY, BARE):
        floor_times, floor_servers = run[f"{floor} {name}"]
        floors = [t + s - fs for t, s, fs in zip(floor_times, servers, floor_servers, strict=True)]
        spread = [t / f for t, f in zip(times, floors, strict=True)]
        rows.append(
            Row(BENCH, subject, f"/ {floor} (rounds {min(spread):.2f}-{max(spread):.2f}x)",
                med(times) * 1e6, "us", f"{floor} + server time gap", med(floors) * 1e6, 1.10)
        )  # fmt: skip
    # each floor's time outside its script: the floors differ from one another by one thing
    payload, busy, bare = (
        med(run[f"{floor} {name}"][0]) - med(run[f"{floor} {name}"][1])
        for floor in (PAYLOAD, BUSY, BARE)
    )
    parts = {
        "PING round trip": ping,
        "bytes over PING": payload - ping,
        "script on the server": med(servers),
        "idle-core penalty": busy - payload,
        "real keys, not a spin": bare - busy,
        "course_lib code (+ noise)": med(times) - med(servers) - bare,
    }
    for part, seconds in parts.items():
        rows.append(
            Row(BENCH, subject, f"where: {part}", seconds * 1e6, "us", "per decision",
                med(times) * 1e6)
        )  # fmt: skip
    return rows


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
        target = 0.35 if subject.startswith("course_lib") else None
        rows.append(
            Row(BENCH, subject, "per decision", seconds * 1e6, "us",
                "limits in-memory fixed window", base * 1e6, target)
        )  # fmt: skip
    return rows
