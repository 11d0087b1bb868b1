"""Companion package of perf-course: one module or subpackage per notebook.

- ``services``: where Redis and PostgreSQL come from (environment, local server, embedded).
- ``measure`` and ``charts``: timing harnesses and the course's plotting style.
- ``exercises``: self-checking exercises for the end of each notebook.
- one subpackage per topic (``caching``, ``rate_limiting``, ...).
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
