"""The sans-I/O cores of the caching patterns, driven by a sync shell
(:mod:`course_lib.caching`) or an asyncio shell (:mod:`course_lib.caching.aio`). Nothing here
talks to Redis.

- :mod:`.cache_aside` and :mod:`.lock`: each algorithm as a generator of steps
  (:mod:`.steps`), one step per round trip.
- :mod:`.write_through` and :mod:`.write_behind`: key names, entry encoding, a batch's
  grouping and settle decision, as plain functions and records the shells call.
"""
