"""Argument checks shared by the limiters: fail at construction, naming the parameter."""

from __future__ import annotations

import math
import numbers

__all__ = ["cost_within", "positive_int", "positive_number"]


def positive_number(name: str, value: object) -> float:
    """``value`` as a float if it is a finite number > 0, else ``TypeError``/``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return float(value)


def positive_int(name: str, value: object) -> int:
    """``value`` if it is an integer >= 1, else ``TypeError``/``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def cost_within(cost: object, ceiling: int, what: str) -> int:
    """``cost`` if it is an integer in ``[0, ceiling]``; ``what`` names the ceiling."""
    if isinstance(cost, bool) or not isinstance(cost, numbers.Integral):
        raise TypeError(f"cost must be an integer, got {type(cost).__name__}")
    if cost < 0:
        raise ValueError(f"cost must be >= 0, got {cost}")
    if cost > ceiling:
        raise ValueError(
            f"cost must be <= {what}={ceiling} (it could never be admitted), got {cost}"
        )
    return int(cost)
