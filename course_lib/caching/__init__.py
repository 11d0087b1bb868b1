"""Caching patterns on Redis, as the caching notebook (01) teaches them.

- :class:`CacheAside` / :class:`AsyncCacheAside`: lazy loading with negative caching,
  stampede protection (single-flight, Redis lock, XFetch) and race-free invalidation.
- :class:`WriteThrough`: database first, then the committed row, never going backwards.
- :class:`WriteBehind`: cache first, database later through a Redis Stream worker that
  survives crashes; one class per part (:class:`WriteBehindProducer`,
  :class:`WriteBehindConsumer`, :class:`WriteBehindMonitor`, :class:`WorkerProcess`).
- :mod:`.aio`: the asyncio shells of the same patterns.
- :class:`SingleFlight`, :class:`RedisLock`: the building blocks, usable on their own.
- :class:`Store`: what the write caches need from the database.

Everything read from Redis is JSON; nothing is ever unpickled.

Shape: each Redis pattern is a sans-I/O core (:mod:`.core`: key names, payloads, the decision
taken from each reply, as generators of steps) driven by a thin sync shell (this package) and
a thin asyncio shell (:mod:`.aio`). :mod:`.lesson` holds what stages notebook 01 (the
module's code as written, demos, staged races, the ``users`` table and its
:class:`~.lesson.users.UserStore`); it is not meant to be copied into a service.
"""

from .aio import AsyncCacheAside, AsyncRedisLock, AsyncWriteBehindProducer, AsyncWriteThrough
from .cache_aside import STAMPEDE_MODES, CacheAside, LoaderError, Ticket
from .core.cache_aside import LocalFlight, NoProtection, RedisMutex, Stampede, XFetch
from .redis_lock import LockNotAcquired, LockNotOwned, RedisLock
from .serialization import dumps, loads, to_jsonable
from .single_flight import AsyncSingleFlight, SingleFlight
from .store import Store
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
    "AsyncWriteBehindProducer",
    "AsyncWriteThrough",
    "BatchResult",
    "CacheAside",
    "LoaderError",
    "LocalFlight",
    "LockNotAcquired",
    "LockNotOwned",
    "NoProtection",
    "NotReplicated",
    "RedisLock",
    "RedisMutex",
    "SingleFlight",
    "Stampede",
    "Store",
    "Ticket",
    "WorkerProcess",
    "WriteBehind",
    "WriteBehindConsumer",
    "WriteBehindMonitor",
    "WriteBehindProducer",
    "WriteThrough",
    "XFetch",
    "dumps",
    "loads",
    "to_jsonable",
]
