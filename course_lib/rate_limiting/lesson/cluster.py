"""The rate-limiting notebook's "in production" cell: the same :class:`SlidingWindowLog` on a
local three-node Redis Cluster, hammered by threads in several processes, and where its keys
landed.

The cluster is started from the course's own ``redis-server`` (embedded or system) on the
loopback interface and stopped before returning, so the notebook needs nothing else. Where
no ``redis-server`` or ``redis-cli`` can be found, :class:`LocalCluster` raises
:class:`course_lib.services.ServiceError` naming what is missing.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pandas as pd
from redis.cluster import RedisCluster

from course_lib.measure import run_processes, run_threads
from course_lib.rate_limiting import SlidingWindowLog
from course_lib.services.cluster import LocalCluster
from course_lib.validation import positive_int

__all__ = ["cluster_demo"]


def cluster_demo(
    clients: int = 60,
    limit: int = 5,
    *,
    processes: int = 2,
    threads: int = 4,
    rounds: int = 2,
    prefix: str = "api",
    cluster: LocalCluster | None = None,
) -> pd.DataFrame:
    """``clients`` API clients, each limited to ``limit`` requests per minute by one
    ``SlidingWindowLog`` on a 3-primary cluster (one started here, unless ``cluster`` is
    given; ``prefix`` then keeps the demo's keys apart from others: a fixed one gives a key
    layout that is the same on every run). ``processes`` x ``threads`` workers
    start together and each asks for every client ``rounds`` times, all workers on the same
    client at the same moment (the contention a race needs): ``processes * threads * rounds``
    attempts per client, more than ``limit``.

    A frame with one row per primary, in slot order (``primary`` 1 to 3 is stable across
    runs; ``node``, a random port, is not): the clients whose key it holds, the attempts and
    admissions it decided, the hash slots it owns. ``frame.attrs["admitted"]`` maps each
    client to how many of its requests were admitted (``limit`` each when the limit holds);
    ``frame.attrs["degraded"]`` counts decisions made without Redis (0 on a healthy cluster).
    """
    clients = positive_int("clients", clients)
    limit = positive_int("limit", limit)
    processes = positive_int("processes", processes)
    threads = positive_int("threads", threads)
    rounds = positive_int("rounds", rounds)
    if processes * threads * rounds <= limit:
        raise ValueError(
            f"processes * threads * rounds must exceed limit={limit} for the limit to be "
            f"tested, got {processes * threads * rounds}"
        )
    own = cluster is None
    if cluster is None:
        cluster = LocalCluster(primaries=3).start()
    try:
        return _run(cluster, prefix, clients, limit, processes, threads, rounds)
    finally:
        if own:
            cluster.stop()


def _client_name(index: int) -> str:
    return f"client{index:03d}"


def _run(
    cluster: LocalCluster,
    prefix: str,
    clients: int,
    limit: int,
    processes: int,
    threads: int,
    rounds: int,
) -> pd.DataFrame:
    port = cluster.alive()[0]  # read here: the Popen objects answer only in this process
    names = [_client_name(i) for i in range(clients)]

    def in_process() -> list[tuple[str, bool, bool]]:
        client = RedisCluster(host="127.0.0.1", port=port)  # a client must not cross a fork
        limiter = SlidingWindowLog(client, limit, 60, prefix=prefix)
        try:

            def ask(worker: int, index: int) -> tuple[str, bool, bool]:
                name = names[index % clients]  # every worker on the same client together
                decision = limiter.hit(name)
                return name, decision.allowed, decision.degraded

            calls = run_threads(ask, threads, calls=clients * rounds, pass_worker=True)
            if calls.errors:
                raise RuntimeError(f"{len(calls.errors)} decisions failed: {calls.errors[0]}")
            return calls.values
        finally:
            client.close()

    result = run_processes(in_process, processes, timeout=120)
    if result.errors:
        raise RuntimeError(f"a worker process failed: {result.errors[0]}")
    decisions = [d for chunk in result.values for d in chunk]
    admitted = Counter(name for name, allowed, _ in decisions if allowed)
    client = cluster.client()
    try:
        limiter = SlidingWindowLog(client, limit, 60, prefix=prefix)
        home = {name: int(client.get_node_from_key(limiter.key(name)).port) for name in names}
    finally:
        client.close()
    return _per_primary(cluster, names, home, admitted, decisions)


def _per_primary(
    cluster: LocalCluster,
    names: list[str],
    home: dict[str, int],
    admitted: Counter[str],
    decisions: list[tuple[str, bool, bool]],
) -> pd.DataFrame:
    slots = cluster.slots_per_primary()
    attempts = Counter(home[name] for name, _, _ in decisions)
    rows: list[dict[str, Any]] = [
        {
            "primary": rank,
            "clients": sum(home[name] == port for name in names),
            "attempts": attempts[port],
            "admitted": sum(admitted[name] for name in names if home[name] == port),
            "slots": slots[port],
            "node": f"127.0.0.1:{port}",
        }
        for rank, port in enumerate(slots, start=1)
    ]
    frame = pd.DataFrame(rows)
    frame.attrs["admitted"] = {name: admitted[name] for name in names}
    frame.attrs["degraded"] = sum(degraded for _, _, degraded in decisions)
    return frame
