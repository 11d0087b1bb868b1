"""The course's one model of ``users`` and ``posts`` (course_lib.models): notebook 01's caches
and notebook 04's queries map the same table, each side's inserts fill the other side's
columns with their defaults, and neither topic imports the other to get it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from sqlalchemy import Engine, inspect, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from course_lib import db, models
from course_lib.caching.lesson import users


# The first two tests use no server: one pass of `make test` covers them.
@pytest.mark.one_pass
def test_both_topics_map_users_with_the_one_model() -> None:
    assert db.User is users.User is models.User
    assert db.Post is models.Post and db.Base is models.Base
    assert users.users_table is models.User.__table__
    assert users.COLUMNS == ("id", "name", "email", "plan", "score", "version")


@pytest.mark.one_pass
@pytest.mark.parametrize(
    ("module", "other_topic"),
    [("course_lib.caching.lesson.users", "course_lib.db"), ("course_lib.db", "course_lib.caching")],
)
def test_neither_topic_imports_the_other_for_it(module: str, other_topic: str) -> None:
    code = f"import json, sys, {module}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    loaded = json.loads(out)
    assert "course_lib.models" in loaded
    assert not [m for m in loaded if m == other_topic or m.startswith(f"{other_topic}.")]


def test_one_schema_has_one_users_table_with_every_column(pg_engine: Engine) -> None:
    db.populate(pg_engine, users=5, posts_per_user=2, seed=7)
    columns = [c["name"] for c in inspect(pg_engine).get_columns("users")]
    assert columns == list(users.COLUMNS)


def test_users_populated_by_db_are_read_and_written_by_the_cache_store(pg_engine: Engine) -> None:
    db.populate(pg_engine, users=5, posts_per_user=2, seed=7)
    store = users.UserStore(pg_engine)
    row = store.load(3)
    assert row is not None and row["email"] == "user3@example.com"
    assert (row["plan"], row["score"], row["version"]) == ("free", 0, 0)  # the defaults
    saved = store.save(3, {"plan": "pro"})
    assert saved == {**row, "plan": "pro", "version": 1}
    with Session(pg_engine) as session:
        session.add(db.User(name="New", email="new@example.com"))  # the ORM names two columns
        session.commit()
        new = session.scalars(select(db.User).where(db.User.email == "new@example.com")).one()
        assert (new.id, new.plan, new.score, new.version) == (6, "free", 0, 0)
        assert [p.user_id for p in session.get(db.User, 3).posts] == [3, 3]  # type: ignore[union-attr]


def test_users_seeded_by_the_cache_side_take_posts_and_reseeding_drops_them(
    pg_engine: Engine,
) -> None:
    users.seed_users(pg_engine, 4, seed=1)
    with Session(pg_engine) as session:
        db.Base.metadata.create_all(session.connection())  # posts, beside the seeded users
        session.add(db.Post(user_id=2, title="cache notes", likes=1))
        session.commit()
        assert [p.title for p in session.get(db.User, 2).posts] == ["cache notes"]  # type: ignore[union-attr]
    assert users.seed_users(pg_engine, 4, seed=1) == 4  # posts reference users: no error
    assert set(inspect(pg_engine).get_table_names()) == {"users"}
    assert users.UserStore(pg_engine).load(2)["version"] == 0  # type: ignore[index]


def test_store_refuses_a_key_outside_the_id_column(pg_engine: Engine) -> None:
    users.seed_users(pg_engine, 2, seed=1)
    store = users.UserStore(pg_engine)
    with pytest.raises(ValueError, match=r"id must be in \[-2147483648, 2147483647\]"):
        store.load(2**40)
    with pytest.raises(ValueError, match="key must be a user id"):
        store.save("ana", {"plan": "pro"})


def test_deleting_a_user_never_reads_posts(pg_engine: Engine) -> None:
    users.seed_users(pg_engine, 3, seed=1)  # no posts table in this schema
    with Session(pg_engine) as session:
        session.delete(session.get(db.User, 1))
        session.commit()
        db.Base.metadata.create_all(session.connection())
        session.add(db.Post(user_id=2, title="kept", likes=0))
        session.commit()
        session.delete(session.get(db.User, 2))
        with pytest.raises(IntegrityError, match="posts_user_id_fkey"):
            session.commit()  # the foreign key refuses to orphan the post
    assert users.UserStore(pg_engine).load(1) is None
