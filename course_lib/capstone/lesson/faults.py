"""The fault injector: a schedule of faults played on the load's clock, in a thread.

A :class:`Fault` starts ``at`` seconds after ``t0`` (the trace's start, a
``time.perf_counter()`` value shared with :func:`.load.play`) by calling ``begin`` and, if it
has one, ends ``duration`` seconds later by calling ``end`` (a restart). A window opens when
its ``begin`` is called and closes when its ``end`` has returned (the service is back), so
the chart shades what happened, not what was planned;
a fault the trace carries (no actions) is recorded at its planned times, which the trace keeps.
Every fault whose ``begin`` ran gets its ``end`` run on exit, also when the block raises.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import pandas as pd

__all__ = ["Fault", "inject", "windows_frame"]


@dataclass(frozen=True)
class Fault:
    """``begin`` at ``at`` s, ``end`` (if any) ``duration`` s later; ``None`` actions are
    faults the trace itself carries (a client's burst)."""

    name: str
    at: float
    duration: float
    begin: Callable[[], object] | None = None
    end: Callable[[], object] | None = None


@contextlib.contextmanager
def inject(faults: Sequence[Fault], t0: float) -> Iterator[list[dict[str, object]]]:
    """Run ``faults`` on the clock of ``t0`` in a thread; yield the list of windows
    (``name``, ``start_s``, ``end_s``: seconds since ``t0``), filled as they happen and
    complete once the block exits (the thread is joined)."""
    windows: list[dict[str, object]] = []
    pending: list[Fault] = []  # begun, not yet ended
    stop = threading.Event()

    def clock() -> float:
        return time.perf_counter() - t0

    def wait_until(at: float) -> bool:
        return not stop.wait(max(0.0, at - clock()))

    def run() -> None:
        events = sorted(
            [(f.at, "begin", f) for f in faults] + [(f.at + f.duration, "end", f) for f in faults],
            key=lambda event: event[0],
        )
        for at, what, fault in events:
            if not wait_until(at):
                return
            if what == "begin":
                # the window opens as the fault is injected (a kill acts before it returns)
                start = clock() if fault.begin is not None else fault.at
                if fault.begin is not None:
                    fault.begin()
                pending.append(fault)
                windows.append({"name": fault.name, "start_s": start, "end_s": None})
            else:
                _finish(fault)

    def _finish(fault: Fault) -> None:
        if fault in pending:
            pending.remove(fault)
            if fault.end is not None:
                fault.end()
            window = next(w for w in windows if w["name"] == fault.name)
            actions = fault.begin is not None or fault.end is not None
            window["end_s"] = clock() if actions else fault.at + fault.duration

    thread = threading.Thread(target=run, name="fault-injector", daemon=True)
    thread.start()
    try:
        yield windows
    finally:
        stop.set()
        thread.join()
        for fault in list(pending):  # a block that ended early: restart what was stopped
            _finish(fault)


def windows_frame(windows: Sequence[dict[str, object]]) -> pd.DataFrame:
    """The windows as a DataFrame, one row per fault, in the order they began."""
    return pd.DataFrame(list(windows), columns=["name", "start_s", "end_s"])
