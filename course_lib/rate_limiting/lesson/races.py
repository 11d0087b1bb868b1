"""Staging the races of the module's rate limiters: make a rare interleaving happen on every run."""

from __future__ import annotations

import time

__all__ = ["Yielding"]


class Yielding(float):
    """A float whose arithmetic and comparisons give up the GIL first (``time.sleep(0)``).

    On CPython a thread switch can only land at a few points of a short method, so an
    unlocked read-modify-write on floats loses updates only now and then. Handing the seed's
    bucket ``Yielding`` numbers puts a switch point inside every step of the
    read-modify-write: the race it always had shows up on every run instead of once in a
    while (as it would on free-threaded Python or under load).
    """

    def __add__(self, other: float) -> Yielding:
        time.sleep(0)
        return Yielding(float(self) + other)

    __radd__ = __add__

    def __sub__(self, other: float) -> Yielding:
        time.sleep(0)
        return Yielding(float(self) - other)

    def __ge__(self, other: float) -> bool:
        time.sleep(0)
        return float(self) >= other

    def __lt__(self, other: float) -> bool:
        time.sleep(0)
        return float(self) < other
