"""Notebook 04's lesson measurements: what each one claims to measure, on the real server."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import Engine

from course_lib import db, services
from course_lib.db.lesson import demos


@pytest.fixture
def seeded(pg_engine: Engine) -> Iterator[Engine]:
    db.populate(pg_engine, users=200, posts_per_user=5, seed=7)
    yield pg_engine


def test_pool_sweep_repeats_every_configuration_and_counts_connects_in_the_window() -> None:
    sweep = demos.pool_sweep(
        services.database_url(),
        {},
        sizes=[2],
        overflows=[0, 4],
        threads=8,
        calls=3,
        repeats=2,
        query="SELECT pg_sleep(0.02)",
        params=lambda worker, index: {},
    )
    assert sorted(zip(sweep.repeat, sweep.max_overflow, strict=True)) == [
        (0, 0),
        (0, 4),
        (1, 0),
        (1, 4),
    ]
    kept, overflow = sweep[sweep.max_overflow == 0], sweep[sweep.max_overflow == 4]
    # The pool's own connections are open before the clock; overflow ones cannot be (QueuePool
    # closes them on return), so 8 threads on 2 + 4 connections open some inside the window.
    assert (kept.connects == 0).all()
    assert (overflow.connects >= 1).all()
    # Little's law: 8 threads on 2 connections keep more than 2 queries in flight.
    in_flight = kept.queries_per_s * kept.mean_ms / 1e3
    assert (kept.mean_ms >= 20).all() and ((in_flight > 2) & (in_flight <= 8)).all()
    with pytest.raises(ValueError, match="repeats"):
        demos.pool_sweep(
            services.database_url(),
            {},
            sizes=[1],
            overflows=[0],
            repeats=0,
            query="SELECT 1",
            params=lambda worker, index: {},
        )


def test_explain_shows_estimates_the_filter_and_the_raw_plan(seeded: Engine) -> None:
    sql = "SELECT * FROM posts WHERE user_id = :uid"
    before = demos.explain(seeded, sql, {"uid": 5})
    (scan,) = before.itertuples(index=False)
    # A sequential scan reads all 1,000 posts and throws away all but user 5's.
    assert scan.rows == 5 and before["removed by filter"].iloc[0] == 995
    assert before["est. rows"].iloc[0] >= 1
    assert "Seq Scan on posts" in before.attrs["plan"]
    assert "Rows Removed by Filter: 995" in before.attrs["plan"]
    db.add_post_user_index(seeded)
    after = demos.explain(seeded, sql, {"uid": 5})
    assert db.POST_USER_INDEX in after.attrs["plan"]
    # The parent's buffers include its child's (PostgreSQL reports them cumulatively).
    assert after["buffers hit"].iloc[0] >= after["buffers hit"].iloc[1] > 0


def test_pagination_sweep_gives_the_fastest_of_each_page_both_ways(seeded: Engine) -> None:
    sweep = demos.pagination_sweep(seeded, [0, 10, 40], size=20, repeats=3)
    assert sorted(zip(sweep.method, sweep.page, strict=True)) == [
        ("OFFSET", 0),
        ("OFFSET", 10),
        ("OFFSET", 40),
        ("keyset", 0),
        ("keyset", 10),
        ("keyset", 40),
    ]
    assert sweep["same rows"].all() and (sweep.ms > 0).all()
    with pytest.raises(ValueError, match="repeats"):
        demos.pagination_sweep(seeded, [0], repeats=0)
