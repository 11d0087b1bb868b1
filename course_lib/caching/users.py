"""The ``users`` table the caching notebook reads and writes, and its deterministic seeding.

``seed_users(engine, n, seed)`` drops and recreates the table in the engine's schema
(``search_path``) and inserts ``n`` rows generated from ``random.Random(seed)``: the same
seed always gives the same rows. ``version`` starts at 0 and is what write-through and
write-behind compare to keep caches and the database from going backwards.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from sqlalchemy import BigInteger, Engine, Integer, MetaData, Table, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = [
    "COLUMNS",
    "User",
    "seed_users",
    "users_table",
]

COLUMNS = ("id", "name", "email", "plan", "score", "version")
PLANS = ("free", "pro", "team", "enterprise")
_FIRST = ("Ana", "Bruno", "Carla", "Diego", "Elisa", "Fabio", "Gabi", "Hugo", "Iris", "Joao")
_LAST = ("Silva", "Souza", "Costa", "Lima", "Rocha", "Alves", "Pereira", "Gomes")


class Base(DeclarativeBase):
    pass


class User(Base):
    """ORM mapping of ``users`` (the seed's ``User``)."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    name: Mapped[str] = mapped_column(Text, server_default="")
    email: Mapped[str] = mapped_column(Text, server_default="")
    plan: Mapped[str] = mapped_column(Text, server_default="free")
    score: Mapped[int] = mapped_column(Integer, server_default="0")
    version: Mapped[int] = mapped_column(BigInteger, server_default="0")

    def __repr__(self) -> str:
        return f"User(id={self.id}, name={self.name!r}, version={self.version})"


users_table: Table = User.__table__  # type: ignore[assignment]


def _rows(n: int, seed: int) -> Iterator[dict[str, object]]:
    rng = random.Random(seed)
    for user_id in range(1, n + 1):
        first, last = rng.choice(_FIRST), rng.choice(_LAST)
        yield {
            "id": user_id,
            "name": f"{first} {last}",
            "email": f"{first.lower()}.{last.lower()}{user_id}@example.com",
            "plan": rng.choice(PLANS),
            "score": rng.randrange(1000),
            "version": 0,
        }


def seed_users(engine: Engine, n: int = 5000, *, seed: int = 42) -> int:
    """Recreate ``users`` in the engine's schema with ``n`` deterministic rows; return ``n``."""
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    metadata = MetaData()
    table = users_table.to_metadata(metadata)
    with engine.begin() as conn:
        table.drop(conn, checkfirst=True)
        table.create(conn)
        conn.execute(table.insert(), list(_rows(n, seed)))
    return n
