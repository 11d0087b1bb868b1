"""Each checker of notebook 04 passes the reference solutions and fails planted wrong answers,
one per property it claims to check."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select, text, tuple_
from sqlalchemy.orm import selectinload

from course_lib.db import Post, User
from course_lib.exercises.db import check_feed_page, check_read_your_write, check_titles_by_user

# -- exercise 1: titles_by_user -------------------------------------------------------------


def titles_one_query(session, user_ids):
    titles = {uid: [] for uid in user_ids}
    rows = session.execute(
        select(Post.user_id, Post.title).where(Post.user_id.in_(user_ids)).order_by(Post.id)
    )
    for uid, title in rows:
        titles[uid].append(title)
    return titles


def titles_n_plus_one(session, user_ids):
    users = session.scalars(select(User).where(User.id.in_(user_ids)))
    titles = {uid: [] for uid in user_ids}
    titles.update({u.id: [p.title for p in u.posts] for u in users})
    return titles


def titles_selectinload(session, user_ids):
    users = session.scalars(
        select(User).where(User.id.in_(user_ids)).options(selectinload(User.posts))
    )
    titles = {uid: [] for uid in user_ids}
    titles.update({u.id: [p.title for p in u.posts] for u in users})
    return titles


def titles_wrong_order(session, user_ids):
    return {uid: sorted(titles) for uid, titles in titles_one_query(session, user_ids).items()}


def titles_only_users_with_posts(session, user_ids):
    return {uid: titles for uid, titles in titles_one_query(session, user_ids).items() if titles}


def test_titles_by_user_passes_the_reference() -> None:
    result = check_titles_by_user(titles_one_query)
    assert result and "3 and 1210 ids" in result.message


def test_titles_by_user_fails_an_n_plus_one() -> None:
    result = check_titles_by_user(titles_n_plus_one)
    assert not result and "SQL statements for 3 ids" in result.message


def test_titles_by_user_fails_selectinload_past_one_in_list() -> None:
    # 2 statements for 3 ids, but 1 + ceil(1210 / 500) = 4 for the long list.
    result = check_titles_by_user(titles_selectinload)
    assert not result and "4 SQL statements for 1210 ids" in result.message


def test_titles_by_user_fails_wrong_order_and_missing_users() -> None:
    wrong = check_titles_by_user(titles_wrong_order)
    assert not wrong and "wrong titles" in wrong.message
    missing = check_titles_by_user(titles_only_users_with_posts)
    assert not missing and "1 missing (1 of them users without posts" in missing.message


def test_titles_by_user_not_attempted() -> None:
    def stub(session, user_ids):
        raise NotImplementedError

    result = check_titles_by_user(stub)
    assert not result and "not attempted" in result.message


# -- exercise 2: feed pages, most liked first, newest first among ties ---------------------

FEED = (Post.likes.desc(), Post.id.desc())


def feed_row_values(session, after, size):
    stmt = select(Post.likes, Post.id)
    if after is not None:
        stmt = stmt.where(tuple_(Post.likes, Post.id) < tuple_(*after))
    return session.execute(stmt.order_by(*FEED).limit(size)).all()


def test_feed_page_passes_the_reference() -> None:
    result = check_feed_page(feed_row_values)
    assert result and "4500 posts over 113 pages" in result.message


def test_feed_page_fails_a_cursor_on_likes_alone() -> None:
    def likes_only(session, after, size):
        stmt = select(Post.likes, Post.id)
        if after is not None:
            stmt = stmt.where(Post.likes < after[0])  # skips the rest of a tie
        return session.execute(stmt.order_by(*FEED).limit(size)).all()

    result = check_feed_page(likes_only)
    assert not result and "skipped" in result.message


def test_feed_page_fails_oldest_first_among_ties() -> None:
    def oldest_first(session, after, size):
        stmt = select(Post.likes, Post.id)
        if after is not None:
            stmt = stmt.where(
                (Post.likes < after[0]) | ((Post.likes == after[0]) & (Post.id > after[1]))
            )
        return session.execute(stmt.order_by(Post.likes.desc(), Post.id).limit(size)).all()

    result = check_feed_page(oldest_first)
    assert not result and "first difference at position" in result.message


def test_feed_page_fails_offset() -> None:
    state = {"page": 0}

    def by_offset(session, after, size):
        if after is None:
            state["page"] = 0
        stmt = select(Post.likes, Post.id).order_by(*FEED).limit(size).offset(state["page"] * size)
        state["page"] += 1
        return session.execute(stmt).all()

    result = check_feed_page(by_offset)
    assert not result and "use OFFSET" in result.message


def test_feed_page_fails_an_inclusive_bound() -> None:
    def inclusive(session, after, size):
        stmt = select(Post.likes, Post.id)
        if after is not None:
            stmt = stmt.where(tuple_(Post.likes, Post.id) <= tuple_(*after))  # repeats a row
        return session.execute(stmt.order_by(*FEED).limit(size)).all()

    result = check_feed_page(inclusive)
    assert not result and "duplicates" in result.message


def test_feed_page_fails_two_statements_per_page() -> None:
    def counting_first(session, after, size):
        session.scalar(select(func.count()).select_from(Post))
        return feed_row_values(session, after, size)

    result = check_feed_page(counting_first)
    assert not result and "2 statements, expected 1" in result.message


def test_feed_page_not_attempted() -> None:
    def stub(session, after, size):
        raise NotImplementedError

    assert "not attempted" in check_feed_page(stub).message


# -- exercise 3: a read routed by the LSN token of the client's last write ------------------
# The checker starts a primary and a replica of its own (the same PostgreSQL binaries in both
# passes of `make test`): one pass covers these tests.

NAME = text("SELECT name FROM users WHERE id = :id")


def _name(engine, user_id):
    with engine.connect() as conn:
        return conn.execute(NAME, {"id": user_id}).scalar_one()


def read_by_pg_lsn(primary, replica, token, user_id):
    engine = replica
    if token is not None:
        with replica.connect() as conn:
            caught_up = conn.execute(
                text("SELECT pg_last_wal_replay_lsn() >= CAST(:t AS pg_lsn)"), {"t": token}
            ).scalar()
        engine = replica if caught_up else primary
    return _name(engine, user_id)


def _lsn(value):
    hi, lo = value.split("/")
    return int(hi, 16) << 32 | int(lo, 16)


def _routed_by(replayed_sql, compare):
    def read(primary, replica, token, user_id):
        engine = replica
        if token is not None:
            with replica.connect() as conn:
                replayed = conn.execute(text(replayed_sql)).scalar()
            engine = replica if replayed is not None and compare(replayed, token) else primary
        return _name(engine, user_id)

    return read


@pytest.mark.one_pass
def test_read_your_write_passes_the_reference() -> None:
    assert check_read_your_write(read_by_pg_lsn)
    python_compare = _routed_by(
        "SELECT pg_last_wal_replay_lsn()::text", lambda r, t: _lsn(r) >= _lsn(t)
    )
    assert check_read_your_write(python_compare)


@pytest.mark.one_pass
def test_read_your_write_fails_the_receive_lsn() -> None:
    # The replica has received the WAL at once but applies it a second later.
    received = _routed_by("SELECT pg_last_wal_receive_lsn()::text", lambda r, t: _lsn(r) >= _lsn(t))
    result = check_read_your_write(received)
    assert not result and "stale read" in result.message


@pytest.mark.one_pass
def test_read_your_write_fails_lsns_compared_as_text() -> None:
    as_text = _routed_by("SELECT pg_last_wal_replay_lsn()::text", lambda r, t: r >= t)
    result = check_read_your_write(as_text)
    assert not result and "'0/FFFFFF'" in result.message


@pytest.mark.one_pass
def test_read_your_write_fails_always_primary_and_always_replica() -> None:
    primary_only = check_read_your_write(lambda p, r, token, uid: _name(p, uid))
    assert not primary_only and "no token" in primary_only.message
    replica_only = check_read_your_write(lambda p, r, token, uid: _name(r, uid))
    assert not replica_only and "stale read" in replica_only.message


@pytest.mark.one_pass
def test_read_your_write_fails_reading_the_primary_after_replay() -> None:
    # Pins to the primary once a token exists, and never lets go.
    sticky = _routed_by("SELECT NULL::text", lambda r, t: False)
    result = check_read_your_write(sticky)
    assert not result and "once the replica has replayed" in result.message


@pytest.mark.one_pass
def test_read_your_write_not_attempted() -> None:
    def stub(primary, replica, token, user_id):
        raise NotImplementedError

    assert "not attempted" in check_read_your_write(stub).message
