"""The answer every limiter of the course gives: :class:`Decision`."""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["Decision"]


class Decision(NamedTuple):
    """One admission decision.

    - ``allowed``: whether the request may proceed; ``bool(decision)`` is the same.
    - ``remaining``: whole requests still admissible right now (after this one, if allowed).
    - ``retry_after``: seconds until a request of the same cost would be allowed; ``0.0`` when
      allowed.
    - ``reset_after``: seconds until the limiter is back to its full quota if nothing else
      arrives (``0.0`` when it already is).
    - ``degraded``: ``True`` when the store could not be reached and the limiter answered with
      its ``fail_open`` policy instead of counting.

    A named tuple rather than a dataclass because it is created once per request and tuples
    are the cheapest immutable record in CPython.
    """

    allowed: bool
    remaining: int
    retry_after: float
    reset_after: float
    degraded: bool = False

    def __bool__(self) -> bool:
        return self.allowed
