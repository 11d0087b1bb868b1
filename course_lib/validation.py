"""Argument checks for every constructor of ``course_lib``: fail at construction, naming the
parameter.

One set of rules everywhere: a number is a real number but never a ``bool``; durations and
sizes are finite (``NaN`` and infinity are refused with ``ValueError``, so they never reach
arithmetic that would raise ``OverflowError`` or loop forever later); a wrong type raises
``TypeError``, a wrong value ``ValueError``, and both messages start with the parameter's
name.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

__all__ = [
    "cost_within",
    "finite_number",
    "function",
    "integer_between",
    "non_negative_int",
    "non_negative_number",
    "optional_positive_number",
    "positive_int",
    "positive_number",
    "redis_ttl",
    "string",
    "text",
]


def finite_number(name: str, value: object) -> float:
    """``value`` as a float if it is a finite real number (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    return float(value)


def _integer(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    return int(value)


def _at_least(name: str, number: float, low: float, *, strict: bool, what: str) -> None:
    if number < low or (strict and number == low):
        raise ValueError(f"{name} must be {what}, got {number}")


def positive_number(name: str, value: object) -> float:
    """``value`` as a float if it is a finite number > 0."""
    number = finite_number(name, value)
    _at_least(name, number, 0, strict=True, what="a finite number > 0")
    return number


def non_negative_number(name: str, value: object) -> float:
    """``value`` as a float if it is a finite number >= 0."""
    number = finite_number(name, value)
    _at_least(name, number, 0, strict=False, what="a finite number >= 0")
    return number


def optional_positive_number(name: str, value: object) -> float | None:
    """``None``, or ``value`` as a float if it is a finite number > 0."""
    return None if value is None else positive_number(name, value)


def positive_int(name: str, value: object) -> int:
    """``value`` if it is an integer >= 1."""
    number = _integer(name, value)
    _at_least(name, number, 1, strict=False, what=">= 1")
    return number


def non_negative_int(name: str, value: object) -> int:
    """``value`` if it is an integer >= 0."""
    number = _integer(name, value)
    _at_least(name, number, 0, strict=False, what=">= 0")
    return number


def cost_within(cost: object, ceiling: int, what: str) -> int:
    """``cost`` if it is an integer in ``[0, ceiling]``; ``what`` names the ceiling."""
    number = non_negative_int("cost", cost)
    if number > ceiling:
        raise ValueError(
            f"cost must be <= {what}={ceiling} (it could never be admitted), got {cost}"
        )
    return number


def redis_ttl(name: str, value: object) -> float:
    """``value`` (seconds) as a float if it is a finite number of at least 1 ms: Redis counts
    a ``PX`` expiry in whole milliseconds, so anything shorter would round down to none."""
    number = positive_number(name, value)
    _at_least(name, number, 0.001, strict=False, what=">= 0.001 seconds (Redis counts whole ms)")
    return number


def function(name: str, value: object) -> Callable[..., Any]:
    """``value`` if it can be called (a function, a method, a class, an object with
    ``__call__``)."""
    if not callable(value):
        raise TypeError(f"{name} must be callable, got {type(value).__name__}")
    return value


def integer_between(name: str, value: object, low: int, high: int, what: str = "") -> int:
    """``value`` if it is an integer in ``[low, high]``; ``what`` says where the bounds
    come from (e.g. ``" (32-bit column)"``)."""
    number = _integer(name, value)
    if not low <= number <= high:
        raise ValueError(f"{name} must be in [{low}, {high}]{what}, got {number}")
    return number


def string(name: str, value: object) -> str:
    """``value`` if it is a string (empty or not)."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, got {type(value).__name__}")
    return value


def text(name: str, value: object) -> str:
    """``value`` if it is a string with something other than whitespace in it."""
    if not string(name, value).strip():
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    return value
