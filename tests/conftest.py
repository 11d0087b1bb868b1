"""Fixtures: real Redis and PostgreSQL from ``course_lib.services``, isolated per test.

- ``redis`` : a ``redis.Redis`` on the course's Redis (bytes responses).
- ``ns``    : a namespace unique to the test; every key containing it is deleted afterwards.
- ``pg_engine`` : a SQLAlchemy engine whose ``search_path`` is a schema of the test's own,
  dropped afterwards.
- ``embedded_dir`` : a fresh, short state folder for tests that start and stop embedded
  servers themselves; whatever they started there is stopped afterwards.
- ``local_cluster`` : a Redis Cluster of three primaries on loopback, shared by the tests of
  a module (creating one takes about 2 s; each test uses its own key names);
  ``clusters.start_cluster`` starts others (with replicas, for failover).
- ``any_redis`` : parametrised: ``redis`` above, then a ``RedisCluster`` client of the
  module's ``local_cluster`` (that case is ``one_pass``: the cluster is the test's own).
"""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib
from clusters import start_cluster
from sqlalchemy import Engine

from course_lib import services
from course_lib.services.cluster import LocalCluster


def pytest_report_header(config: pytest.Config) -> list[str]:
    lines = []
    for item in services.status():
        where = f"{item.source} ({item.reason}) {item.url} v{item.version}"
        lines.append(f"{item.service}: {where if item.ok else 'UNAVAILABLE ' + item.error}")
    return lines


@pytest.fixture
def redis() -> Iterator[redis_lib.Redis]:
    client = services.redis_client()
    yield client
    client.close()


@pytest.fixture
def ns(redis: redis_lib.Redis) -> Iterator[str]:
    token = f"t{uuid.uuid4().hex[:12]}"
    yield token
    keys = list(redis.scan_iter(match=f"*{token}*", count=1000))
    if keys:
        redis.delete(*keys)


@pytest.fixture
def pg_engine() -> Iterator[Engine]:
    schema = services.unique_schema("t")
    engine = services.schema_engine(schema)
    yield engine
    engine.dispose()
    services.drop_schema(schema)


@pytest.fixture
def embedded_dir() -> Iterator[Path]:
    # Unix socket paths are limited to ~100 bytes, so keep the folder short.
    with tempfile.TemporaryDirectory(prefix="pc-", dir="/tmp") as folder:
        root = Path(folder)
        yield root
        services.EmbeddedRedis(root / "redis").stop()
        services.EmbeddedPostgres(root / "postgres").stop()


@pytest.fixture(scope="module")
def local_cluster() -> Iterator[LocalCluster]:
    with start_cluster() as cluster:
        yield cluster


@pytest.fixture(params=["plain", pytest.param("cluster", marks=pytest.mark.one_pass)])
def any_redis(request: pytest.FixtureRequest, redis: redis_lib.Redis) -> Iterator[Any]:
    if request.param == "plain":
        yield redis
        return
    client = request.getfixturevalue("local_cluster").client()
    yield client
    client.close()
