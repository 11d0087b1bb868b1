"""Profiling and APM: find where a request spends its time and memory.

- :func:`profile_call` -> :class:`ProfileResult`: one call under cProfile, its ``pstats`` as
  a DataFrame (``.stats``: calls, own and cumulative time per function; ``.top(n)``);
  :func:`profile_fastest`: the least disturbed of several such runs.
- :func:`overhead`: what cProfile, pyinstrument, tracemalloc (or any profiler you pass) add
  to a function, as ratios to the unprofiled run measured in the same interleaved rounds,
  with their range over the rounds; :func:`noise_verdict` says whether that range can tell a
  cost from the machine's noise.
- :func:`allocation_diff`: the allocation sites that grew between two ``tracemalloc``
  snapshots (a leak's address).
- :func:`traced`: a span per call (OpenTelemetry's ``newrelic.agent.background_task()``).
- :func:`tracing`: OpenTelemetry SDK with an in-memory exporter, installed once per process;
  redis-py and SQLAlchemy instrumented for the block; yields the live list of finished spans.
- :func:`span_table`, :func:`waterfall`: one request's spans as a table and a chart.

The profilers refuse what would make their numbers silently wrong (:mod:`.guards`): an
``async`` function or one returning a coroutine or a generator (``TypeError``), and running
inside another profiler (``RuntimeError``).

:mod:`.lesson` holds what stages notebook 05 (the module's snippets as written, the small
service whose request is profiled, the leak); it is not meant to be copied into a service.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "BUILTIN_PROFILERS",
    "UNPROFILED",
    "ProfileResult",
    "allocation_diff",
    "builtin_profiler",
    "noise_verdict",
    "overhead",
    "profile_call",
    "profile_fastest",
    "span_table",
    "stats_frame",
    "traced",
    "tracing",
    "waterfall",
]

# Imported on first use (PEP 562): a service that only wants ``traced`` (and the process
# py-spy records) should not pay for pandas and matplotlib at start-up.
_HOME = {
    "BUILTIN_PROFILERS": "costs",
    "UNPROFILED": "costs",
    "ProfileResult": "calls",
    "allocation_diff": "memory",
    "builtin_profiler": "costs",
    "noise_verdict": "costs",
    "overhead": "costs",
    "profile_call": "calls",
    "profile_fastest": "calls",
    "span_table": "spans",
    "stats_frame": "calls",
    "traced": "apm",
    "tracing": "apm",
    "waterfall": "spans",
}


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
