"""Clocks you can control, so time-dependent behaviour is tested and charted exactly.

- :class:`ManualClock`: a callable returning a time you set, advance or step backwards
  (an NTP correction, a VM resumed from suspend).
- :func:`replaced_time`: make code that calls ``time.time()`` through a module's ``time``
  name (as the seed's ``TokenBucket`` does) read a clock of your choice instead.
"""

from __future__ import annotations

import contextlib
import time
import types
from collections.abc import Callable, Iterator

__all__ = ["ManualClock", "replaced_time"]


class ManualClock:
    """A clock that only moves when told to; call it to read the time in seconds."""

    def __init__(self, start: float = 0.0) -> None:
        self.now = float(start)

    def __call__(self) -> float:
        return self.now

    def set(self, now: float) -> None:
        """Jump to ``now`` (backwards is allowed: that is what wall clocks do)."""
        self.now = float(now)

    def advance(self, seconds: float) -> None:
        """Move forward (or, with a negative value, backward) by ``seconds``."""
        self.now += seconds


@contextlib.contextmanager
def replaced_time(module: types.ModuleType, clock: Callable[[], float]) -> Iterator[None]:
    """Inside the block, ``module.time.time()`` returns ``clock()``; restored on exit.

    Only ``module``'s reference to the ``time`` module is swapped, so nothing else in the
    process sees the fake clock.
    """
    original = module.time
    fake = types.SimpleNamespace(
        **{n: getattr(time, n) for n in dir(time) if not n.startswith("_")}
    )
    fake.time = clock
    module.time = fake
    try:
        yield
    finally:
        module.time = original
