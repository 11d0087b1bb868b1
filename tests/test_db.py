"""course_lib.db against the real PostgreSQL: seeding, statement counts per loading strategy,
lazy="raise", pool timeouts, keyset pagination, AsyncSession lazy loads."""

from __future__ import annotations

import hashlib
import math
import threading
import time
import warnings
from collections.abc import Iterator

import pytest
from sqlalchemy import Column, Engine, Integer, MetaData, Table, create_engine, func, select, text
from sqlalchemy.exc import InvalidRequestError, LegacyAPIWarning, MissingGreenlet, StatementError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session, raiseload, selectinload

from course_lib import db, services
from course_lib.db.lesson import as_written, demos
from course_lib.measure import run_async


@pytest.fixture
def seeded(pg_engine: Engine) -> Engine:
    db.populate(pg_engine, users=1000, posts_per_user=2, seed=7)
    return pg_engine


def _digest(engine: Engine) -> str:
    with engine.connect() as conn:
        users = conn.execute(text("SELECT id, name, email FROM users ORDER BY id")).all()
        # ctid order: the physical order the rows were copied in, which the seed also fixes
        posts = conn.execute(text("SELECT id, user_id, title, likes FROM posts ORDER BY ctid"))
        return hashlib.sha256(repr((users, posts.all())).encode()).hexdigest()


def test_populate_is_deterministic_and_exact() -> None:
    digests = []
    for seed in (1, 1, 2):
        schema = services.unique_schema("tdb")
        engine = services.schema_engine(schema)
        try:
            done = db.populate(engine, users=50, posts_per_user=3, seed=seed)
            digests.append(_digest(engine))
            with engine.connect() as conn:
                per_user = conn.execute(
                    text("SELECT DISTINCT count(*) FROM posts GROUP BY user_id")
                ).scalars()
                assert sorted(per_user) == [3]
        finally:
            engine.dispose()
            services.drop_schema(schema)
        assert (done.users, done.posts, done.rows) == (50, 150, 200)
        assert done.rows_per_second > 0
    assert digests[0] == digests[1] != digests[2]


def test_populate_scatters_posts_and_sequences_continue(seeded: Engine) -> None:
    with Session(seeded) as session:
        first_owners = session.scalars(select(db.Post.user_id).order_by(db.Post.id).limit(10))
        assert sorted(first_owners) != [1] * 10  # shuffled, not user by user
        session.add(db.Post(user_id=1, title="new", likes=0))
        session.add(db.User(name="New", email="new@example.com"))
        session.commit()  # would collide with a copied id if the sequences were not moved
        assert session.scalar(select(func.max(db.Post.id))) == 2001
        assert session.scalar(select(func.max(db.User.id))) == 1001


def test_populate_refuses_a_filled_table_and_bad_arguments(seeded: Engine) -> None:
    with pytest.raises(ValueError, match="not empty"):
        db.populate(seeded, users=1, posts_per_user=1, seed=1)
    with pytest.raises(ValueError, match="users"):
        db.populate(seeded, users=0, posts_per_user=1, seed=1)
    with pytest.raises(TypeError, match="posts_per_user"):
        db.populate(seeded, users=1, posts_per_user=True, seed=1)
    with pytest.raises(TypeError, match="seed"):
        db.populate(seeded, users=1, posts_per_user=1, seed="7")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^engine must be a SQLAlchemy Engine, got str"):
        db.populate("str", users=1, posts_per_user=1, seed=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^engine"):
        db.add_post_user_index(None)  # type: ignore[arg-type]


@pytest.mark.parametrize("n", [10, 500, 501, 1000])
def test_statement_counts_per_loading_strategy(seeded: Engine, n: int) -> None:
    counts = {}
    for strategy in demos.STRATEGIES:
        with Session(seeded) as session, db.QueryCounter(seeded) as counter:
            posts = demos.load_users_with_posts(session, n, strategy)
        assert posts == 2 * n
        counts[strategy] = counter.count
    # SQLAlchemy's selectinload sends the parent ids 500 per IN list
    assert counts == {
        "lazy (N+1)": 1 + n,
        "selectinload": 1 + math.ceil(n / 500),
        "joinedload": 1,
    }


def test_as_written_loop_is_n_plus_one_and_eager_is_not(seeded: Engine) -> None:
    seen: list[int] = []
    with Session(seeded) as session, db.QueryCounter(seeded) as lazy:
        as_written.n_plus_one(session, print=lambda posts: seen.append(len(posts)))
    with Session(seeded) as session, db.QueryCounter(seeded) as eager:
        as_written.eager_loading(session, print=lambda posts: seen.append(len(posts)))
    assert (lazy.count, eager.count) == (1001, 3)
    assert seen == [2] * 2000


def test_as_written_get_warns_and_update_fails(seeded: Engine) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        user = as_written.get_user(3, seeded)
    assert user.id == 3 and any(issubclass(w.category, LegacyAPIWarning) for w in caught)
    with pytest.raises(AttributeError, match="update"), warnings.catch_warnings():
        warnings.simplefilter("ignore", LegacyAPIWarning)
        as_written.update_user(3, {"name": "X"}, seeded)


def test_raiseload_turns_an_n_plus_one_into_an_error(seeded: Engine) -> None:
    with Session(seeded) as session:
        users = session.scalars(select(db.User).limit(3).options(raiseload("*"))).all()
        with pytest.raises(InvalidRequestError, match="lazy='raise'"):
            [len(u.posts) for u in users]
        eager = session.scalars(
            select(db.User).limit(3).options(selectinload(db.User.posts), raiseload("*"))
        ).all()
        assert [len(u.posts) for u in eager] == [2, 2, 2]


def test_async_lazy_load_raises_missing_greenlet_and_eager_fixes_it(seeded: Engine) -> None:
    url = seeded.url

    async def scenario() -> tuple[str, list[int]]:
        engine = create_async_engine(url, connect_args=_connect_args(seeded))
        try:
            async with AsyncSession(engine) as session:
                users = (await session.scalars(select(db.User).order_by(db.User.id).limit(3))).all()
                try:
                    len(users[0].posts)
                    lazy = "no error"
                except (MissingGreenlet, StatementError) as exc:
                    # SQLAlchemy 2.1 wraps it in a StatementError that names the lazy SELECT
                    lazy = type(getattr(exc, "orig", None) or exc).__name__
                stmt = select(db.User).order_by(db.User.id).limit(3)
                eager = (await session.scalars(stmt.options(selectinload(db.User.posts)))).all()
                return lazy, [len(u.posts) for u in eager]
        finally:
            await engine.dispose()

    assert run_async(scenario(), timeout=60) == ("MissingGreenlet", [2, 2, 2])


def _connect_args(engine: Engine) -> dict[str, str]:
    with engine.connect() as conn:
        schema = conn.execute(text("SELECT current_schema()")).scalar_one()
    return {"options": f'-c search_path="{schema}"'}


def test_pool_timeout_fires_within_bounds() -> None:
    engine = create_engine(services.database_url(), pool_size=2, max_overflow=0, pool_timeout=0.3)
    held = [engine.connect() for _ in range(2)]
    try:
        start = time.monotonic()
        with pytest.raises(PoolTimeout, match="QueuePool limit of size 2 overflow 0"):
            engine.connect()
        waited = time.monotonic() - start
        # it waited for the timeout, and gave up long before a hang would
        assert 0.3 <= waited < 10
        held.pop().close()
        with engine.connect() as conn:  # a returned connection is handed out again
            assert conn.execute(text("SELECT 1")).scalar() == 1
    finally:
        for conn in held:
            conn.close()
        engine.dispose()


def test_pool_caps_concurrent_connections_from_32_threads() -> None:
    engine = create_engine(services.database_url(), pool_size=3, max_overflow=2, pool_timeout=60)
    active, peak, lock = 0, 0, threading.Lock()

    def work() -> None:
        nonlocal active, peak
        with engine.connect() as conn:
            with lock:
                active += 1
                peak = max(peak, active)
            conn.execute(text("SELECT pg_sleep(0.01)"))
            with lock:
                active -= 1

    try:
        threads = [threading.Thread(target=work) for _ in range(32)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert 2 <= peak <= 5 and engine.pool.checkedout() == 0
        assert engine.pool.size() == 3
    finally:
        engine.dispose()


def test_pool_sweep_mean_latency_includes_the_wait_for_a_connection() -> None:
    sweep = demos.pool_sweep(
        services.database_url(),
        {},
        sizes=[2],
        overflows=[0],
        threads=8,
        calls=3,
        query="SELECT pg_sleep(0.02)",
        params=lambda worker, index: {},
    )
    (row,) = sweep.itertuples()
    # Little's law: queries in flight = throughput x mean time in the system. 8 threads on 2
    # connections keep more than 2 in flight (the rest wait in the pool), never more than 8.
    in_flight = row.queries_per_s * row.mean_ms / 1e3
    assert row.mean_ms >= 20 and 2 < in_flight <= 8


@pytest.fixture
def posts_only(pg_engine: Engine) -> Iterator[Engine]:
    db.populate(pg_engine, users=10, posts_per_user=10, seed=3)
    yield pg_engine


def test_keyset_pages_visit_every_row_once_in_order_without_offset(posts_only: Engine) -> None:
    with Session(posts_only) as session:
        pages = list(db.iter_keyset(session, select(db.Post), db.Post.id, size=7))
        ids = [p.id for page in pages for p in page]
        assert ids == list(range(1, 101)) and [len(p) for p in pages] == [7] * 14 + [2]
        stmt = db.keyset_page(select(db.Post), db.Post.id, after=14, size=7)
        sql = str(stmt.compile())
        assert "OFFSET" not in sql.upper() and "posts.id >" in sql
        offset = db.offset_page(select(db.Post), db.Post.id, page=2, size=7)
        assert session.scalars(stmt).all() == session.scalars(offset).all()


def test_keyset_survives_inserts_behind_the_cursor_offset_does_not(posts_only: Engine) -> None:
    # Newest first: new posts arrive at the front, as in a feed.
    key = db.Post.id.desc()
    with Session(posts_only) as session:
        first = session.scalars(select(db.Post.id).order_by(key).limit(10)).all()
        session.add_all(db.Post(user_id=1, title="fresh", likes=0) for _ in range(3))
        session.commit()
        by_offset = session.scalars(select(db.Post.id).order_by(key).limit(10).offset(10))
        by_key = session.scalars(
            select(db.Post.id).where(db.Post.id < first[-1]).order_by(key).limit(10)
        ).all()
    assert len(set(first) & set(by_offset)) == 3  # OFFSET shows 3 rows a second time
    assert not set(first) & set(by_key) and len(by_key) == 10


def test_composite_keyset_and_bad_arguments(posts_only: Engine) -> None:
    stmt = db.keyset_page(select(db.Post), (db.Post.likes, db.Post.id), after=(100, 5), size=3)
    with Session(posts_only) as session:
        got = [(p.likes, p.id) for p in session.scalars(stmt)]
        everything = sorted((p.likes, p.id) for p in session.scalars(select(db.Post)))
    assert got == [row for row in everything if row > (100, 5)][:3]
    with pytest.raises(ValueError, match="size"):
        db.keyset_page(select(db.Post), db.Post.id, size=0)
    with pytest.raises(ValueError, match="after"):
        db.keyset_page(select(db.Post), (db.Post.likes, db.Post.id), after=3, size=1)
    with pytest.raises(ValueError, match="page"):
        db.offset_page(select(db.Post), db.Post.id, page=-1, size=1)


def test_index_on_the_foreign_key_changes_the_plan(seeded: Engine) -> None:
    sql = "SELECT * FROM posts WHERE user_id = :uid"
    before = demos.explain(seeded, sql, {"uid": 5})
    db.add_post_user_index(seeded)
    after = demos.explain(seeded, sql, {"uid": 5})
    assert before["node"].str.strip().tolist() == ["Seq Scan"]
    assert db.POST_USER_INDEX in after["on"].tolist()
    assert before["rows"].iloc[0] == after["rows"].iloc[0] == 2
    assert after["buffers hit"].iloc[0] * 3 < before["buffers hit"].iloc[0]


def test_the_foreign_key_index_stays_in_the_schema_it_was_added_to(seeded: Engine) -> None:
    db.add_post_user_index(seeded)
    schema = services.unique_schema("t")
    fresh = services.schema_engine(schema)
    try:
        db.populate(fresh, users=3, posts_per_user=2, seed=1)
        with fresh.connect() as conn:
            indexes = (
                conn.execute(
                    text(
                        "SELECT indexname FROM pg_indexes "
                        "WHERE schemaname = :s AND tablename = 'posts'"
                    ),
                    {"s": schema},
                )
                .scalars()
                .all()
            )
    finally:
        fresh.dispose()
        services.drop_schema(schema)
    assert db.POST_USER_INDEX not in indexes


@pytest.fixture
def items(pg_engine: Engine) -> Table:
    """ids 1-4; ``k`` UNIQUE but nullable (1, NULL, NULL, 2); ``rank`` UNIQUE NOT NULL."""
    table = Table(
        "items",
        MetaData(),
        Column("id", Integer, primary_key=True),
        Column("k", Integer, unique=True, nullable=True),
        Column("rank", Integer, unique=True, nullable=False),
    )
    table.create(pg_engine)
    with pg_engine.begin() as conn:
        conn.execute(
            table.insert(),
            [
                {"id": 1, "k": 1, "rank": 30},
                {"id": 2, "k": None, "rank": 10},
                {"id": 3, "k": None, "rank": 40},
                {"id": 4, "k": 2, "rank": 20},
            ],
        )
    return table


@pytest.mark.parametrize("size", [2, 3])
def test_iter_keyset_refuses_a_nullable_unique_key_instead_of_looping(
    pg_engine: Engine, items: Table, size: int
) -> None:
    with Session(pg_engine) as session:
        # before: size 3 repeated page 1 forever, size 2 visited ids [1, 4] of [1, 2, 3, 4]
        with pytest.raises(ValueError, match=r"^key must be NOT NULL columns; items\.k"):
            db.iter_keyset(session, select(items), items.c.k, size=size)
        with pytest.raises(ValueError, match=r"^key must be NOT NULL"):
            db.keyset_page(select(items), items.c.k, after=1, size=size)


@pytest.mark.parametrize("size", [2, 3])
def test_iter_keyset_visits_every_row_exactly_once_on_a_unique_not_null_key(
    pg_engine: Engine, items: Table, size: int
) -> None:
    with Session(pg_engine) as session:
        for key, order in ((items.c.id, [1, 2, 3, 4]), (items.c.rank, [2, 4, 1, 3])):
            pages = list(db.iter_keyset(session, select(items), key, size=size))
            visited = [row.id for page in pages for row in page]
            assert visited == order  # each id once, in key order
            assert [len(page) for page in pages] == ([2, 2] if size == 2 else [3, 1])


def test_iter_keyset_pages_a_statement_of_rows(posts_only: Engine) -> None:
    stmt = select(db.Post.id, db.Post.title)
    with Session(posts_only) as session:
        pages = list(db.iter_keyset(session, stmt, db.Post.id, size=30))
    rows = [row for page in pages for row in page]
    assert [row.id for row in rows] == list(range(1, 101))  # before: AttributeError
    assert all(row.title.endswith(f"#{row.id}") for row in rows)
    assert [len(page) for page in pages] == [30, 30, 30, 10]


def test_keyset_refuses_keys_and_statements_it_cannot_page(posts_only: Engine) -> None:
    with Session(posts_only) as session:
        for key in (db.Post.likes, db.Post.user_id, (db.Post.likes, db.Post.user_id)):
            with pytest.raises(ValueError, match=r"^key must be declared unique"):
                db.keyset_page(select(db.Post), key, size=5)
        with pytest.raises(ValueError, match=r"^key must be table columns"):
            db.iter_keyset(session, select(db.Post), db.Post.id.desc(), size=5)
        with pytest.raises(ValueError, match=r"^stmt must have no ORDER BY"):
            db.iter_keyset(session, select(db.Post).order_by(db.Post.likes), db.Post.id, size=5)
        with pytest.raises(ValueError, match=r"^stmt must have no ORDER BY"):
            db.keyset_page(select(db.Post).limit(3), db.Post.id, size=5)
        with pytest.raises(ValueError, match=r"^key must be a column of Post's table"):
            db.iter_keyset(session, select(db.Post), db.User.id, size=5)
        with pytest.raises(ValueError, match=r"^key must be one of stmt's selected columns"):
            db.iter_keyset(session, select(db.Post.title), db.Post.id, size=5)
        with pytest.raises(TypeError, match=r"^key must be one column"):
            db.iter_keyset(session, select(db.Post), (db.Post.likes, db.Post.id), size=5)
        with pytest.raises(ValueError, match=r"^size"):
            db.iter_keyset(session, select(db.Post), db.Post.id, size=0)
        with pytest.raises(TypeError, match=r"^session"):
            db.iter_keyset(None, select(db.Post), db.Post.id, size=5)  # type: ignore[arg-type]
        # a primary key plus any column is unique: accepted
        db.keyset_page(select(db.Post), (db.Post.likes, db.Post.id), size=5)
    pair = Table(  # a composite primary key is unique as a whole, not column by column
        "pair",
        MetaData(),
        Column("a", Integer, primary_key=True),
        Column("b", Integer, primary_key=True),
    )
    with pytest.raises(ValueError, match=r"^key must be declared unique"):
        db.keyset_page(select(pair), pair.c.a, size=5)
    db.keyset_page(select(pair), (pair.c.b, pair.c.a), size=5)


def test_mixed_case_schemas_keep_their_case_and_stay_apart() -> None:
    upper = services.unique_schema("Run")  # Run_<hex>
    lower = upper.lower()  # run_<same hex>: another schema
    engines = {name: services.schema_engine(name) for name in (upper, lower)}
    try:
        with engines[upper].begin() as conn:
            # before: the search_path was lowercased to a schema that does not exist: None
            assert conn.execute(text("SELECT current_schema()")).scalar() == upper
            conn.execute(text("CREATE TABLE mine (id int)"))
        with engines[lower].connect() as conn:
            assert conn.execute(text("SELECT current_schema()")).scalar() == lower
            assert conn.execute(text("SELECT to_regclass('mine')")).scalar() is None
        with engines[upper].connect() as conn:
            assert conn.execute(text("SELECT to_regclass('mine')")).scalar() == "mine"
    finally:
        for name, engine in engines.items():
            engine.dispose()
            services.drop_schema(name)
    admin = services.engine()
    try:
        with admin.connect() as conn:
            query = text("SELECT count(*) FROM pg_namespace WHERE nspname IN (:a, :b)")
            assert conn.execute(query, {"a": upper, "b": lower}).scalar() == 0
    finally:
        admin.dispose()


def test_schema_names_postgresql_would_cut_are_refused() -> None:
    # PostgreSQL keeps 63 bytes of a name: longer ones would share a schema silently
    with pytest.raises(ValueError, match=r"^schema must be at most 63"):
        services.schema_engine("s" * 64)
    with pytest.raises(ValueError, match=r"^prefix must be a str of at most 50"):
        services.unique_schema("p" * 51)
    assert len(services.unique_schema("p" * 50)) == 63
    with pytest.raises(ValueError, match=r"^schema must be a plain ASCII identifier"):
        services.schema_engine('x" CASCADE; --')


def test_iter_keyset_is_not_shifted_by_rows_inserted_behind_the_cursor(
    pg_engine: Engine, items: Table
) -> None:
    with Session(pg_engine) as session:
        pages = db.iter_keyset(session, select(items), items.c.rank, size=2)
        visited = [row.id for row in next(pages)]  # ranks 10, 20
        with pg_engine.begin() as conn:  # a row lands behind the cursor (rank 15)
            conn.execute(items.insert(), {"id": 5, "k": 5, "rank": 15})
        visited += [row.id for page in pages for row in page]
        by_offset = session.execute(
            db.offset_page(select(items), items.c.rank, page=1, size=2)
        ).all()
    assert visited == [2, 4, 1, 3]  # every row that was there once; no repeat
    assert [row.id for row in by_offset] == [4, 1]  # OFFSET shows id 4 a second time
