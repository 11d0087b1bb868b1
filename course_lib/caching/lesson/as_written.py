"""The seed module's caching code ("05 - Performance e Concorrência", Caching Strategies),
as written, adapted only so it runs.

What had to change, and nothing else:

- The seed uses globals ``cache``, ``db``, ``User``, ``task_queue`` and ``fetch_from_db``
  without defining them; :func:`bind` sets them. ``db`` is a ``scoped_session`` (one session
  per thread), because the seed's single global session would not survive concurrent callers.
- The seed defines ``update_user`` twice (write-through, then write-behind); here they are
  :func:`update_user` and :func:`update_user_write_behind`. It calls ``update_db`` without
  defining it; :func:`update_db` applies the update as the write-through does.
- ``task_queue.enqueue(update_db, user_id, data)`` is the API of RQ, a Redis-backed job queue:
  :func:`bind` takes an ``rq.Queue`` (the course builds it with RQ's JSON serializer, never
  pickle, see :mod:`.rq_write_behind`), and real ``rq worker`` processes run the jobs. RQ
  imports a job's function by its dotted path in the worker process, which has none of the
  notebook's globals: when the environment variable :data:`SCHEMA_ENV` names a schema, this
  module binds ``db`` to that schema of the course database as it is imported, so
  ``update_db`` runs unchanged in the worker.
- ``db.delete(user_id)`` raises (``Session.delete`` wants an object, not an id), and the
  seed never commits: :func:`delete_user_as_written` is the seed's function exactly, to show
  that; :func:`delete_user` deletes the object with that id and commits, the smallest
  change that makes it do what it says.
- The Redis key prefix ``user`` is :data:`PREFIX`, so a test or a notebook run can isolate
  its keys. :func:`bound` binds for a ``with`` block and then restores the previous binding.

The bugs are kept on purpose: the notebook runs each function to show where it breaks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import warnings
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import redis
import rq
from sqlalchemy import Engine
from sqlalchemy.exc import LegacyAPIWarning
from sqlalchemy.orm import scoped_session, sessionmaker

import course_lib.services as services

from .users import User

__all__ = [
    "SCHEMA_ENV",
    "bind",
    "bound",
    "delete_user",
    "delete_user_as_written",
    "fetch_from_db",
    "get_user",
    "get_with_lock",
    "locks",
    "update_db",
    "update_user",
    "update_user_write_behind",
]

# Query.get() is legacy in SQLAlchemy 2 (Session.get replaces it); it still works.
warnings.filterwarnings("ignore", category=LegacyAPIWarning, module=__name__)

PREFIX = "user"
#: In a worker process: the schema of the course database that ``update_db`` writes to.
SCHEMA_ENV = "COURSE_AS_WRITTEN_SCHEMA"
cache: redis.Redis
db: Any
task_queue: rq.Queue
_fetch: Callable[[Any], Awaitable[Any]]


def bind(
    redis_client: redis.Redis,
    engine: Engine,
    *,
    fetch: Callable[[Any], Awaitable[Any]] | None = None,
    prefix: str | None = None,
    queue: rq.Queue | None = None,
) -> None:
    """Give the seed's globals real objects: Redis, a session per thread, an RQ queue.

    ``fetch``, ``prefix`` and ``queue`` (the seed's ``task_queue``) keep their current values
    unless given.
    """
    global cache, db, task_queue, _fetch, PREFIX
    if "db" in globals():
        db.remove()
    cache = redis_client
    db = scoped_session(sessionmaker(bind=engine))
    if queue is not None:
        task_queue = queue
    if prefix is not None:
        PREFIX = prefix
    if fetch is not None:
        _fetch = fetch


@contextlib.contextmanager
def bound(
    redis_client: redis.Redis,
    engine: Engine,
    *,
    fetch: Callable[[Any], Awaitable[Any]] | None = None,
    prefix: str | None = None,
    queue: rq.Queue | None = None,
) -> Iterator[None]:
    """:func:`bind` for a ``with`` block; the previous binding is restored afterwards."""
    global cache, db, _fetch, PREFIX
    names = ("cache", "db", "_fetch", "task_queue")
    saved = {name: globals()[name] for name in names if name in globals()}
    saved_prefix = PREFIX
    bind(redis_client, engine, fetch=fetch, prefix=prefix, queue=queue)
    try:
        yield
    finally:
        db.remove()
        globals().update(saved)
        PREFIX = saved_prefix


if os.environ.get(SCHEMA_ENV):
    # An `rq worker` process importing update_db: bind to the schema its starter named.
    bind(services.redis_client(), services.schema_engine(os.environ[SCHEMA_ENV]))


# --- Cache-Aside (Lazy Loading) ----------------------------------------------------------
def get_user(user_id):
    # 1. Tenta cache
    cached = cache.get(f"{PREFIX}:{user_id}")
    if cached:
        return json.loads(cached)

    # 2. Cache miss: busca DB
    user = db.query(User).get(user_id)

    # 3. Salva no cache
    cache.setex(f"{PREFIX}:{user_id}", 3600, json.dumps(user))

    return user


# --- Write-Through -----------------------------------------------------------------------
def update_user(user_id, data):
    # 1. Atualiza DB
    db.query(User).filter_by(id=user_id).update(data)
    db.commit()

    # 2. Atualiza cache
    cache.setex(f"{PREFIX}:{user_id}", 3600, json.dumps(data))


# --- Write-Behind (Write-Back) -----------------------------------------------------------
def update_user_write_behind(user_id, data):
    # 1. Atualiza cache primeiro (rápido!)
    cache.setex(f"{PREFIX}:{user_id}", 3600, json.dumps(data))

    # 2. Queue para atualizar DB depois
    task_queue.enqueue(update_db, user_id, data)


def update_db(user_id, data):
    db.query(User).filter_by(id=user_id).update(data)
    db.commit()


# --- Cache Invalidation ------------------------------------------------------------------
def delete_user_as_written(user_id):
    db.delete(user_id)
    cache.delete(f"{PREFIX}:{user_id}")  # Invalida cache


def delete_user(user_id):
    db.delete(db.get(User, user_id))
    db.commit()
    cache.delete(f"{PREFIX}:{user_id}")  # Invalida cache


# Cache stampede prevention
locks = {}


async def fetch_from_db(key):
    return await _fetch(key)


async def get_with_lock(key):
    if key in locks:
        # Espera o primeiro terminar
        await locks[key].wait()
        return cache.get(key)

    # Primeiro a pegar
    locks[key] = asyncio.Event()

    value = await fetch_from_db(key)
    cache.set(key, value)

    locks[key].set()  # Libera waiters
    del locks[key]

    return value
