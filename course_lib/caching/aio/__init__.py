"""The asyncio shells of the caching patterns: the same sans-I/O cores as the sync classes
of :mod:`course_lib.caching`, with ``redis.asyncio`` clients and ``async`` methods.
"""

# Write paths.
from .write_behind import AsyncWriteBehindProducer
from .write_through import AsyncWriteThrough

__all__ = ["AsyncWriteBehindProducer", "AsyncWriteThrough"]
