"""Profiling and APM: find where a request spends its time and memory.

- :func:`profile_call` -> :class:`ProfileResult`: one call under cProfile, its ``pstats`` as
  a DataFrame (``.stats``: calls, own and cumulative time per function; ``.top(n)``).
- :func:`overhead`: what cProfile, pyinstrument, tracemalloc (or any profiler you pass) add
  to a function, as ratios to the unprofiled run measured in the same interleaved rounds.
- :func:`allocation_diff`: the allocation sites that grew between two ``tracemalloc``
  snapshots (a leak's address).
- :func:`traced`: a span per call (OpenTelemetry's ``newrelic.agent.background_task()``).
- :func:`tracing`: OpenTelemetry SDK with an in-memory exporter, installed once per process;
  redis-py and SQLAlchemy instrumented for the block; yields the live list of finished spans.
- :func:`span_table`, :func:`waterfall`: one request's spans as a table and a chart.

:mod:`.lesson` holds what stages notebook 05 (the module's snippets as written, the small
service whose request is profiled, the leak); it is not meant to be copied into a service.
"""

from .apm import traced, tracing
from .calls import ProfileResult, profile_call, stats_frame
from .memory import allocation_diff
from .overhead import BUILTIN_PROFILERS, UNPROFILED, builtin_profiler, overhead
from .waterfall import span_table, waterfall

__all__ = [
    "BUILTIN_PROFILERS",
    "UNPROFILED",
    "ProfileResult",
    "allocation_diff",
    "builtin_profiler",
    "overhead",
    "profile_call",
    "span_table",
    "stats_frame",
    "traced",
    "tracing",
    "waterfall",
]
