"""The caching notebook's "in production" cell: the same :class:`CacheAside` on a local
three-node Redis Cluster, and where its keys landed.

The cluster is started from the course's own ``redis-server`` (embedded or system) on the
loopback interface and stopped before returning, so the notebook needs nothing else.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from course_lib.services.cluster import LocalCluster
from course_lib.validation import positive_int

from ..cache_aside import CacheAside

__all__ = ["cluster_demo"]


def cluster_demo(keys: int = 300, *, cluster: LocalCluster | None = None) -> pd.DataFrame:
    """Cache ``keys`` user ids through a ``CacheAside`` on a 3-primary cluster (one started
    here, unless ``cluster`` is given), read each twice and invalidate one.

    A frame with one row per primary, in slot order (``primary`` 1 to 3 is stable across
    runs; ``node``, a random port, is not): the keys whose values it holds and the hash
    slots it owns. Every key of one user key (value, invalidation record, lock) has the same
    slot, so each row also counts their records. ``frame.attrs["stats"]`` holds the cache's
    counters (``keys`` misses, then ``keys`` hits, then one reload)."""
    keys = positive_int("keys", keys)
    own = cluster is None
    if cluster is None:
        cluster = LocalCluster(primaries=3).start()
    try:
        client = cluster.client()
        try:
            return _run(cluster, client, keys)
        finally:
            client.close()
    finally:
        if own:
            cluster.stop()


def _run(cluster: LocalCluster, client: Any, keys: int) -> pd.DataFrame:
    cache = CacheAside(client, lambda key: {"id": key}, ttl=60, namespace="demo-user")
    ids = list(range(1, keys + 1))
    for key in ids:
        cache.get(key)  # a miss: loaded and cached on the key's primary
    for key in ids:
        cache.get(key)  # a hit, served by that primary
    cache.invalidate(ids[0])  # the script's two keys are in one slot, so this runs
    if cache.get(ids[0]) != {"id": ids[0]}:
        raise RuntimeError("the cluster did not serve the reloaded value")
    per_port: dict[int, int] = {}
    for key in ids:
        port = int(client.get_node_from_key(cache.key(key)).port)
        per_port[port] = per_port.get(port, 0) + 1
    slots = cluster.slots_per_primary()
    rows = [
        {
            "primary": rank,
            "keys": per_port.get(port, 0),
            "slots": slots[port],
            "node": f"127.0.0.1:{port}",
        }
        for rank, port in enumerate(slots, start=1)
    ]
    frame = pd.DataFrame(rows)
    frame.attrs["stats"] = cache.stats
    return frame
