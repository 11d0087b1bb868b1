"""The sans-I/O cores of the caching patterns: each algorithm as a generator of steps
(:mod:`.steps`), driven by a sync shell (:mod:`course_lib.caching`) or an asyncio shell
(:mod:`course_lib.caching.aio`). Nothing here talks to Redis."""
