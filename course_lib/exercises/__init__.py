"""Self-checking exercises: the student writes a function, a checker runs it for real.

Each ``check_<name>(student_fn)`` runs the function against the course's real services,
prints one ``PASS``/``FAIL`` line with the reason (counts, not just a verdict) and returns a
:class:`CheckResult`, truthy on success, so solution notebooks can ``assert`` it.
One module per notebook: ``setup`` (00), ``caching`` (01), ``rate_limiting`` (03),
``profiling`` (05).
"""

from .result import CheckResult

__all__ = ["CheckResult"]
