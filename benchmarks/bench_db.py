"""Database: each course_lib technique as a ratio to the naive way, measured in the same run,
in a schema of its own that is dropped afterwards.

1. ``SELECT 1`` on a new connection (``NullPool``) vs a pooled checkout: seconds per query.
2. The first 1000 users and their posts: lazy loading (the seed's N+1) vs ``selectinload``;
   time (target: lazy >= 3x slower) and statements (1001 vs 3).
3. Seeding: rows per second of ``populate`` (``COPY``) vs row-by-row ORM inserts (one
   ``INSERT`` per row, as a loop of ``session.add`` + ``flush`` sends); target >= 10x.
4. The deepest page of 20 posts: ``OFFSET`` vs keyset (target: OFFSET >= 3x slower).
"""

from __future__ import annotations

import time

from harness import Row, interleaved
from sqlalchemy import create_engine, select, text
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from course_lib import services
from course_lib.db import Base, Post, QueryCounter, User, keyset_page, offset_page, populate
from course_lib.db.lesson.demos import load_users_with_posts

BENCH = "db"


def _connections(url: str, quick: bool) -> list[Row]:
    new = create_engine(url, poolclass=NullPool)
    pooled = create_engine(url, pool_size=1)

    def select_one(engine):
        def call() -> object:
            with engine.connect() as conn:
                return conn.execute(text("SELECT 1")).scalar()

        return call

    try:
        times = interleaved(
            {"new connection": select_one(new), "pooled checkout": select_one(pooled)},
            calls=20 if quick else 100,
            rounds=3 if quick else 9,
        )
    finally:
        new.dispose()
        pooled.dispose()
    return [
        Row(BENCH, "new connection per query", "per query", times["new connection"] * 1e3,
            "ms", "pooled checkout", times["pooled checkout"] * 1e3, target=2.0,
            higher_is_better=True)
    ]  # fmt: skip


def _loading(engine, quick: bool) -> list[Row]:
    n = 300 if quick else 1000  # quick: a smoke test, the N+1 shape shows at 300 already
    counts = {}
    for strategy in ("lazy (N+1)", "selectinload"):
        with Session(engine) as session, QueryCounter(engine) as counter:
            load_users_with_posts(session, n, strategy)
        counts[strategy] = counter.count

    def load(strategy: str):
        def call() -> object:
            with Session(engine) as session:
                return load_users_with_posts(session, n, strategy)

        return call

    times = interleaved({s: load(s) for s in counts}, calls=1, rounds=2 if quick else 5)
    return [
        Row(BENCH, f"lazy N+1, N={n}", "time", times["lazy (N+1)"] * 1e3, "ms",
            "selectinload", times["selectinload"] * 1e3, target=3.0, higher_is_better=True),
        Row(BENCH, f"lazy N+1, N={n}", "statements", counts["lazy (N+1)"], "stmts",
            "selectinload", counts["selectinload"]),
    ]  # fmt: skip


def _seeding(quick: bool) -> list[Row]:
    users, per_user = (2000, 10) if quick else (10000, 10)
    orm_rows = 500 if quick else 2000
    copy_schema, orm_schema = services.unique_schema("bdb"), services.unique_schema("bdb")
    copy_engine, orm_engine = (
        services.schema_engine(copy_schema),
        services.schema_engine(orm_schema),
    )
    try:
        copied = populate(copy_engine, users=users, posts_per_user=per_user, seed=1)
        Base.metadata.create_all(orm_engine)
        with Session(orm_engine) as session:
            start = time.perf_counter()
            for i in range(1, orm_rows + 1):
                session.add(User(id=i, name=f"User {i}", email=f"user{i}@example.com"))
                session.flush()  # one INSERT per row, as a loop that saves each object sends
            session.commit()
            orm_per_second = orm_rows / (time.perf_counter() - start)
    finally:
        copy_engine.dispose()
        orm_engine.dispose()
        services.drop_schema(copy_schema)
        services.drop_schema(orm_schema)
    return [
        Row(BENCH, f"populate (COPY), {copied.rows:,} rows", "rows/s", copied.rows_per_second,
            "rows/s", "ORM row by row", orm_per_second, target=10.0, higher_is_better=True)
    ]  # fmt: skip


def _pagination(engine, quick: bool) -> list[Row]:
    with engine.connect() as conn:
        total = conn.execute(text("SELECT count(*) FROM posts")).scalar_one()
        size = 20
        last = total // size - 1
        base = select(Post.id, Post.title)
        by_offset = offset_page(base, Post.id, page=last, size=size)
        by_key = keyset_page(base, Post.id, after=last * size, size=size)
        assert conn.execute(by_offset).all() == conn.execute(by_key).all()
        times = interleaved(
            {
                "OFFSET": lambda: conn.execute(by_offset).all(),
                "keyset": lambda: conn.execute(by_key).all(),
            },
            calls=10 if quick else 50,
            rounds=3 if quick else 9,
        )
    return [
        Row(BENCH, f"OFFSET page {last} of {size}", "per page", times["OFFSET"] * 1e3, "ms",
            "keyset", times["keyset"] * 1e3, target=3.0, higher_is_better=True)
    ]  # fmt: skip


def run(quick: bool) -> list[Row]:
    rows = _connections(services.database_url(), quick)
    schema = services.unique_schema("bdb")
    engine = services.schema_engine(schema)
    try:
        populate(engine, users=1000, posts_per_user=10 if quick else 50, seed=1)
        rows += _loading(engine, quick)
        rows += _pagination(engine, quick)
    finally:
        engine.dispose()
        services.drop_schema(schema)
    return rows + _seeding(quick)
