"""The seed module's "Database Optimization" snippets, as written.

Kept faithful on purpose so the notebook can run them and show what they do: the legacy
``session.query(...)`` API (``Query.get`` warns since SQLAlchemy 2.0) and, in
``update_user``, a ``user.update(data)`` that mapped classes do not have. The adaptations,
only so they run: the URLs and engines the module takes from globals are parameters, the
models are :mod:`course_lib.db.models`, and the N+1 loop's ``print`` is a parameter (the
notebook counts instead of printing a thousand lists).
"""

from sqlalchemy import create_engine, func
from sqlalchemy.orm import Session, selectinload

from course_lib.db.models import Post, User

__all__ = [
    "aggregate",
    "eager_loading",
    "get_user",
    "make_engine",
    "n_plus_one",
    "update_user",
]


def make_engine(url):
    # "postgresql://user:pass@localhost/db" in the module
    engine = create_engine(
        url,
        pool_size=20,  # Pool fixo
        max_overflow=10,  # +10 em pico
        pool_timeout=30,  # Timeout
        pool_pre_ping=True,  # Testa conexão antes
    )
    return engine


def n_plus_one(session, print=print):
    # ❌ N+1 queries
    users = session.query(User).all()
    for user in users:
        print(user.posts)  # Query por user!


def eager_loading(session, print=print):
    # ✅ Eager loading
    users = session.query(User).options(selectinload(User.posts)).all()
    for user in users:
        print(user.posts)


def aggregate(session):
    # ✅ Aggregate
    counts = session.query(User.id, func.count(Post.id)).outerjoin(Post).group_by(User.id).all()
    return counts


def get_user(user_id, engine_replica):
    # Read from replica
    with Session(engine_replica) as session:
        return session.query(User).get(user_id)


def update_user(user_id, data, engine_master):
    # Write to master
    with Session(engine_master) as session:
        user = session.query(User).get(user_id)
        user.update(data)
        session.commit()
