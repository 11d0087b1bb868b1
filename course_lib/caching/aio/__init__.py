"""The asyncio shells of the caching patterns, beside their sync twins (as redis-py's
``redis.asyncio`` and limits' ``aio`` do): same cores, same guarantees, ``await``-ed I/O."""

from .cache_aside import AsyncCacheAside
from .redis_lock import AsyncRedisLock
from .write_behind import AsyncWriteBehindProducer
from .write_through import AsyncWriteThrough

__all__ = ["AsyncCacheAside", "AsyncRedisLock", "AsyncWriteBehindProducer", "AsyncWriteThrough"]
