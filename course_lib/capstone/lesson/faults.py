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

__all__ = ["WINDOW_COLUMNS", "Fault", "inject", "windows_frame"]


@dataclass(frozen=True)
class Fault:
    """``begin`` at ``at`` s, ``end`` (if any) ``duration`` s later; ``None`` actions are
    faults the trace itself carries (a client's burst)."""

    name: str
    at: float
    duration: float
    begin: Callable[[], object] | None = None
    end: Callable[[], object] | None = None


# A window's fields, in the order the fault passes them (see inject).
WINDOW_COLUMNS = ["name", "start_s", "in_effect_s", "lifted_s", "end_s"]


@contextlib.contextmanager
def inject(faults: Sequence[Fault], t0: float) -> Iterator[list[dict[str, object]]]:
    """Run ``faults`` on the clock of ``t0`` in a thread; yield the list of windows, filled
    as they happen, in seconds since ``t0``: ``start_s`` as the fault's action starts,
    ``in_effect_s`` when it has returned (the server is down by then), ``lifted_s`` as the
    end action starts (the server is still down until then) and ``end_s`` when it has
    returned. Between ``in_effect_s`` and ``lifted_s`` the fault holds for certain, however
    long the actions took on a busy machine.

    When the block ends normally, the rest of the schedule still runs (a fault due after
    the load ended still begins and ends) and every window is complete on exit; when it
    raises, no further fault begins and each one that began is ended. Windows are in the
    order of ``faults``; names must be distinct (``ValueError``). An action that raises stops
    the schedule, and its exception is raised here once the block has ended.
    """
    if len({f.name for f in faults}) != len(faults):
        raise ValueError("faults must have distinct names")
    windows = {f.name: dict.fromkeys(WINDOW_COLUMNS) | {"name": f.name} for f in faults}
    for fault in faults:
        if fault.begin is None and fault.end is None:  # the trace carries it: as planned
            start, end = fault.at, fault.at + fault.duration
            windows[fault.name].update(start_s=start, in_effect_s=start, lifted_s=end, end_s=end)
    acting = [f for f in faults if f.begin is not None or f.end is not None]
    pending: list[Fault] = []  # begun, not yet ended
    errors: list[BaseException] = []  # an action that raised, re-raised in the caller
    stop = threading.Event()

    def clock() -> float:
        return time.perf_counter() - t0

    def finish(fault: Fault) -> None:
        if fault in pending:
            pending.remove(fault)
            windows[fault.name]["lifted_s"] = clock()
            if fault.end is not None:
                fault.end()
            windows[fault.name]["end_s"] = clock()  # the service is back

    def run() -> None:
        try:
            play_schedule()
        except BaseException as exc:
            errors.append(exc)

    def play_schedule() -> None:
        events = sorted(
            [(f.at, 0, f) for f in acting] + [(f.at + f.duration, 1, f) for f in acting],
            key=lambda event: (event[0], event[1]),
        )
        for at, ends, fault in events:
            if stop.wait(max(0.0, at - clock())):
                return
            if ends:
                finish(fault)
                continue
            # the window opens as the fault is injected (a kill acts before it returns)
            windows[fault.name]["start_s"] = clock()
            if fault.begin is not None:
                fault.begin()
            windows[fault.name]["in_effect_s"] = clock()
            pending.append(fault)  # only a fault that began is ended

    thread = threading.Thread(target=run, name="fault-injector", daemon=True)
    thread.start()
    listed = [windows[f.name] for f in faults]
    try:
        yield listed
    except BaseException:
        stop.set()
        raise
    finally:
        thread.join()
        for fault in list(pending):  # the block raised: restart what was stopped
            finish(fault)
        listed[:] = [w for w in listed if w["start_s"] is not None]
    if errors:
        raise errors[0]


def windows_frame(windows: Sequence[dict[str, object]]) -> pd.DataFrame:
    """The windows as a DataFrame, one row per fault, in the order they began."""
    return pd.DataFrame(list(windows), columns=WINDOW_COLUMNS)
