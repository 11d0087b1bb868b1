"""Caching patterns on Redis and PostgreSQL, as the caching notebook (01) teaches them.

- :class:`CacheAside` / :class:`AsyncCacheAside`: lazy loading with negative caching,
  stampede protection (single-flight, Redis lock, XFetch) and race-free invalidation.
- :class:`WriteThrough`: database first, then the committed row, never going backwards.
- :class:`WriteBehind`: cache first, database later through a Redis Stream worker that
  survives crashes; one class per part (:class:`WriteBehindProducer`,
  :class:`WriteBehindConsumer`, :class:`WriteBehindMonitor`, :class:`WorkerProcess`).
- :mod:`.aio`: the asyncio shells of the same patterns.
- :class:`SingleFlight`, :class:`RedisLock`: the building blocks, usable on their own.
- :class:`UserStore` and :func:`seed_users`: the ``users`` table the notebook works on.

Everything read from Redis is JSON; nothing is ever unpickled.

:mod:`.lesson` holds what stages notebook 01 (the module's code as written, demos, staged
races); it is not meant to be copied into a service.
"""

from .cache_aside import STAMPEDE_MODES, AsyncCacheAside, CacheAside, LoaderError, Ticket
from .redis_lock import AsyncRedisLock, LockNotAcquired, LockNotOwned, RedisLock
from .serialization import dumps, loads, to_jsonable
from .single_flight import AsyncSingleFlight, SingleFlight
from .store import Store, UserStore
from .users import User, seed_users
from .write_behind import (
    BatchResult,
    NotReplicated,
    WorkerProcess,
    WriteBehind,
    WriteBehindConsumer,
    WriteBehindMonitor,
    WriteBehindProducer,
)
from .write_through import WriteThrough

__all__ = [
    "STAMPEDE_MODES",
    "AsyncCacheAside",
    "AsyncRedisLock",
    "AsyncSingleFlight",
    "BatchResult",
    "CacheAside",
    "LoaderError",
    "LockNotAcquired",
    "LockNotOwned",
    "NotReplicated",
    "RedisLock",
    "SingleFlight",
    "Store",
    "Ticket",
    "User",
    "UserStore",
    "WorkerProcess",
    "WriteBehind",
    "WriteBehindConsumer",
    "WriteBehindMonitor",
    "WriteBehindProducer",
    "WriteThrough",
    "dumps",
    "loads",
    "seed_users",
    "to_jsonable",
]
