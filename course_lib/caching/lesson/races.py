"""Races made deterministic: two actors' steps run one after another in a chosen order.

A race needs an unlucky interleaving; scripting the interleaving step by step makes it
happen every time, so the notebook can show it and a test can prove the fix. Each scenario
runs the seed's lines (or ``course_lib``'s calls) in the order a race produces, against the
real Redis and PostgreSQL, and returns a :class:`RaceOutcome`: the trace, what the database
holds and what the cache holds.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from ..cache_aside import CacheAside
from ..write_through import WriteThrough
from .users import User, UserStore

__all__ = [
    "RaceOutcome",
    "invalidation_race_course_lib",
    "invalidation_race_seed",
    "write_through_race_course_lib",
    "write_through_race_seed",
]


def _brief(value: Any, field_name: str) -> str:
    if value is None:
        return "None"
    if isinstance(value, dict):
        parts = [f"{field_name}={value.get(field_name)!r}"]
        if "version" in value:
            parts.append(f"version={value['version']}")
        return "{" + ", ".join(parts) + "}"
    return repr(value)


@dataclass
class RaceOutcome:
    """The trace of a scripted race and where it left the data."""

    field: str
    steps: list[tuple[str, str, str]] = field(default_factory=list)
    database: Any = None
    cache: Any = None

    def step(self, actor: str, action: str, fn: Callable[[], Any]) -> Any:
        result = fn()
        self.steps.append((actor, action, _brief(result, self.field)))
        return result

    @property
    def stale(self) -> bool:
        """The cache holds a value of ``field`` the database no longer has."""
        if self.cache is None:
            return False
        return self.cache.get(self.field) != self.database.get(self.field)

    def __str__(self) -> str:
        width = max(len(action) for _, action, _ in self.steps)
        lines = [
            f"{n:>2}. {actor:<7} {action:<{width}}  -> {result}"
            for n, (actor, action, result) in enumerate(self.steps, 1)
        ]
        lines.append(
            f"database: {_brief(self.database, self.field)}   "
            f"cache: {_brief(self.cache, self.field)}   stale: {self.stale}"
        )
        return "\n".join(lines)


def _db_row(engine: Engine, user_id: int) -> dict[str, Any] | None:
    return UserStore(engine).load(user_id)


def write_through_race_seed(
    redis: Any, engine: Engine, user_id: int, *, prefix: str = "user"
) -> RaceOutcome:
    """Two writers run the seed's ``update_user``; their DB and cache steps cross."""
    key = f"{prefix}:{user_id}"
    out = RaceOutcome("plan")
    with Session(engine) as w1, Session(engine) as w2:

        def update(db: Session, plan: str) -> int:
            count = db.query(User).filter_by(id=user_id).update({"plan": plan})
            db.commit()
            return count

        out.step("writer1", "UPDATE users SET plan='pro'; COMMIT", lambda: update(w1, "pro"))
        out.step("writer2", "UPDATE users SET plan='team'; COMMIT", lambda: update(w2, "team"))
        out.step(
            "writer2",
            f"SETEX {key} 3600 {{'plan': 'team'}}",
            lambda: redis.set(key, json.dumps({"plan": "team"}), ex=3600),
        )
        out.step(
            "writer1",
            f"SETEX {key} 3600 {{'plan': 'pro'}}",
            lambda: redis.set(key, json.dumps({"plan": "pro"}), ex=3600),
        )
    out.database = _db_row(engine, user_id)
    raw = redis.get(key)
    out.cache = json.loads(raw) if raw else None
    return out


def write_through_race_course_lib(wt: WriteThrough, user_id: int) -> RaceOutcome:
    """The same crossing with :class:`WriteThrough`: versioned rows, the older one refused."""
    out = RaceOutcome("plan")
    row1 = out.step(
        "writer1", "store.save(plan='pro')", lambda: wt.store.save(user_id, {"plan": "pro"})
    )
    row2 = out.step(
        "writer2", "store.save(plan='team')", lambda: wt.store.save(user_id, {"plan": "team"})
    )
    out.step("writer2", f"publish(row v{row2['version']})", lambda: wt.publish(user_id, row2))
    out.step("writer1", f"publish(row v{row1['version']})", lambda: wt.publish(user_id, row1))
    out.database = wt.store.load(user_id)
    raw = wt.redis.get(wt.key(user_id))
    out.cache = json.loads(raw) if raw else None
    return out


def invalidation_race_seed(
    redis: Any, engine: Engine, user_id: int, *, prefix: str = "user"
) -> RaceOutcome:
    """A reader runs the seed's ``get_user`` while a writer updates and deletes the key."""
    key = f"{prefix}:{user_id}"
    store = UserStore(engine)
    out = RaceOutcome("plan")
    out.step("reader", f"GET {key}", lambda: redis.get(key))
    row = out.step("reader", "SELECT * FROM users WHERE id=...", lambda: store.load(user_id))
    out.step(
        "writer",
        "UPDATE users SET plan='enterprise'; COMMIT",
        lambda: store.save(user_id, {"plan": "enterprise"}),
    )
    out.step("writer", f"DEL {key}", lambda: redis.delete(key))
    out.step(
        "reader",
        f"SETEX {key} 3600 <row read in step 2>",
        lambda: redis.set(key, json.dumps(row), ex=3600),
    )
    out.database = store.load(user_id)
    raw = redis.get(key)
    out.cache = json.loads(raw) if raw else None
    return out


def invalidation_race_course_lib(cache: CacheAside, store: UserStore, user_id: int) -> RaceOutcome:
    """The same crossing with :class:`CacheAside`: the fill from before the write is refused."""
    out = RaceOutcome("plan")
    out.step("reader", f"GET {cache.key(user_id)}", lambda: cache.redis.get(cache.key(user_id)))
    ticket = out.step("reader", "reserve (note server time)", lambda: cache.reserve(user_id))
    row = out.step("reader", "loader: SELECT ... WHERE id=...", lambda: store.load(user_id))
    out.step(
        "writer",
        "store.save(plan='enterprise')",
        lambda: store.save(user_id, {"plan": "enterprise"}),
    )
    out.step("writer", "invalidate (record time, DEL)", lambda: cache.invalidate(user_id))
    out.step("reader", "fill(ticket, row from step 3)", lambda: cache.fill(ticket, row))
    out.database = store.load(user_id)
    out.cache = out.step("reader", "get (next call)", lambda: cache.get(user_id))
    return out
