"""Bookkeeping for notebook 02's live runs: start named backends, push load through the
course proxy, kill a backend on a timer. The balancing itself stays in the cells."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pandas as pd

from course_lib.http import ServerProcess, serve_processes

from ..loadgen import run_load
from ..proxy import Proxy
from ..strategies import Strategy

__all__ = ["FACTORY", "Rig", "backends", "busy_signs", "kill_after", "through_proxy"]

FACTORY = "course_lib.load_balancing.backends:backend_app"


class Rig:
    """Running backends: ``urls`` ({name: URL}, in order) and their processes."""

    def __init__(self, procs: list[ServerProcess]) -> None:
        self.procs = {p.kwargs["name"]: p for p in procs}
        self.urls = {p.kwargs["name"]: p.url for p in procs}

    @property
    def names(self) -> list[str]:
        return list(self.urls)


@contextlib.contextmanager
def backends(specs: Sequence[Mapping[str, Any]]) -> Iterator[Rig]:
    """One backend process per spec (the keyword arguments of ``backend_app``)."""
    with serve_processes(FACTORY, specs) as procs:
        yield Rig(procs)


def through_proxy(
    rig: Rig, strategy: Strategy, *, sample_every: float | None = None, **load: Any
) -> tuple[pd.DataFrame, Proxy]:
    """Run ``run_load(**load)`` through a fresh :class:`Proxy` with ``strategy``; return
    the client-side results and the (stopped) proxy with its records."""
    proxy = Proxy(rig.urls, strategy, sample_every=sample_every)
    with proxy.serve() as url:
        return run_load(url, **load), proxy


def busy_signs(
    run: pd.DataFrame, *, fast: Sequence[str], work_ms: float, slack: float = 4.0
) -> list[str]:
    """Why ``run`` (a :func:`through_proxy` result) cannot back a comparison of tails.

    An open-loop run measures the balancer's tail only while the client sends on schedule
    and the fast backends (``fast``, each doing ``work_ms`` of work per request) answer near
    that time. On a machine whose cores are taken by other work, every process of the rig
    waits for a core and the tail measures the machine. Returns one sentence per sign of
    that (the client's p99 lateness, the fast backends' median), each over ``slack`` times
    ``work_ms``; an empty list means neither showed.
    """
    if work_ms <= 0 or slack <= 0:
        raise ValueError(f"work_ms and slack must be > 0, got {work_ms!r} and {slack!r}")
    limit = slack * work_ms
    late_p99 = (run.sent_s - run.intended_s).quantile(0.99) * 1000
    fast_p50 = run[run.backend.isin(list(fast))].latency_ms.median()
    signs = []
    if late_p99 > limit:
        signs.append(f"the client sent its p99 request {late_p99:.0f} ms late")
    if fast_p50 > limit:
        signs.append(f"the fast backends' median took {fast_p50:.0f} ms for {work_ms:g} ms of work")
    return signs


@contextlib.contextmanager
def kill_after(proc: ServerProcess, seconds: float) -> Iterator[threading.Timer]:
    """``SIGKILL`` ``proc`` after ``seconds`` (cancelled if the block ends first)."""
    timer = threading.Timer(seconds, proc.kill)
    timer.daemon = True
    timer.start()
    try:
        yield timer
    finally:
        timer.cancel()
