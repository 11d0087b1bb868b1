"""Probabilistic early refresh (XFetch; Vattani, Chierichetti, Lowenstein, VLDB 2015).

A hot key that expires makes every concurrent reader miss at once. XFetch lets each reader,
shortly before expiry, volunteer to recompute with a probability that grows as expiry
approaches and with the cost of the recomputation:

    refresh  if  now - delta * beta * ln(U) >= expiry,   U ~ Uniform(0, 1]

``delta`` is how long the last recomputation took, ``beta`` > 1 refreshes earlier, < 1 later.
The paper proves this is optimal among schemes that refresh independently per reader.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

__all__ = ["Envelope", "should_refresh"]


def should_refresh(
    *, now: float, delta: float, expiry: float, beta: float = 1.0, rng: random.Random
) -> bool:
    """The XFetch test: ``True`` means this reader should recompute the value now."""
    u = 1.0 - rng.random()  # in (0, 1]: log(0) is undefined
    return now - delta * beta * math.log(u) >= expiry


@dataclass(frozen=True)
class Envelope:
    """What XFetch caches: the value, the recompute time ``delta`` (s) and the expiry (epoch s)."""

    value: Any
    delta: float
    expiry: float

    def to_json(self) -> dict[str, Any]:
        return {"v": self.value, "d": self.delta, "x": self.expiry}

    @classmethod
    def from_json(cls, data: Any) -> Envelope:
        if not isinstance(data, dict) or not {"v", "d", "x"} <= data.keys():
            raise ValueError("not an XFetch envelope")
        return cls(data["v"], float(data["d"]), float(data["x"]))
