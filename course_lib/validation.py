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
    "instance_of",
    "int_in_range",
    "integer",
    "non_negative_int",
    "non_negative_number",
    "number_at_least",
    "one_of",
    "optional_positive_number",
    "positive_int",
    "positive_number",
    "redis_ttl",
    "string",
    "text",
    "whole_milliseconds",
]


def finite_number(name: str, value: object) -> float:
    """``value`` as a float if it is a finite real number (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    return float(value)


def integer(name: str, value: object) -> int:
    """``value`` if it is an integer (not a bool)."""
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


def number_at_least(name: str, value: object, low: float) -> float:
    """``value`` as a float if it is a finite number >= ``low``."""
    number = finite_number(name, value)
    _at_least(name, number, low, strict=False, what=f"a finite number >= {low:g}")
    return number


def optional_positive_number(name: str, value: object) -> float | None:
    """``None``, or ``value`` as a float if it is a finite number > 0."""
    return None if value is None else positive_number(name, value)


def int_in_range(
    name: str, value: object, low: int, high: int | None = None, *, why: str = ""
) -> int:
    """``value`` if it is an integer >= ``low`` and, unless ``high`` is ``None``, <= ``high``;
    ``why`` says where the bounds come from (e.g. ``" (32-bit column)"``)."""
    number = integer(name, value)
    if high is None:
        _at_least(name, number, low, strict=False, what=f">= {low}{why}")
    elif not low <= number <= high:
        raise ValueError(f"{name} must be in [{low}, {high}]{why}, got {number}")
    return number


def positive_int(name: str, value: object) -> int:
    """``value`` if it is an integer >= 1."""
    return int_in_range(name, value, 1)


def non_negative_int(name: str, value: object) -> int:
    """``value`` if it is an integer >= 0."""
    return int_in_range(name, value, 0)


def one_of(name: str, value: object, choices: tuple[object, ...]) -> object:
    """``value`` if it is one of ``choices`` (``ValueError`` listing them otherwise)."""
    if value not in choices:
        listed = ", ".join(repr(choice) for choice in choices)
        raise ValueError(f"{name} must be one of {listed}, got {value!r}")
    return value


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


def whole_milliseconds(name: str, value: object) -> int:
    """:func:`redis_ttl`'s ``value`` in whole milliseconds, as ``PX`` takes it (never 0)."""
    return int(redis_ttl(name, value) * 1000)


def function(name: str, value: object) -> Callable[..., Any]:
    """``value`` if it can be called (a function, a method, a class, an object with
    ``__call__``)."""
    if not callable(value):
        raise TypeError(f"{name} must be callable, got {type(value).__name__}")
    return value


def instance_of(name: str, value: Any, kind: type, what: str) -> Any:
    """``value`` if it is an instance of ``kind`` (a class, or a ``runtime_checkable``
    protocol, which checks the methods are there); ``what`` says what is expected."""
    if not isinstance(value, kind):
        raise TypeError(f"{name} must be {what}, got {type(value).__name__}")
    return value


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
