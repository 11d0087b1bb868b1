"""The experiments of the caching notebook, kept here so the notebook stays short.

Each function runs against the real Redis and PostgreSQL, starts its own threads, tasks or
processes, stops them before returning (also on error), and returns plain numbers or a
``pandas.DataFrame``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import redis.asyncio as aredis
from sqlalchemy import Engine, update

import course_lib.services as services
from course_lib.measure import Calls, percentiles, run_async, run_processes, run_tasks, run_threads

from ..aio import AsyncCacheAside
from ..cache_aside import CacheAside
from ..write_behind import WorkerProcess, WriteBehind
from . import as_written
from .rq_write_behind import wait_until
from .users import UserStore, users_table

__all__ = [
    "CrashResult",
    "LoopStall",
    "StampedeResult",
    "count_lost",
    "hit_ratio_series",
    "hot_key_run",
    "loop_stall",
    "replay",
    "seed_hang_demo",
    "stampede",
    "stampede_failures",
    "write_behind_crash",
    "write_latencies",
]


def replay(cache: CacheAside, keys: Iterable[Any], *, interval: float = 0.0) -> pd.DataFrame:
    """Call ``cache.get`` for each key in order; one row per call: t, key, hit, latency (s).

    With ``interval`` > 0 the calls follow a schedule, call ``i`` at ``i * interval`` s (a
    late call starts at once), so how long the replay lasts, and with it how often a TTL
    expires during it, does not depend on how fast the machine answers.
    """
    if interval < 0:
        raise ValueError(f"interval must be >= 0, got {interval!r}")
    rows = []
    origin = time.perf_counter()
    for index, key in enumerate(keys):
        if interval:
            time.sleep(max(0.0, origin + index * interval - time.perf_counter()))
        before = cache.stats["hits"]
        start = time.perf_counter()
        cache.get(key)
        end = time.perf_counter()
        rows.append((start - origin, key, cache.stats["hits"] > before, end - start))
    return pd.DataFrame(rows, columns=["t", "key", "hit", "latency"])


def hit_ratio_series(frame: pd.DataFrame, calls: int = 50) -> tuple[list[float], list[float]]:
    """Hit ratio of each run of ``calls`` consecutive calls of a :func:`replay` frame, at the
    median time of the run: ``(times, ratios)``.

    Runs of a fixed number of calls, not fixed time buckets, so every point is a ratio of
    the same number of calls however fast the machine replays (a 100 ms bucket holds 60
    calls on idle cores and 5 on busy ones, and a ratio of 5 calls jumps between 0 and 1).
    A last run shorter than half of ``calls`` is left out, for the same reason.
    """
    if calls < 1:
        raise ValueError(f"calls must be >= 1, got {calls!r}")
    run = pd.Series(range(len(frame)), index=frame.index) // calls
    grouped = frame.groupby(run)
    ratio, times, sizes = grouped["hit"].mean(), grouped["t"].median(), grouped.size()
    if len(sizes) > 1 and sizes.iloc[-1] < calls / 2:
        ratio, times = ratio.iloc[:-1], times.iloc[:-1]
    return [float(t) for t in times], [float(v) for v in ratio]


@dataclass(frozen=True)
class StampedeResult:
    """One stampede run: loader calls (counted in Redis, so across processes) and latency."""

    strategy: str
    callers: int
    loader_calls: int
    p99: float
    errors: int


def _counting_loader(
    client: Any, counter: str, delay: float, *, hold_for: int | None = None
) -> Callable[[Any], Any]:
    """A loader that counts its calls in Redis and takes ``delay`` s. With ``hold_for``, each
    call first waits until that many calls have started: no value is cached before every
    caller has missed, however late a thread starts on a busy machine."""

    def loader(key: Any) -> dict[str, Any]:
        client.incr(counter)
        if hold_for is not None:
            wait_until(
                lambda: int(client.get(counter)) >= hold_for,
                f"{hold_for} loader calls started",
                timeout=60,
            )
        time.sleep(delay)
        return {"key": key, "computed_by": os.getpid()}

    return loader


def stampede(
    strategy: str,
    callers: int,
    *,
    namespace: str,
    delay: float = 0.05,
    processes: int = 1,
    model: str = "threads",
) -> StampedeResult:
    """``callers`` concurrent misses of one cold key, split over ``processes`` processes.

    ``strategy``: ``"naive"`` (``CacheAside(stampede=None)``), ``"seed"`` (the seed's
    ``get_with_lock``, always asyncio tasks) or ``"course_lib"``
    (``CacheAside(stampede="lock")``). ``model``: the callers are ``"threads"`` or
    ``"asyncio"`` tasks of one event loop (then the caches are :class:`AsyncCacheAside`), so
    strategies can be compared under the same concurrency model. The loader sleeps
    ``delay`` seconds: an expensive query. Staged for ``"naive"`` threads: each load first
    waits until every caller has missed (on a busy machine a thread that starts after a fill
    would find the value cached; in production, the callers that arrive while a load runs).
    asyncio tasks need no staging: each sends its lookup before any reply is read.
    """
    if strategy not in ("naive", "seed", "course_lib"):
        raise ValueError(f"strategy must be naive, seed or course_lib, got {strategy!r}")
    if model not in ("threads", "asyncio"):
        raise ValueError(f"model must be threads or asyncio, got {model!r}")
    if callers % processes:
        raise ValueError(f"callers ({callers}) must divide evenly over {processes} processes")
    client = services.redis_client()
    counter = f"{namespace}:{strategy}:loads"
    key = f"{namespace}:{strategy}:hot"  # the seed's key
    ready_key = f"{namespace}:{strategy}:ready"
    # The cache's own name for "hot" (its key is a hash tag there): cold again on each run.
    cached = CacheAside(client, str, ttl=60, namespace=f"{namespace}:{strategy}").key("hot")
    client.delete(counter, key, ready_key, cached)
    per_process = callers // processes

    def all_ready(own: Any) -> Callable[[], None]:
        """Wait until every process has set up (clients, connections, event loop): processes
        start a varying time apart, and one that starts late would find the value cached."""

        def wait() -> None:
            own.incr(ready_key)
            deadline = time.monotonic() + 60
            while int(own.get(ready_key) or 0) < processes:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"not all {processes} processes got ready within 60 s")
                time.sleep(0.001)

        return wait

    def in_one_process() -> list[tuple[float, bool]]:
        with contextlib.closing(services.redis_client()) as own:
            # Naive threads all miss only if none starts after a fill; held, none can.
            hold = callers if strategy == "naive" and model == "threads" else None
            loader = _counting_loader(own, counter, delay, hold_for=hold)
            ready = all_ready(own)
            if strategy == "seed":
                calls: Calls = _seed_stampede(own, loader, key, per_process, ready)
            elif model == "asyncio":
                return _async_stampede(
                    strategy, loader, f"{namespace}:{strategy}", per_process, ready
                )
            else:
                cache = CacheAside(
                    own,
                    loader,
                    ttl=60,
                    namespace=f"{namespace}:{strategy}",
                    stampede=None if strategy == "naive" else "lock",
                )
                # A running service has its connection pool open: open one per thread first.
                run_threads(lambda: cache.redis.ping(), per_process)
                ready()
                calls = run_threads(lambda: cache.get("hot"), per_process)
        return [(c.latency, c.ok) for c in calls]

    try:
        if processes == 1:
            samples = in_one_process()
        else:
            chunks = run_processes(in_one_process, processes).values
            samples = [s for chunk in chunks for s in chunk]
        loads = int(client.get(counter) or 0)
        client.delete(counter, ready_key)
    finally:
        client.close()
    latencies = [lat for lat, _ in samples]
    return StampedeResult(
        strategy,
        callers,
        loads,
        percentiles(latencies)["p99"],
        sum(not ok for _, ok in samples),
    )


def _async_stampede(
    strategy: str,
    loader: Callable[[Any], Any],
    namespace: str,
    tasks: int,
    ready: Callable[[], None],
) -> list[tuple[float, bool]]:
    """``tasks`` asyncio tasks of one loop call ``AsyncCacheAside.get("hot")`` together, once
    ``ready()`` returns; ``(latency, ok)`` per call."""

    async def scenario() -> list[tuple[float, bool]]:
        client = aredis.Redis.from_url(services.redis_url())
        cache = AsyncCacheAside(
            client,
            lambda k: asyncio.to_thread(loader, k),
            ttl=60,
            namespace=namespace,
            stampede=None if strategy == "naive" else "lock",
        )
        gate = asyncio.Event()

        async def one() -> tuple[float, bool]:
            await gate.wait()
            start = time.perf_counter()
            try:
                await cache.get("hot")
            except Exception:
                return time.perf_counter() - start, False
            return time.perf_counter() - start, True

        try:
            # A running service has its connection pool open: open one per task first.
            await asyncio.gather(*(client.ping() for _ in range(tasks)))
            running = [asyncio.create_task(one()) for _ in range(tasks)]
            await asyncio.sleep(0)  # every task is waiting at the gate
            await asyncio.to_thread(ready)  # and so is every other process
            gate.set()
            return list(await asyncio.gather(*running))
        finally:
            await client.aclose()

    return run_async(scenario(), timeout=120)


def _seed_stampede(
    client: Any, loader: Callable[[Any], Any], key: str, tasks: int, ready: Callable[[], None]
) -> Calls:
    """``tasks`` asyncio tasks call the seed's ``get_with_lock(key)`` together, once
    ``ready()`` returns."""

    async def fetch(k: str) -> str:
        await asyncio.to_thread(loader, k)
        return "value"

    engine = services.engine()
    try:
        with as_written.bound(client, engine, fetch=fetch):
            as_written.locks.clear()
            ready()
            return run_tasks(lambda: as_written.get_with_lock(key), tasks)
    finally:
        engine.dispose()


def seed_hang_demo(namespace: str, *, waiters: int = 10, timeout: float = 0.5) -> dict[str, int]:
    """The seed's ``get_with_lock`` with a loader that raises: who returns, who hangs.

    ``waiters`` concurrent calls; once the loader has raised, each still waiting gets
    ``timeout`` more seconds, then counts as timed out (cancelled: without the limit they
    would wait forever). Then one later call of the same key, under the same limit. The
    clock starts when the loader raises, so how long the calls took to get there on a busy
    machine does not change the counts.
    """
    loads = {"n": 0}
    raised = asyncio.Event()

    async def failing_fetch(key: str) -> str:
        loads["n"] += 1
        await asyncio.sleep(0.05)
        raised.set()
        raise ConnectionError("database unavailable")

    key = f"{namespace}:seed:failing"

    async def call() -> str:
        try:
            await as_written.get_with_lock(key)
        except ConnectionError:
            return "raised"
        return "returned"

    async def scenario() -> dict[str, int]:
        tasks = [asyncio.create_task(call()) for _ in range(waiters)]
        await asyncio.wait_for(raised.wait(), 30)  # the leader reaches the loader
        done, pending = await asyncio.wait(tasks, timeout=timeout)
        for task in pending:
            task.cancel()
        first = [task.result() if task in done else "timed_out" for task in tasks]
        try:
            later = await asyncio.wait_for(call(), timeout)
        except TimeoutError:
            later = "timed_out"
        return {
            "loader_calls": loads["n"],
            "raised": first.count("raised"),
            "timed_out": first.count("timed_out"),
            "later_call_timed_out": int(later == "timed_out"),
            "stuck_locks": len(as_written.locks),
        }

    client, engine = services.redis_client(), services.engine()
    try:
        with as_written.bound(client, engine, fetch=failing_fetch):
            as_written.locks.clear()
            return run_async(scenario())
    finally:
        as_written.locks.clear()
        client.close()
        engine.dispose()


def stampede_failures(
    strategy: str, levels: Sequence[int], *, namespace: str, timeout: float = 2.0
) -> list[dict[str, int]]:
    """What concurrent asyncio misses of one key get back, beyond the load count, for each
    number of callers in ``levels`` (one key per level, all levels at once in one loop).

    ``strategy`` is ``"seed"`` (the seed's ``get_with_lock``) or ``"course_lib"``
    (:class:`AsyncCacheAside`, ``stampede="lock"``). Two runs: a loader that returns the
    string ``"value"``, counting callers whose answer is not a ``str`` (``other_type``); and
    a loader that raises after 50 ms, counting callers still waiting after ``timeout`` s
    (``hung``; each call runs under ``asyncio.wait_for``, or the seed's would never end)
    and callers that got the exception (``raised``). One dict per level, in order.
    """
    if strategy not in ("seed", "course_lib"):
        raise ValueError(f"strategy must be seed or course_lib, got {strategy!r}")
    if not levels or any(n < 1 for n in levels):
        raise ValueError(f"levels must be caller counts >= 1, got {levels!r}")
    base = f"{namespace}:failures:{strategy}"

    async def answer(key: str) -> str:
        await asyncio.sleep(0.05)
        return "value"

    async def fail(key: str) -> str:
        await asyncio.sleep(0.05)
        raise ConnectionError("database unavailable")

    async def outcome(call: Any) -> str:
        try:
            value = await asyncio.wait_for(call, timeout)
        except TimeoutError:
            return "hung"
        except Exception:
            return "raised"
        return "str" if isinstance(value, str) else "other_type"

    async def scenario(get: Callable[[str], Any], name: str) -> list[list[str]]:
        async def level(index: int, callers: int) -> list[str]:
            key = f"{base}:{name}:{index}"
            return list(await asyncio.gather(*(outcome(get(key)) for _ in range(callers))))

        return list(await asyncio.gather(*(level(i, n) for i, n in enumerate(levels))))

    results: dict[str, list[list[str]]] = {}
    loaders = (("answers", answer), ("failing", fail))
    if strategy == "seed":
        client, engine = services.redis_client(), services.engine()
        try:
            for name, loader in loaders:
                as_written.locks.clear()
                with as_written.bound(client, engine, fetch=loader):
                    results[name] = run_async(scenario(as_written.get_with_lock, name))
        finally:
            as_written.locks.clear()
            client.delete(*(f"{base}:answers:{i}" for i in range(len(levels))))
            client.close()
            engine.dispose()
    else:

        async def course_lib(loader: Callable[[str], Any], name: str) -> list[list[str]]:
            # One connection per caller at most: the pool's default cap is 100.
            client = aredis.Redis.from_url(services.redis_url(), max_connections=sum(levels))
            try:
                cache = AsyncCacheAside(client, loader, ttl=60, namespace=namespace)
                return await scenario(cache.get, name)
            finally:
                await client.aclose()

        for name, loader in loaders:
            results[name] = run_async(course_lib(loader, name))
    return [
        {
            "other_type": answers.count("other_type"),
            "hung": failing.count("hung"),
            "raised": failing.count("raised"),
        }
        for answers, failing in zip(results["answers"], results["failing"], strict=True)
    ]


def hot_key_run(
    cache: CacheAside, *, duration: float, threads: int, key: Any = "hot"
) -> pd.DataFrame:
    """``threads`` threads call ``cache.get(key)`` for ``duration`` s; t, latency per call."""
    cache.get(key)
    origin = time.perf_counter()

    def worker(_worker: int, _index: int) -> list[tuple[float, float]]:
        out = []
        while (now := time.perf_counter()) - origin < duration:
            cache.get(key)
            out.append((now - origin, time.perf_counter() - now))
        return out

    calls = run_threads(worker, threads, pass_worker=True, timeout=duration + 30)
    rows = [row for chunk in calls.values for row in chunk]
    return pd.DataFrame(rows, columns=["t", "latency"]).sort_values("t", ignore_index=True)


@dataclass(frozen=True)
class CrashResult:
    """Updates issued before a crash, and how many never reached the database."""

    issued: int
    lost: int
    keys_stale: int

    @property
    def landed(self) -> int:
        return self.issued - self.lost


def _plan(updates: int, keys: list[int]) -> list[tuple[int, int]]:
    """Update ``i`` sets ``score = i`` on ``keys[i % len(keys)]``: scores grow per key."""
    return [(keys[i % len(keys)], i) for i in range(updates)]


def _reset_scores(engine: Engine, keys: list[int]) -> None:
    with engine.begin() as conn:
        conn.execute(update(users_table).where(users_table.c.id.in_(keys)).values(score=-1))


def count_lost(engine: Engine, plan: list[tuple[int, int]]) -> CrashResult:
    """Compare the database with the planned updates: an update with a score above the
    row's final score never landed."""
    store = UserStore(engine)
    final = {key: store.load(key)["score"] for key in {k for k, _ in plan}}  # type: ignore[index]
    lost = sum(score > final[key] for key, score in plan)
    last = {key: score for key, score in plan}
    stale = sum(final[key] != last[key] for key in last)
    return CrashResult(len(plan), lost, stale)


def _kill_holding_entries(worker: WorkerProcess, wb: WriteBehind) -> bool:
    """SIGKILL ``worker`` if it holds entries it read but did not acknowledge.

    The worker is frozen (SIGSTOP) while its pending list is read, so it cannot acknowledge
    between the check and the kill; if it holds nothing it is resumed and ``False`` returned.
    """
    pid = worker.pid
    if pid is None or not worker.is_alive():
        return False
    os.kill(pid, signal.SIGSTOP)
    try:
        held = wb.redis.xpending_range(
            wb.stream, wb.group, min="-", max="+", count=1, consumername=worker.name
        )
    except BaseException:
        os.kill(pid, signal.SIGCONT)
        raise
    if held:
        worker.kill()
        return True
    os.kill(pid, signal.SIGCONT)
    return False


def write_behind_crash(
    wb: WriteBehind,
    engine: Engine,
    *,
    updates: int = 2000,
    keys: int = 200,
    kill_after: float = 0.4,
    down_for: float = 0.5,
    sample_every: float = 0.025,
    timeout: float = 60.0,
    crash: bool = True,
) -> tuple[CrashResult, pd.DataFrame, dict[str, float]]:
    """Write ``updates`` through ``wb``, SIGKILL its worker mid-batch, restart another one.

    With ``crash=False`` the same workload runs with no kill: the baseline to compare with.

    The kill comes at the first sample after ``kill_after`` s at which the worker holds
    entries it has not acknowledged, so the restarted worker must reclaim them
    (``wb.worker_stats()["reclaimed"] > 0``). Raises ``RuntimeError`` if the worker emptied
    the queue before that. Returns the loss count (after the backlog drained), a frame of
    the DB lag sampled every ``sample_every`` s (t, lag, backlog), and the kill/restart times.
    """
    ids = list(range(1, keys + 1))
    _reset_scores(engine, ids)
    plan = _plan(updates, ids)
    samples: list[tuple[float, float, int]] = []
    origin = time.perf_counter()
    events: dict[str, float] = {}
    first = wb.start_worker("worker-a")
    second = None
    try:
        for key, score in plan:
            wb.write(key, {"score": score})
        events["writes_done"] = time.perf_counter() - origin
        deadline = origin + timeout
        while time.perf_counter() < deadline:
            now = time.perf_counter() - origin
            samples.append((now, wb.lag(), wb.backlog()))
            if crash and "killed" not in events and now >= kill_after:
                if _kill_holding_entries(first, wb):
                    events["killed"] = now
                elif samples[-1][2] == 0:
                    raise RuntimeError(
                        f"worker-a applied all {updates} updates before {kill_after} s: "
                        "lower kill_after or raise updates"
                    )
            if second is None and "killed" in events and now >= events["killed"] + down_for:
                second = wb.start_worker("worker-b")
                events["restarted"] = now
            if (second is not None or not crash) and samples[-1][2] == 0:
                break
            time.sleep(sample_every)
        else:
            raise TimeoutError(f"{wb.backlog()} writes still queued after {timeout} s")
    finally:
        first.kill()
        if second is not None:
            second.stop()
    frame = pd.DataFrame(samples, columns=["t", "lag", "backlog"])
    return count_lost(engine, plan), frame, events


def write_latencies(fn: Callable[[int], object], keys: list[int]) -> list[float]:
    """Seconds taken by ``fn(key)`` for each key, in order."""
    out = []
    for key in keys:
        start = time.perf_counter()
        fn(key)
        out.append(time.perf_counter() - start)
    return out


@dataclass(frozen=True)
class LoopStall:
    """One slow write seen from an event loop: how long it took, and what the loop did meanwhile.

    ``beats_during_write`` counts the heartbeat's ticks that happened while the ``SET`` was
    in flight: 0 means the loop was frozen for the whole write, whatever the machine's load.
    """

    write_s: float
    beats_during_write: int
    longest_gap_s: float


def loop_stall(pause: float = 0.2) -> dict[str, LoopStall]:
    """How one cache write stalls an event loop when Redis is slow to answer.

    On a private Redis, writes are held for ``pause`` s (``CLIENT PAUSE ... WRITE``, as a
    slow server or a failover would). A heartbeat task ticks every 5 ms while one task does
    a ``SET`` with the blocking client, as the seed's ``get_with_lock`` does inside
    ``async def``, and then with ``redis.asyncio``. For each client: how long the write took,
    how many heartbeat ticks happened during it (none with the blocking client: the call
    holds the loop's only thread), and the heartbeat's longest gap, in seconds.
    """
    with tempfile.TemporaryDirectory(prefix="nb01-stall-", dir="/tmp") as folder:
        server = services.EmbeddedRedis(Path(folder) / "redis")
        url = server.start()
        try:
            return {
                name: run_async(_heartbeat_during_set(url, pause, blocking=blocking))
                for name, blocking in (("blocking client", True), ("redis.asyncio", False))
            }
        finally:
            server.stop()


async def _heartbeat_during_set(url: str, pause: float, *, blocking: bool) -> LoopStall:
    sync_client = services.fail_fast_redis(url, timeout=5)
    async_client = aredis.Redis.from_url(url)
    beats: list[float] = []
    done = asyncio.Event()

    async def heartbeat() -> None:
        beats.append(time.perf_counter())
        while not done.is_set():
            await asyncio.sleep(0.005)
            beats.append(time.perf_counter())

    try:
        await async_client.ping()
        sync_client.ping()
        beat = asyncio.create_task(heartbeat())
        await asyncio.sleep(0.05)
        sync_client.client_pause(int(pause * 1000), all=False)  # holds writes only
        started = time.perf_counter()
        if blocking:
            sync_client.set("k", "v")  # inside async code: the whole loop waits
        else:
            await async_client.set("k", "v")  # only this task waits
        ended = time.perf_counter()
        await asyncio.sleep(0.05)
        done.set()
        await beat
        return LoopStall(
            write_s=ended - started,
            beats_during_write=sum(started < t < ended for t in beats),
            longest_gap_s=max(later - earlier for earlier, later in itertools.pairwise(beats)),
        )
    finally:
        sync_client.close()
        await async_client.aclose()
