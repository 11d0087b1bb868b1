"""The ladder: the same trace through the service, one pattern switched on per step.

A :class:`Step` names the switches (:class:`.app.Config`) and how many app processes serve
(1: straight to the first process; more: through the course proxy with least connections).
:func:`run_step` plays the trace and :func:`summarize` turns the rows into the step's line:
throughput, p50/p99 from the intended send time (well-behaved clients), errors, 429s by
client, SQL statements (and those on the primary) and Redis round trips per request.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd

from course_lib.load_balancing import LeastConnections
from course_lib.load_balancing.proxy import Proxy
from course_lib.measure import run_async

from .app import Config
from .load import NOISY, Op, play
from .rig import Stack, wait_until_idle

__all__ = ["CONNECT_TIMEOUT", "OK", "Step", "run_step", "summarize", "trace_requests"]

OK = (200, 201)
# The proxy shares this process (and its GIL) with the load generator; on saturated cores a
# connect can wait its turn for a while, which must not count as a dead backend. A killed
# process refuses connections at once, so a long timeout does not slow noticing it.
CONNECT_TIMEOUT = 5.0


@dataclass(frozen=True)
class Step:
    """One rung: its label, the switches, and how many processes serve it."""

    name: str
    config: Config
    processes: int = 1


def run_step(stack: Stack, step: Step, trace: Sequence[Op]) -> pd.DataFrame:
    """Set every process's switches to ``step.config``, play ``trace`` against one process
    or through a :class:`~course_lib.load_balancing.proxy.Proxy` over ``step.processes``,
    then wait until the first process is idle again (an overloaded step's backlog must not
    spill into the next). One row per op, plus the column ``step``."""
    stack.configure(step.config)
    if step.processes == 1:
        rows = play(stack.procs[0].url, trace)
    else:
        urls = dict(list(stack.urls.items())[: step.processes])
        proxy = Proxy(urls, LeastConnections(list(urls), seed=6), connect_timeout=CONNECT_TIMEOUT)
        with proxy.serve() as url:
            rows = play(url, trace)
    wait_until_idle(stack.procs[0].url)
    return rows.assign(step=step.name)


def summarize(rows: pd.DataFrame) -> dict[str, float]:
    """The step's line; latencies of the well-behaved clients' answered requests (ms)."""
    good = rows[rows.client != NOISY]
    answered = good[good.status.isin(OK)]
    wall = rows.done_s.max()
    reads = rows[(rows.kind == "read") & rows.status.isin(OK)]
    return {
        "throughput_rps": rows.status.isin(OK).sum() / wall,
        "p50_ms": answered.latency_ms.quantile(0.50),
        "p99_ms": answered.latency_ms.quantile(0.99),
        "errors": int((~rows.status.isin((*OK, 429))).sum()),
        "noisy_429": int(((rows.client == NOISY) & (rows.status == 429)).sum()),
        "others_429": int(((rows.client != NOISY) & (rows.status == 429)).sum()),
        "statements_per_req": rows.statements.mean(),
        "primary_statements_per_read": reads.on_primary.mean(),
        "redis_per_req": rows.redis.mean(),
    }


def trace_requests(
    stack: Stack, steps: Sequence[Step], *, user: int, client: str = "c0"
) -> dict[str, list]:
    """One traced ``GET /users/{user}/feed`` per step, in this process, on the stack's
    databases and Redis (OpenTelemetry, :func:`course_lib.profiling.tracing`): {step name:
    finished spans}. The feed is read once, untraced, before each traced request: a cache
    step's traced request is a hit, and no step's shows a connection being opened.
    """
    import httpx

    from course_lib.profiling import tracing

    from .app import Service, build_app
    from .rig import API_KEYS

    service = Service(
        primary_url=stack.rs.primary_url,
        replica_url=stack.rs.replica_url,
        redis_url=stack.redis.url,
        users=stack.users,
    )
    app = build_app(service, api_keys=frozenset(API_KEYS))
    path = f"/users/{user}/feed"
    headers = {"x-api-key": client}

    async def run_all() -> dict[str, list]:
        found: dict[str, list] = {}
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
            with tracing(engines=service.engines()) as spans:
                for step in steps:
                    service.config = step.config
                    (await http.get(path, headers=headers)).raise_for_status()
                    spans.clear()
                    (await http.get(path, headers=headers)).raise_for_status()
                    found[step.name] = list(spans)
        return found

    try:
        return run_async(run_all())
    finally:
        service.close()
