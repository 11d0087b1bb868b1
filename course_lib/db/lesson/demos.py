"""Measurements notebook 04 charts: pool checkouts, the pool-size sweep, statements per
loading strategy, EXPLAIN as a table, OFFSET vs keyset, replication lag under a burst.

Each function does bookkeeping (timing, counting, cleanup); the mechanism it measures stays
visible in the notebook cell that calls it.
"""

from __future__ import annotations

import random
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pandas as pd
from sqlalchemy import Engine, create_engine, event, select, text
from sqlalchemy.orm import Session, joinedload, selectinload
from sqlalchemy.pool import NullPool

from course_lib.db.lesson.replicas import ReplicaSet
from course_lib.db.models import Post, User
from course_lib.db.pagination import keyset_page, offset_page
from course_lib.measure import QueryCounter, percentiles, run_threads, time_calls
from course_lib.progress import progress
from course_lib.validation import one_of, positive_int

__all__ = [
    "STRATEGIES",
    "burst_lag",
    "checkout_costs",
    "explain",
    "load_users_with_posts",
    "loading_sweep",
    "pagination_sweep",
    "pool_sweep",
    "time_to_visibility",
]

STRATEGIES = ("lazy (N+1)", "selectinload", "joinedload")
BURST_INSERT = text(
    "INSERT INTO burst SELECT g, repeat('x', 200) FROM generate_series(1, 5000) AS g"
)


def checkout_costs(url: str, connect_args: dict[str, Any], n: int) -> dict[str, list[float]]:
    """Seconds per ``SELECT 1`` on a new connection each time vs a pooled checkout."""
    new = create_engine(url, poolclass=NullPool, connect_args=connect_args)
    pooled = create_engine(url, pool_size=1, connect_args=connect_args)

    def one(engine: Engine) -> Callable[[], object]:
        def call() -> object:
            with engine.connect() as conn:
                return conn.execute(text("SELECT 1")).scalar()

        return call

    try:
        return {
            "new connection": time_calls(one(new), n, warmup=3),
            "pooled checkout": time_calls(one(pooled), n, warmup=3),
        }
    finally:
        new.dispose()
        pooled.dispose()


def pool_sweep(
    url: str,
    connect_args: dict[str, Any],
    sizes: list[int],
    overflows: list[int],
    *,
    threads: int = 32,
    calls: int = 8,
    repeats: int = 1,
    query: str,
    params: Callable[[int, int], dict[str, Any]],
) -> pd.DataFrame:
    """Throughput and latency of ``query`` from ``threads`` threads, one row per pool
    configuration and repeat (column ``repeat``).

    The repeats are interleaved (every configuration once, then every one again), so a
    change in the machine's load during the sweep hits every configuration alike. Before the
    clock starts each pool opens the ``pool_size`` connections it keeps. Overflow connections
    cannot be opened in advance: ``QueuePool`` closes an overflow connection as soon as it is
    returned while ``pool_size`` idle ones are kept, so they are opened on demand inside the
    timed window; column ``connects`` counts the connections opened there (0 without
    overflow).
    """
    positive_int("repeats", repeats)
    rows = []
    configs = [(r, s, o) for r in range(repeats) for o in overflows for s in sizes]
    for repeat, size, overflow in progress(configs, desc="pool sizes"):
        engine = create_engine(
            url, pool_size=size, max_overflow=overflow, pool_timeout=60, connect_args=connect_args
        )
        opened = [0]

        def count_connect(*_: object, opened: list[int] = opened) -> None:
            opened[0] += 1

        def call(worker: int, index: int, engine: Engine = engine) -> object:
            with engine.connect() as conn:
                return conn.execute(text(query), params(worker, index)).scalar()

        try:
            # Open the connections the pool keeps first: the clock measures checkouts.
            held = [engine.connect() for _ in range(size)]
            for conn in held:
                conn.close()
            event.listen(engine, "connect", count_connect)
            start = time.perf_counter()
            done = run_threads(call, threads, calls=calls, pass_worker=True, timeout=120)
            elapsed = time.perf_counter() - start
        finally:
            engine.dispose()
        if done.errors:
            raise RuntimeError(f"pool_size={size}: {done.errors[0]}")
        spread = percentiles(done.latencies)
        rows.append(
            {
                "pool_size": size,
                "max_overflow": overflow,
                "repeat": repeat,
                "connections": size + overflow,
                "connects": opened[0],
                "queries_per_s": len(done) / elapsed,
                "mean_ms": statistics.fmean(done.latencies) * 1e3,
                "p50_ms": spread["p50"] * 1e3,
                "p99_ms": spread["p99"] * 1e3,
            }
        )
    return pd.DataFrame(rows)


def load_users_with_posts(session: Session, n: int, strategy: str) -> int:
    """Load the first ``n`` users and touch every user's posts; return the posts seen."""
    one_of("strategy", strategy, STRATEGIES)
    stmt = select(User).order_by(User.id).limit(n)
    if strategy == "selectinload":
        stmt = stmt.options(selectinload(User.posts))
    elif strategy == "joinedload":
        stmt = stmt.options(joinedload(User.posts))
    users = session.scalars(stmt).unique().all()
    return sum(len(user.posts) for user in users)


def loading_sweep(engine: Engine, ns: list[int], *, repeats: int = 3) -> pd.DataFrame:
    """Statements and best-of-``repeats`` seconds per strategy and number of users; the lazy
    loop beyond 100 users runs once (it takes seconds, and its noise is small against that)."""
    rows = []
    cases = [(s, n) for s in STRATEGIES for n in ns]
    for strategy, n in progress(cases, desc="strategies x N"):
        best = float("inf")
        for _ in range(1 if strategy == STRATEGIES[0] and n > 100 else repeats):
            with Session(engine) as session, QueryCounter(engine) as counter:
                start = time.perf_counter()
                posts = load_users_with_posts(session, n, strategy)
                best = min(best, time.perf_counter() - start)
        rows.append(
            {
                "strategy": strategy,
                "users": n,
                "posts": posts,
                "statements": counter.count,
                "ms": best * 1e3,
            }
        )
    return pd.DataFrame(rows)


def _walk(node: dict[str, Any], depth: int) -> Iterator[dict[str, Any]]:
    yield {
        "node": "  " * depth + node["Node Type"],
        "on": node.get("Index Name") or node.get("Relation Name") or "",
        "est. rows": node.get("Plan Rows"),
        "rows": node.get("Actual Rows"),
        "removed by filter": node.get("Rows Removed by Filter", 0),
        "loops": node.get("Actual Loops"),
        "buffers hit": node.get("Shared Hit Blocks", 0),
        "buffers read": node.get("Shared Read Blocks", 0),
        "ms": node.get("Actual Total Time"),
    }
    for child in node.get("Plans", []):
        yield from _walk(child, depth + 1)


def explain(engine: Engine, sql: str, params: dict[str, Any]) -> pd.DataFrame:
    """``EXPLAIN (ANALYZE, BUFFERS)`` of ``sql`` as one row per plan node (the planner's
    estimated rows next to the actual ones; a node's buffers include its children's, as
    PostgreSQL reports them), plus in ``df.attrs`` the totals (``execution_ms``,
    ``planning_ms``) and ``plan``, PostgreSQL's own text output of ``EXPLAIN (ANALYZE,
    BUFFERS)`` for the same query (a second execution: its times differ a little)."""
    with engine.connect() as conn:
        conn.execute(text(sql), params).all()  # warm the cache: compare plans, not disk reads
        raw = "\n".join(conn.execute(text(f"EXPLAIN (ANALYZE, BUFFERS) {sql}"), params).scalars())
        plan = conn.execute(
            text(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {sql}"), params
        ).scalar_one()[0]
    frame = pd.DataFrame(list(_walk(plan["Plan"], 0)))
    frame.attrs["execution_ms"] = plan["Execution Time"]
    frame.attrs["planning_ms"] = plan["Planning Time"]
    frame.attrs["plan"] = raw
    return frame


def pagination_sweep(
    engine: Engine, pages: list[int], *, size: int = 20, repeats: int = 11, seed: int = 0
) -> pd.DataFrame:
    """Fastest ms of ``repeats`` per page fetched with ``OFFSET`` and with keyset, and
    whether they agree. The fastest run is the one least disturbed by the machine: on idle
    cores loopback round trips vary by several ms, more than the query itself. The repeats
    are interleaved (every page both ways, then again), so a busy spell of the machine
    slows one fetch of every page rather than every fetch of one page, and each round runs
    in a new order (from ``seed``): with one fixed order on busy cores, the keyset fetch that
    always came right after the deepest ``OFFSET`` was the slowest every round (about twice
    the first page's time), so whatever one fetch leaves to the next is spread over pages.

    Post ids are contiguous from 1, so the last id of page ``p - 1`` (what a client would
    carry in its "next" link) is ``p * size``.
    """
    positive_int("repeats", repeats)
    base = select(Post.id, Post.title)
    statements = {}
    best: dict[tuple[str, int], float] = {}
    same: dict[int, bool] = {}
    with engine.connect() as conn:
        for page in pages:
            by_offset = offset_page(base, Post.id, page=page, size=size)
            by_key = keyset_page(base, Post.id, after=page * size if page else None, size=size)
            same[page] = conn.execute(by_offset).all() == conn.execute(by_key).all()  # warm-up
            statements[("OFFSET", page)] = by_offset
            statements[("keyset", page)] = by_key
        order = list(statements)
        shuffle = random.Random(seed)
        for _ in range(repeats):
            shuffle.shuffle(order)
            for key in order:
                stmt = statements[key]
                start = time.perf_counter()
                conn.execute(stmt).all()
                elapsed = time.perf_counter() - start
                best[key] = min(best.get(key, float("inf")), elapsed)
    return pd.DataFrame(
        [
            {"method": method, "page": page, "ms": seconds * 1e3, "same rows": same[page]}
            for (method, page), seconds in best.items()
        ]
    )


def time_to_visibility(rs: ReplicaSet, n: int) -> list[float]:
    """Seconds from a committed insert on the primary until the replica returns the row."""
    primary, replica = rs.engine("primary"), rs.engine("replica")
    with primary.begin() as conn:
        conn.execute(text("CREATE TABLE IF NOT EXISTS seen (id int PRIMARY KEY)"))
    rs.wait_for_replay()  # the replica must know the table before it is polled for rows
    samples = []
    with primary.connect() as writer, replica.connect() as reader:
        reader.execution_options(isolation_level="AUTOCOMMIT")
        for i in range(n):
            writer.execute(text("INSERT INTO seen VALUES (:i)"), {"i": i})
            writer.commit()
            start = time.perf_counter()
            probe = text("SELECT 1 FROM seen WHERE id = :i")
            while reader.execute(probe, {"i": i}).first() is None:
                if time.perf_counter() - start > 30:
                    raise TimeoutError(f"row {i} not visible on the replica after 30 s")
            samples.append(time.perf_counter() - start)
    return samples


def burst_lag(
    rs: ReplicaSet, *, burst_s: float = 1.5, after_s: float = 1.5, every_s: float = 0.02
) -> pd.DataFrame:
    """Replication lag (bytes) sampled every ``every_s`` while a writer inserts as fast as it
    can for ``burst_s`` seconds, then for ``after_s`` seconds of quiet."""
    primary = rs.engine("primary")
    with primary.begin() as conn:
        conn.execute(text("CREATE TABLE IF NOT EXISTS burst (id bigint, pad text)"))
    stop = threading.Event()
    failure: list[BaseException] = []

    def writer() -> None:
        try:
            with primary.connect() as conn:
                while not stop.is_set():
                    conn.execute(BURST_INSERT)
                    conn.commit()
        except BaseException as exc:  # reported by the caller
            failure.append(exc)

    samples = []
    thread = threading.Thread(target=writer, daemon=True)
    origin = time.perf_counter()
    thread.start()
    try:
        while (now := time.perf_counter() - origin) < burst_s + after_s:
            if now >= burst_s:
                stop.set()
            samples.append({"t": now, "lag_bytes": rs.lag_bytes(), "burst": not stop.is_set()})
            time.sleep(every_s)
    finally:
        stop.set()
        thread.join(30)
    if failure:
        raise failure[0]
    return pd.DataFrame(samples)
