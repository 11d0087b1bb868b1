"""The seed module's caching code ("05 - Performance e Concorrência", Caching Strategies),
as written, adapted only so it runs.

What had to change, and nothing else:

- The seed uses globals ``cache``, ``db``, ``User``, ``task_queue`` and ``fetch_from_db``
  without defining them; :func:`bind` sets them. ``db`` is a ``scoped_session`` (one session
  per thread), because the seed's single global session would not survive concurrent callers.
- The seed defines ``update_user`` twice (write-through, then write-behind); here they are
  :func:`update_user` and :func:`update_user_write_behind`. It calls ``update_db`` without
  defining it; :func:`update_db` applies the update as the write-through does.
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
import queue
import threading
import warnings
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import redis
from sqlalchemy import Engine
from sqlalchemy.exc import LegacyAPIWarning
from sqlalchemy.orm import scoped_session, sessionmaker

from ..users import User

__all__ = [
    "TaskQueue",
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
cache: redis.Redis
db: Any
task_queue: TaskQueue
_fetch: Callable[[Any], Awaitable[Any]]


class TaskQueue:
    """The seed's ``task_queue``: an in-process queue drained by one background thread.

    :meth:`stop` ends the thread once the tasks queued before it ran.
    """

    def __init__(self) -> None:
        self._queue: queue.Queue[tuple[Callable[..., Any], tuple[Any, ...]] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._drain, daemon=True, name="task_queue")
        self._thread.start()

    def enqueue(self, fn: Callable[..., Any], *args: Any) -> None:
        self._queue.put((fn, args))

    def pending(self) -> int:
        return self._queue.unfinished_tasks

    def join(self) -> None:
        self._queue.join()

    def is_alive(self) -> bool:
        """``False`` after :meth:`stop`, and in a forked child (threads do not survive fork)."""
        return self._thread.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout)

    def _drain(self) -> None:
        while (task := self._queue.get()) is not None:
            fn, args = task
            try:
                fn(*args)
            finally:
                self._queue.task_done()
        self._queue.task_done()


def bind(
    redis_client: redis.Redis,
    engine: Engine,
    *,
    fetch: Callable[[Any], Awaitable[Any]] | None = None,
    prefix: str | None = None,
) -> None:
    """Give the seed's globals real objects: Redis, a session per thread, a task queue.

    The task queue's thread is started once per process and reused; ``fetch`` and ``prefix``
    keep their current values unless given.
    """
    global cache, db, task_queue, _fetch, PREFIX
    if "db" in globals():
        db.remove()
    cache = redis_client
    db = scoped_session(sessionmaker(bind=engine))
    if "task_queue" not in globals() or not task_queue.is_alive():
        task_queue = TaskQueue()
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
) -> Iterator[None]:
    """:func:`bind` for a ``with`` block; the previous binding is restored afterwards."""
    global cache, db, _fetch, PREFIX
    saved = {name: globals()[name] for name in ("cache", "db", "_fetch") if name in globals()}
    saved_prefix = PREFIX
    bind(redis_client, engine, fetch=fetch, prefix=prefix)
    try:
        yield
    finally:
        db.remove()
        globals().update(saved)
        PREFIX = saved_prefix


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
