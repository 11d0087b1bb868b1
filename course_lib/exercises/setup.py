"""Warm-up exercises of notebook 00, checked against the real servers.

- :func:`check_get_many`: ``get_many(r, keys)`` fetches many keys in one round trip.
- :func:`check_pool`: ``make_engine(url)`` returns an engine whose pool lets 8 threads run
  200 queries over at most 4 PostgreSQL connections, opened once and reused.
"""

from __future__ import annotations

import random
import threading
import uuid
from collections.abc import Callable, Sequence

import redis
from sqlalchemy import Engine, event, text

from .. import services
from ..measure import RoundTripCounter, run_threads
from .result import CheckResult, failed, not_attempted, passed

__all__ = ["check_get_many", "check_pool"]

GetMany = Callable[[redis.Redis, Sequence[str]], Sequence[bytes | None]]


def check_get_many(student_fn: GetMany, *, keys: int = 50) -> CheckResult:
    """``student_fn(client, keys)`` must return each key's value (``None`` if missing), in
    order, using exactly one round trip to Redis, whatever the number of keys.

    Whatever the student's function does (raise, return garbage), the checker prints one
    FAIL line with the reason instead of raising, and cleans up its keys and clients.
    """
    if keys < 2:
        raise ValueError(f"keys must be at least 2 (some present, some missing), got {keys}")
    name = "check_get_many"
    prefix = f"exercise:get_many:{uuid.uuid4().hex[:8]}"
    names = [f"{prefix}:{i}" for i in range(keys)]
    present = {k: f"value-{i}".encode() for i, k in enumerate(names) if i % 5}
    random.Random(0).shuffle(names)
    expected = [present.get(k) for k in names]
    client = services.redis_client()
    counter = RoundTripCounter(services.redis_url())
    try:
        client.mset(present)
        counter.reset()
        try:
            got = list(student_fn(counter.client, names))
        except NotImplementedError:
            return not_attempted(name, "implement get_many")
        except Exception as exc:
            return failed(name, f"get_many raised {type(exc).__name__}: {exc}")
        trips = counter.count
    finally:
        client.delete(*present)
        client.close()
        counter.client.close()
    if got != expected:
        wrong = sum(a != b for a, b in zip(got, expected, strict=False))
        wrong += abs(len(got) - len(expected))
        return failed(name, f"{wrong} of {keys} values wrong or missing (order matters)")
    if trips != 1:
        return failed(name, f"{keys} keys fetched in {trips} round trips; expected 1")
    return passed(name, f"{keys} keys ({keys - len(present)} missing) fetched in 1 round trip")


def check_pool(
    make_engine: Callable[[str], Engine],
    *,
    threads: int = 8,
    queries: int = 25,
    connections: int = 4,
) -> CheckResult:
    """``make_engine(url)`` must return a SQLAlchemy ``Engine`` on which ``threads`` threads,
    released together, each run ``queries`` queries (``with engine.connect()`` per query, as
    a web handler does per request) and all get their right answer, while PostgreSQL sees at
    most ``connections`` connections opened in total: fewer connections than threads, each
    opened once and reused, the other threads waiting their turn in the pool.

    The checker counts the connections the engine really opens (SQLAlchemy's ``connect``
    event fires once per new DBAPI connection); it prints one FAIL line instead of raising,
    and disposes of the engine.
    """
    if connections < 1:
        raise ValueError(f"connections must be positive, got {connections}")
    if threads <= connections:
        raise ValueError(f"threads must exceed connections ({connections}), got {threads}")
    if queries < 2:
        raise ValueError(f"queries must be at least 2, got {queries}")
    name = "check_pool"
    try:
        engine = make_engine(services.database_url())
    except NotImplementedError:
        return not_attempted(name, "implement make_engine")
    except Exception as exc:
        return failed(name, f"make_engine raised {type(exc).__name__}: {exc}")
    if not isinstance(engine, Engine):
        return failed(name, f"make_engine returned {type(engine).__name__}, not an Engine")
    opened = 0
    count_lock = threading.Lock()

    def on_connect(dbapi_connection: object, connection_record: object) -> None:
        nonlocal opened
        with count_lock:
            opened += 1

    def query(worker: int, index: int) -> int:
        with engine.connect() as conn:
            return conn.execute(text("SELECT :n"), {"n": worker * queries + index}).scalar_one()

    event.listen(engine, "connect", on_connect)
    try:
        calls = run_threads(query, threads, calls=queries, pass_worker=True, timeout=60)
    except TimeoutError:
        return failed(name, "queries were still waiting for a connection after 60 s")
    finally:
        event.remove(engine, "connect", on_connect)
        engine.dispose()
    total = threads * queries
    if calls.errors:
        return failed(
            name,
            f"{len(calls.errors)} of {total} queries failed (a thread must wait for a free "
            f"connection, not give up), first: {calls.errors[0]}",
        )
    if sorted(calls.values) != list(range(total)):
        return failed(name, f"{total} queries did not return their own results")
    if opened > connections:
        return failed(
            name,
            f"{threads} threads x {queries} queries opened {opened} connections; at most "
            f"{connections} may be opened, then reused: cap the pool (pool_size, max_overflow) "
            "and let the other threads wait for a free connection",
        )
    return passed(
        name,
        f"{threads} threads x {queries} queries: all {total} right, "
        f"over at most {connections} connections, each reused",
    )
