"""The module's profiling snippets as written, adapted only so they run.

The module profiles ``minha_funcao`` with ``cProfile.run(...)`` into ``stats.prof`` and prints
the top 10 by cumulative time; its APM example decorates a task with New Relic's
``@newrelic.agent.background_task()``. The course has no New Relic account, so
:func:`processar_task` uses :func:`course_lib.profiling.traced`, OpenTelemetry's equivalent
(a span per call, exported wherever the process's tracer provider sends them).
"""

from __future__ import annotations

import cProfile
import io
import pstats
from collections.abc import Callable
from pathlib import Path

from course_lib.profiling import traced

__all__ = ["processar_task", "profile_as_written"]


def profile_as_written(minha_funcao: Callable[[], object], path: Path) -> str:
    """The module's snippet, run on ``minha_funcao``: ``cProfile.run`` into ``path``, then
    ``pstats`` sorted by cumulative time, top 10; returns what ``print_stats`` printed."""
    # cProfile.run evaluates its string in __main__'s namespace; runctx is the same call
    # with the namespace given explicitly, so it works from a module
    cProfile.runctx("minha_funcao()", {}, {"minha_funcao": minha_funcao}, str(path))
    out = io.StringIO()
    p = pstats.Stats(str(path), stream=out)
    p.sort_stats("cumulative").print_stats(10)
    return out.getvalue()


@traced()  # the module: @newrelic.agent.background_task()
def processar_task(items: list[int]) -> int:
    """A background task: the module's ``processar_task`` with a body that does something."""
    return sum(x * x for x in items)
