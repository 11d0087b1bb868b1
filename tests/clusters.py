"""Start a throwaway Redis Cluster for a test (a module of its own, not conftest.py: two
conftest.py files exist, tests/ and notebooks/, and ``import conftest`` could reach either)."""

from __future__ import annotations

import pytest

from course_lib import services
from course_lib.services.cluster import LocalCluster


def start_cluster(primaries: int = 3, replicas: int = 0, **kwargs: float) -> LocalCluster:
    """A started :class:`LocalCluster`, or the test skipped if no ``redis-server`` exists."""
    try:
        return LocalCluster(primaries, replicas, **kwargs).start()
    except services.ServiceError as exc:
        if "no Redis available" in str(exc) or "no redis-cli" in str(exc):
            pytest.skip(f"cannot start a Redis Cluster: {exc}")
        raise
