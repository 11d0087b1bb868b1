"""Filling ``users`` and ``posts`` fast and reproducibly: ``COPY`` through psycopg 3.

Guarantees:

- Deterministic: the same ``seed`` gives the same rows (ids, names, titles, likes, and the
  order the posts sit in the table), on any server, so notebooks can print exact counts.
- Every user has exactly ``posts_per_user`` posts; the posts of one user are scattered over
  the table (shuffled), as in a real table filled over time, so reading one user's posts
  without an index means reading the whole table.
- Fast: two ``COPY ... FROM STDIN`` streams in one transaction (no per-row round trip, no
  ORM objects), then the id sequences are moved past the copied ids and the tables are
  ``ANALYZE``d so the planner knows their size. :class:`Populated` reports rows per second.
- The tables are created if missing and must be empty: populating twice raises
  ``ValueError`` instead of silently doubling the data.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

from sqlalchemy import Engine, func, select, text

from course_lib.validation import integer, non_negative_int, positive_int

from .models import Base, User

__all__ = ["POST_USER_INDEX", "Populated", "add_post_user_index", "populate"]

POST_USER_INDEX = "ix_posts_user_id"

_FIRST = ("Ana", "Bruno", "Carla", "Diego", "Elisa", "Fabio", "Gabi", "Heitor", "Iara", "Joao")
_LAST = ("Silva", "Souza", "Costa", "Santos", "Oliveira", "Lima", "Pereira", "Alves")
_TOPICS = ("cache", "pool", "index", "replica", "queue", "lock", "shard", "latency", "p99")


@dataclass(frozen=True)
class Populated:
    """What :func:`populate` wrote and how long the ``COPY`` took."""

    users: int
    posts: int
    seconds: float

    @property
    def rows(self) -> int:
        return self.users + self.posts

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else float("inf")


def _rows(users: int, posts_per_user: int, seed: int) -> tuple[list[tuple], list[tuple]]:
    rng = random.Random(seed)
    user_rows = [
        (uid, f"{rng.choice(_FIRST)} {rng.choice(_LAST)}", f"user{uid}@example.com")
        for uid in range(1, users + 1)
    ]
    owners = [uid for uid in range(1, users + 1) for _ in range(posts_per_user)]
    rng.shuffle(owners)
    post_rows = [
        (pid, owner, f"{rng.choice(_TOPICS)} notes #{pid}", rng.randrange(0, 500))
        for pid, owner in enumerate(owners, start=1)
    ]
    return user_rows, post_rows


def _check_engine(engine: object) -> None:
    if not isinstance(engine, Engine):
        raise TypeError(f"engine must be a SQLAlchemy Engine, got {type(engine).__name__}")


def populate(engine: Engine, *, users: int, posts_per_user: int, seed: int) -> Populated:
    """Create the tables on ``engine`` (if missing) and fill them: ``users`` users with
    ``posts_per_user`` posts each, generated from ``seed``. Raises ``ValueError`` if the
    tables already hold rows, ``TypeError``/``ValueError`` for bad arguments."""
    _check_engine(engine)
    positive_int("users", users)
    non_negative_int("posts_per_user", posts_per_user)
    integer("seed", seed)
    Base.metadata.create_all(engine)
    with engine.connect() as conn:
        if conn.execute(select(func.count()).select_from(User)).scalar_one():
            raise ValueError("populate: table users is not empty; use a fresh schema")
    user_rows, post_rows = _rows(users, posts_per_user, seed)
    raw = engine.raw_connection()
    try:
        start = time.perf_counter()
        with raw.driver_connection.cursor() as cur:  # type: ignore[union-attr]
            with cur.copy("COPY users (id, name, email) FROM STDIN") as copy:
                for row in user_rows:
                    copy.write_row(row)
            with cur.copy("COPY posts (id, user_id, title, likes) FROM STDIN") as copy:
                for row in post_rows:
                    copy.write_row(row)
        raw.commit()
        seconds = time.perf_counter() - start
    finally:
        raw.close()
    with engine.begin() as conn:
        # COPY with explicit ids leaves the sequences at 1: move them past the copied ids.
        for table in ("users", "posts"):
            conn.execute(
                text("SELECT setval(pg_get_serial_sequence(:t, 'id'), :n, true)"),
                {"t": table, "n": max(1, len(user_rows) if table == "users" else len(post_rows))},
            )
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("ANALYZE users"))
        conn.execute(text("ANALYZE posts"))
    return Populated(len(user_rows), len(post_rows), seconds)


def add_post_user_index(engine: Engine) -> None:
    """Index ``posts.user_id`` (the foreign key) and refresh the planner's statistics."""
    _check_engine(engine)
    # Plain DDL: an ``Index(name, Post.user_id)`` would attach itself to the shared ``Post``
    # table, and every later ``populate()`` in the process would create the index too.
    name = engine.dialect.identifier_preparer.quote(POST_USER_INDEX)
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text(f"CREATE INDEX IF NOT EXISTS {name} ON posts (user_id)"))
        conn.execute(text("ANALYZE posts"))
