"""Each checker of notebook 04 passes the reference solutions and fails planted wrong answers,
one per property it claims to check."""

from __future__ import annotations

from sqlalchemy import select

from course_lib.db import Post, User
from course_lib.exercises.db import check_next_page, check_titles_by_user


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
    return {u.id: [p.title for p in u.posts] for u in users}


def titles_wrong_order(session, user_ids):
    return {uid: sorted(titles) for uid, titles in titles_one_query(session, user_ids).items()}


def titles_missing_users(session, user_ids):
    return titles_one_query(session, user_ids[:-1])


def test_titles_by_user_passes_the_reference() -> None:
    assert check_titles_by_user(titles_one_query)


def test_titles_by_user_fails_an_n_plus_one() -> None:
    result = check_titles_by_user(titles_n_plus_one)
    assert not result and "401 SQL statements" in result.message


def test_titles_by_user_fails_wrong_order_and_missing_users() -> None:
    wrong = check_titles_by_user(titles_wrong_order)
    assert not wrong and "wrong titles" in wrong.message
    missing = check_titles_by_user(titles_missing_users)
    assert not missing and "1 of the 400 ids missing" in missing.message


def test_titles_by_user_not_attempted() -> None:
    def stub(session, user_ids):
        raise NotImplementedError

    result = check_titles_by_user(stub)
    assert not result and "not attempted" in result.message


def keyset(session, after_id, size):
    stmt = select(Post.id)
    if after_id is not None:
        stmt = stmt.where(Post.id > after_id)
    return session.scalars(stmt.order_by(Post.id).limit(size)).all()


def test_next_page_passes_the_reference() -> None:
    result = check_next_page(keyset)
    assert result and "1800 posts over 37 pages" in result.message


def test_next_page_fails_offset() -> None:
    state = {"page": 0}

    def by_offset(session, after_id, size):
        if after_id is None:
            state["page"] = 0
        stmt = select(Post.id).order_by(Post.id).limit(size).offset(state["page"] * size)
        state["page"] += 1
        return session.scalars(stmt).all()

    result = check_next_page(by_offset)
    assert not result and "use OFFSET" in result.message


def test_next_page_fails_an_inclusive_bound() -> None:
    def inclusive(session, after_id, size):
        stmt = select(Post.id)
        if after_id is not None:
            stmt = stmt.where(Post.id >= after_id)  # repeats the last row of every page
        return session.scalars(stmt.order_by(Post.id).limit(size)).all()

    result = check_next_page(inclusive)
    assert not result and "duplicates" in result.message


def test_next_page_fails_two_statements_per_page() -> None:
    def counting_first(session, after_id, size):
        session.scalar(select(Post.id).limit(1))
        return keyset(session, after_id, size)

    result = check_next_page(counting_first)
    assert not result and "2 statements, expected 1" in result.message


def test_next_page_not_attempted() -> None:
    def stub(session, after_id, size):
        raise NotImplementedError

    assert "not attempted" in check_next_page(stub).message
