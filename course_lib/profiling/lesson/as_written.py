"""The module's APM snippet as written, adapted only so it runs.

The module decorates a task with New Relic's ``@newrelic.agent.background_task()``. The
course has no New Relic account, so :func:`processar_task` uses
:func:`course_lib.profiling.traced`, OpenTelemetry's equivalent (a span per call, exported
wherever the process's tracer provider sends them). The module's cProfile snippet
(``cProfile.run('minha_funcao()', 'stats.prof')``) runs verbatim in notebook 05, whose
namespace is the ``__main__`` that ``cProfile.run`` evaluates in.
"""

from __future__ import annotations

from course_lib.profiling import traced

__all__ = ["processar_task"]


@traced()  # the module: @newrelic.agent.background_task()
def processar_task(items: list[int]) -> int:
    """A background task: the module's ``processar_task`` with a body that does something."""
    return sum(x * x for x in items)
