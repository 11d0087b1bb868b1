"""Exercises of notebook 04 (database optimisation); each checker runs the student's code
against a real PostgreSQL: the first two in a schema of their own that they drop afterwards,
the third on a primary and a streaming replica of its own
(:class:`~course_lib.db.lesson.replicas.ReplicaSet`).

- :func:`check_titles_by_user`: the posts of 3 and of 1,200 users (more than one ``IN`` list of
  ``selectinload``'s 500), at most 2 statements each time, exactly the right titles in post
  id order, an empty list for a user without posts.
- :func:`check_feed_page`: keyset pagination on a non-unique column, most liked first and
  newest first among equal likes: walking every page visits each post once, in that order,
  one statement per page and never an ``OFFSET``.
- :func:`check_read_your_write`: a read routed by the LSN token of the client's last write:
  never older than that write (the replica applies commits late), on the replica as soon as
  it has replayed the token, and LSNs compared as positions, not as text.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, select, text
from sqlalchemy.orm import Session

from course_lib import services
from course_lib.db import Post, populate
from course_lib.db.lesson.replicas import ReplicaSet
from course_lib.measure import QueryCounter

from .result import CheckResult, failed, not_attempted, passed

__all__ = ["check_feed_page", "check_read_your_write", "check_titles_by_user"]

_USERS, _POSTS_PER_USER, _SEED = 1500, 3, 11
# Ids asked by check_titles_by_user: a few, then more than one IN list of 500, with ids past
# the last user (no posts) at the end.
_FEW = [7, 3, 1600]
_MANY = list(range(301, 1501)) + list(range(1501, 1511))


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


def _expected_titles(engine: Engine, ids: list[int]) -> dict[int, list[str]]:
    expected: dict[int, list[str]] = {uid: [] for uid in ids}
    with Session(engine) as session:
        rows = session.execute(
            select(Post.user_id, Post.title).where(Post.user_id.in_(ids)).order_by(Post.id)
        )
        for user_id, title in rows:
            expected[user_id].append(title)
    return expected


def check_titles_by_user(titles_by_user: Callable[[Session, list[int]], Any]) -> CheckResult:
    """``titles_by_user(session, user_ids)`` returns ``{user_id: [title, ...]}`` for every id
    asked (an empty list for a user without posts), titles in post id order, in at most 2 SQL
    statements: asked for 3 ids, then for 1,210 (past any batch size of 500)."""
    name = "check_titles_by_user"
    with _seeded() as engine:
        for ids in (_FEW, _MANY):
            with Session(engine) as session, QueryCounter(engine) as counter:
                try:
                    got = titles_by_user(session, list(ids))
                except NotImplementedError:
                    return not_attempted(name, "implement titles_by_user")
            expected = _expected_titles(engine, ids)
            if not isinstance(got, dict):
                return failed(name, f"expected a dict, got {type(got).__name__}")
            got = {uid: list(titles) for uid, titles in got.items()}
            if set(got) != set(ids):
                missing, extra = len(set(ids) - set(got)), len(set(got) - set(ids))
                empty = sum(1 for uid in set(ids) - set(got) if not expected[uid])
                return failed(
                    name,
                    f"{len(ids)} ids asked: {missing} missing ({empty} of them users without "
                    f"posts, which map to []), {extra} not asked for",
                )
            wrong = [uid for uid in ids if got[uid] != expected[uid]]
            if wrong:
                uid = wrong[0]
                return failed(
                    name,
                    f"{len(wrong)} users with wrong titles, e.g. user {uid}: expected "
                    f"{expected[uid]}, got {got[uid]} (post id order)",
                )
            if counter.count > 2:
                return failed(
                    name,
                    f"{counter.count} SQL statements for {len(ids)} ids: at most 2 "
                    f"(an N+1 is {len(ids) + 1}; selectinload sends one per 500 ids)",
                )
    return passed(
        name, f"{len(_FEW)} and {len(_MANY)} ids, right titles in order, at most 2 statements"
    )


def check_feed_page(
    next_page: Callable[[Session, tuple[int, int] | None, int], Any],
) -> CheckResult:
    """``next_page(session, after, size)`` returns the next ``size`` posts as ``(likes, id)``
    pairs, most liked first and, among equal likes, newest (highest id) first; ``after`` is
    ``None`` for the first page, else the last pair of the previous page. Walked over all
    4,500 posts (about 9 per value of ``likes``), 40 per page: every post once, in order, one
    statement per page, no ``OFFSET``."""
    name = "check_feed_page"
    size = 40
    with _seeded() as engine:
        with Session(engine) as session:
            everything = [
                (likes, pid)
                for likes, pid in session.execute(
                    select(Post.likes, Post.id).order_by(Post.likes.desc(), Post.id.desc())
                )
            ]
        seen: list[tuple[int, int]] = []
        statements: list[str] = []
        pages = 0
        after: tuple[int, int] | None = None
        with Session(engine) as session:
            while pages <= len(everything) // size + 1:
                with QueryCounter(engine) as counter:
                    try:
                        raw = next_page(session, after, size)
                    except NotImplementedError:
                        return not_attempted(name, "implement next_page")
                statements += counter.statements
                pages += 1
                if counter.count != 1:
                    return failed(name, f"page {pages}: {counter.count} statements, expected 1")
                try:
                    page = [(int(likes), int(pid)) for likes, pid in raw]
                except (TypeError, ValueError):
                    return failed(name, f"page {pages}: expected (likes, id) pairs, got {raw!r}")
                if len(page) > size:
                    return failed(name, f"page {pages}: {len(page)} rows for size {size}")
                if not page:
                    break
                seen += page
                after = page[-1]
    offsets = [s for s in statements if " OFFSET " in f" {s.upper()} "]
    if offsets:
        return failed(name, f"{len(offsets)} of {len(statements)} statements use OFFSET")
    if seen != everything:
        dupes = len(seen) - len(set(seen))
        skipped = len(set(everything) - set(seen))
        first = next(
            (i for i, (a, b) in enumerate(zip(seen, everything, strict=False)) if a != b),
            min(len(seen), len(everything)),
        )
        return failed(
            name,
            f"walked {len(seen)} posts over {pages} pages ({dupes} duplicates, {skipped} "
            f"skipped); first difference at position {first}: expected "
            f"{everything[first] if first < len(everything) else 'the end'}, got "
            f"{seen[first] if first < len(seen) else 'the end'}",
        )
    filled = pages - 1  # the walk ends with one empty page
    return passed(
        name,
        f"{len(everything)} posts over {filled} pages (+1 empty), each once, in order, no OFFSET",
    )


_NAME = text("SELECT name FROM users WHERE id = :id")
_RENAME = text("UPDATE users SET name = :name WHERE id = :id")
_TOKEN = text("SELECT pg_current_wal_lsn()::text")


_RECEIVED = text("SELECT pg_last_wal_receive_lsn() >= CAST(:t AS pg_lsn)")


def _wait_until_received(replica: Engine, token: str, timeout: float = 30.0) -> None:
    """Poll until the replica has received the WAL up to ``token`` (it applies it later): a
    router that trusts what was received, not replayed, then reads stale every time."""
    deadline = time.monotonic() + timeout
    with replica.connect() as conn:
        while not conn.execute(_RECEIVED, {"t": token}).scalar():
            if time.monotonic() > deadline:
                raise TimeoutError(f"the replica did not receive {token} in {timeout} s")
            time.sleep(0.005)
            conn.rollback()


def _users_reads(counter: QueryCounter) -> int:
    return sum(1 for s in counter.statements if "users" in s.lower())


def check_read_your_write(
    read_name: Callable[[Engine, Engine, str | None, int], Any],
    *,
    apply_delay: float = 1.0,
) -> CheckResult:
    """``read_name(primary, replica, token, user_id)`` returns the user's name as the client
    holding ``token`` must see it: ``token`` is the primary's WAL position (LSN, text such as
    ``'0/3000148'``, from ``pg_current_wal_lsn()``) right after the client's last write, or
    ``None`` if it wrote nothing. On a primary and a replica that applies commits
    ``apply_delay`` seconds late, checks: a client without a token reads on the replica; right
    after a rename the client reads its new name (the replica still has the old one); once
    the replica has replayed the token, the read goes to the replica; a token from long ago,
    written with fewer hex digits than the replica's position (``'0/FFFFFF'``), reads on the
    replica too (LSNs compared as text get this wrong)."""
    name = "check_read_your_write"
    try:  # a stub is told from an attempt before two servers are started for it
        read_name(None, None, None, 0)  # type: ignore[arg-type]
    except NotImplementedError:
        return not_attempted(name, "implement read_name")
    except Exception:  # an attempt: it needs real engines, given below
        pass
    with ReplicaSet.start(apply_delay=apply_delay) as rs:
        primary, replica = rs.engine("primary"), rs.engine("replica")
        populate(primary, users=20, posts_per_user=0, seed=_SEED)
        rs.wait_for_replay()

        def routed(token: str | None, user_id: int) -> tuple[Any, int, int]:
            with QueryCounter(primary) as on_primary, QueryCounter(replica) as on_replica:
                got = read_name(primary, replica, token, user_id)
            return got, _users_reads(on_primary), _users_reads(on_replica)

        try:
            got, p_reads, r_reads = routed(None, 4)
        except NotImplementedError:
            return not_attempted(name, "implement read_name")
        with primary.connect() as conn:
            current = conn.execute(_NAME, {"id": 4}).scalar_one()
        if got != current or p_reads or not r_reads:
            return failed(
                name,
                f"no token: expected {current!r} read on the replica, got {got!r} "
                f"({p_reads} reads of users on the primary, {r_reads} on the replica)",
            )
        tokens = []
        for round_ in range(3):
            new = f"renamed {round_}"
            with primary.begin() as conn:
                conn.execute(_RENAME, {"name": new, "id": 4})
            with primary.connect() as conn:
                token = conn.execute(_TOKEN).scalar_one()
            tokens.append(token)
            _wait_until_received(replica, token)
            got, p_reads, r_reads = routed(token, 4)
            if got != new:
                return failed(
                    name,
                    f"right after writing {new!r} (token {token}) the client read {got!r}: a "
                    "stale read; the replica applies commits late (replay, not receive, is "
                    "what it serves)",
                )
        rs.wait_for_replay()
        got, p_reads, r_reads = routed(tokens[-1], 4)
        if got != new or p_reads or not r_reads:
            return failed(
                name,
                f"once the replica has replayed {tokens[-1]}, the read belongs on the replica: "
                f"got {got!r} with {p_reads} reads of users on the primary, {r_reads} on the "
                "replica",
            )
        with replica.connect() as conn:
            replayed = conn.execute(text("SELECT pg_last_wal_replay_lsn()::text")).scalar_one()
        old = "0/FFFFFF"
        got, p_reads, r_reads = routed(old, 4)
        if got != new or p_reads or not r_reads:
            return failed(
                name,
                f"token {old!r} is older than the replica's {replayed!r}, so the read belongs "
                f"on the replica: got {p_reads} reads of users on the primary, {r_reads} on "
                "the replica (as text, 'F' sorts after '3': compare LSNs as positions, "
                "e.g. CAST(:token AS pg_lsn) or hi << 32 | lo)",
            )
    return passed(
        name,
        "no stale read after 3 writes; replica reads before any write, after replay and for "
        "an old token",
    )
