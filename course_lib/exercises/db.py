"""Exercises of notebook 04 (database optimisation); each checker runs the student's code
against the real PostgreSQL, in a schema of its own that it drops afterwards.

- :func:`check_titles_by_user`: the posts of 400 users in at most 2 statements (no N+1),
  exactly the right titles in post id order.
- :func:`check_next_page`: keyset pagination: walking every page visits each post once, in
  id order, one statement per page and never an ``OFFSET``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from course_lib import services
from course_lib.db import Post, populate
from course_lib.measure import QueryCounter

from .result import CheckResult, failed, not_attempted, passed

__all__ = ["check_next_page", "check_titles_by_user"]

_USERS, _POSTS_PER_USER, _SEED = 600, 3, 11


@contextmanager
def _seeded() -> Iterator[Engine]:
    schema = services.unique_schema("ex04")
    engine = services.schema_engine(schema)
    try:
        populate(engine, users=_USERS, posts_per_user=_POSTS_PER_USER, seed=_SEED)
        yield engine
    finally:
        engine.dispose()
        services.drop_schema(schema)


def check_titles_by_user(titles_by_user: Callable[[Session, list[int]], Any]) -> CheckResult:
    """``titles_by_user(session, user_ids)`` returns ``{user_id: [title, ...]}`` for every id
    asked (400 ids), titles in post id order, in at most 2 SQL statements."""
    name = "check_titles_by_user"
    ids = list(range(101, 501))
    with _seeded() as engine:
        with Session(engine) as session, QueryCounter(engine) as counter:
            try:
                got = titles_by_user(session, list(ids))
            except NotImplementedError:
                return not_attempted(name, "implement titles_by_user")
        with Session(engine) as session:
            expected: dict[int, list[str]] = {uid: [] for uid in ids}
            rows = session.execute(
                select(Post.user_id, Post.title).where(Post.user_id.in_(ids)).order_by(Post.id)
            )
            for user_id, title in rows:
                expected[user_id].append(title)
    if not isinstance(got, dict):
        return failed(name, f"expected a dict, got {type(got).__name__}")
    got = {uid: list(titles) for uid, titles in got.items()}
    if set(got) != set(ids):
        missing, extra = len(set(ids) - set(got)), len(set(got) - set(ids))
        return failed(name, f"keys: {missing} of the 400 ids missing, {extra} ids not asked for")
    wrong = [uid for uid in ids if got[uid] != expected[uid]]
    if wrong:
        uid = wrong[0]
        return failed(
            name,
            f"{len(wrong)} users with wrong titles, e.g. user {uid}: expected {expected[uid]}, "
            f"got {got[uid]} (post id order)",
        )
    if counter.count > 2:
        return failed(
            name, f"{counter.count} SQL statements for 400 users: at most 2 (an N+1 is 401)"
        )
    return passed(name, f"400 users, 1200 titles, right order, {counter.count} statement(s)")


def check_next_page(next_page: Callable[[Session, int | None, int], Any]) -> CheckResult:
    """``next_page(session, after_id, size)`` returns the ids of the ``size`` posts after
    ``after_id`` (``None``: from the start). Walked over all 1800 posts, 50 per page."""
    name = "check_next_page"
    size = 50
    with _seeded() as engine:
        with Session(engine) as session:
            everything = session.scalars(select(Post.id).order_by(Post.id)).all()
        seen: list[int] = []
        statements: list[str] = []
        pages = 0
        after: int | None = None
        with Session(engine) as session:
            while pages <= len(everything) // size + 1:
                with QueryCounter(engine) as counter:
                    try:
                        page = [int(i) for i in next_page(session, after, size)]
                    except NotImplementedError:
                        return not_attempted(name, "implement next_page")
                statements += counter.statements
                pages += 1
                if counter.count != 1:
                    return failed(name, f"page {pages}: {counter.count} statements, expected 1")
                if not page:
                    break
                seen += page
                after = page[-1]
    offsets = [s for s in statements if " OFFSET " in f" {s.upper()} "]
    if offsets:
        return failed(name, f"{len(offsets)} of {len(statements)} statements use OFFSET")
    if seen != list(everything):
        dupes = len(seen) - len(set(seen))
        return failed(
            name,
            f"walked {len(seen)} ids ({dupes} duplicates) over {pages} pages; expected each of "
            f"the {len(everything)} posts once, in id order",
        )
    return passed(name, f"{len(everything)} posts over {pages} pages, each once, no OFFSET")
