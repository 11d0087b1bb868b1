"""ReplicaSet and the routing session against a real primary + streaming replica."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from sqlalchemy import create_engine, select, text
from sqlalchemy.exc import InternalError, OperationalError

from course_lib import db
from course_lib.db.replicas import ReplicaSet
from course_lib.services.embedded import find_postgres_bin_dir


def _running(pid: int) -> bool:
    # A postmaster that exited may linger as a zombie until its parent reaps it: not running.
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_for(predicate, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


@pytest.fixture(scope="module")
def rs() -> Iterator[ReplicaSet]:
    with ReplicaSet.start() as replica_set:
        db.populate(replica_set.engine("primary"), users=20, posts_per_user=1, seed=1)
        replica_set.wait_for_replay()
        yield replica_set


@pytest.fixture(scope="module")
def delayed() -> Iterator[ReplicaSet]:
    with ReplicaSet.start(apply_delay=3) as replica_set:
        db.populate(replica_set.engine("primary"), users=20, posts_per_user=1, seed=1)
        replica_set.wait_for_replay()
        yield replica_set


def test_a_committed_row_becomes_visible_on_the_replica(rs: ReplicaSet) -> None:
    assert rs.streaming_replicas() == 1
    with rs.engine("primary").begin() as conn:
        conn.execute(text("UPDATE users SET name = 'Visible' WHERE id = 1"))

    def visible() -> bool:
        with rs.engine("replica").connect() as conn:
            return conn.execute(text("SELECT name FROM users WHERE id = 1")).scalar() == "Visible"

    assert _wait_for(visible)
    assert _wait_for(lambda: rs.lag_bytes() == 0)
    with rs.engine("replica").connect() as conn, pytest.raises(InternalError, match="read-only"):
        conn.execute(text("UPDATE users SET name = 'no' WHERE id = 1"))


def test_router_sends_writes_to_the_primary_and_reads_to_the_replica(rs: ReplicaSet) -> None:
    router = db.Router(rs.engine("primary"), rs.engine("replica"), probe_interval=0)
    with router.session() as session:
        assert session.get_bind(clause=select(db.User)) is rs.engine("replica")
        assert session.get_bind(clause=select(db.User).with_for_update()) is rs.engine("primary")
        assert session.get_bind(clause=text("SELECT 1")) is rs.engine("primary")
    with router.session() as session:
        server = text("SELECT pg_is_in_recovery()")
        assert session.execute(select(text("pg_is_in_recovery()"))).scalar() is True
        session.add(db.Post(user_id=2, title="routed", likes=0))
        session.flush()
        assert session.execute(server).scalar() is False  # after a write: the primary
        session.commit()
    assert session.write_lsn is not None and db.parse_lsn(session.write_lsn) > 0


def test_pinned_read_sees_the_write_an_unpinned_one_does_not(delayed: ReplicaSet) -> None:
    with delayed.session(client="alice") as session:
        session.get(db.User, 5).name = "Alice v2"  # type: ignore[union-attr]
        session.commit()
        token = session.write_lsn
    with delayed.session(client="alice") as session:
        alice_sees = session.get(db.User, 5).name  # type: ignore[union-attr]
    with delayed.session(client="bob") as session:
        bob_sees = session.get(db.User, 5).name  # type: ignore[union-attr]
    with delayed.session(min_lsn=token) as session:  # the token carried by the caller
        token_sees = session.get(db.User, 5).name  # type: ignore[union-attr]
    # bob reads the replica, 3 s behind: the anomaly alice is protected from
    assert (alice_sees, bob_sees, token_sees) == ("Alice v2", bob_sees, "Alice v2")
    assert bob_sees != "Alice v2"
    assert len(delayed.router.pins) == 1
    delayed.wait_for_replay()
    before = dict(delayed.router.routed)
    with delayed.session(client="alice") as session:
        assert session.get(db.User, 5).name == "Alice v2"  # type: ignore[union-attr]
    assert delayed.router.routed["replica"] == before["replica"] + 1
    assert len(delayed.router.pins) == 0  # caught up: the pin is released


def test_replica_down_reads_are_served_by_the_primary(delayed: ReplicaSet) -> None:
    router = db.Router(delayed.engine("primary"), delayed.engine("replica"), probe_interval=0)
    delayed.stop_replica()
    try:
        with router.session() as session:
            assert session.scalar(select(db.User.name).where(db.User.id == 6)) is not None
        assert router.routed == {"primary": 1, "replica": 0}
    finally:
        delayed.start_replica()
    with router.session() as session:
        session.scalar(select(db.User.name).where(db.User.id == 6))
    assert router.routed["replica"] == 1


def test_pre_ping_recovers_after_the_primary_restarts(rs: ReplicaSet) -> None:
    plain = create_engine(rs.primary_url, pool_size=1)
    pinged = create_engine(rs.primary_url, pool_size=1, pool_pre_ping=True)
    try:
        for engine in (plain, pinged):
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        rs.restart_primary()
        with pytest.raises(OperationalError), plain.connect() as conn:
            conn.execute(text("SELECT 1"))
        with pinged.connect() as conn:
            assert conn.execute(text("SELECT 1")).scalar() == 1
        with plain.connect() as conn:  # the broken pool was invalidated: next checkout works
            assert conn.execute(text("SELECT 1")).scalar() == 1
    finally:
        plain.dispose()
        pinged.dispose()
    assert _wait_for(lambda: rs.streaming_replicas() == 1)


def test_nothing_is_left_running_after_the_block_even_when_it_raises() -> None:
    seen: dict[str, object] = {}
    with pytest.raises(RuntimeError, match="boom"), ReplicaSet.start() as replica_set:
        seen["pids"] = replica_set.pids()
        seen["root"] = replica_set.root
        seen["sockets"] = [
            replica_set.primary.socket_dir / ".s.PGSQL.5432",
            replica_set.replica.socket_dir / ".s.PGSQL.5432",
        ]
        assert all(Path(s).exists() for s in seen["sockets"])  # type: ignore[attr-defined]
        raise RuntimeError("boom")
    pids = seen["pids"]
    assert len(pids) >= 4  # type: ignore[arg-type]
    assert not [pid for pid in pids if _running(pid)]  # type: ignore[attr-defined]
    assert not Path(seen["root"]).exists()  # type: ignore[arg-type]


ORPHAN_SCRIPT = """
import json, time
from course_lib.db.replicas import ReplicaSet
rs = ReplicaSet.start()
print(json.dumps({"pids": rs.pids(), "root": str(rs.root)}), flush=True)
time.sleep(120)
"""


def test_servers_whose_program_is_killed_outright_are_stopped_by_the_reaper() -> None:
    program = subprocess.Popen(
        [sys.executable, "-c", ORPHAN_SCRIPT], stdout=subprocess.PIPE, text=True
    )
    seen: dict[str, Any] = {}
    try:
        seen = json.loads(program.stdout.readline())  # type: ignore[union-attr]
        assert len(seen["pids"]) >= 4 and all(_running(pid) for pid in seen["pids"])
        program.kill()  # no atexit, no context manager: a kernel killed with SIGKILL
        program.wait(10)
        assert _wait_for(lambda: not any(_running(pid) for pid in seen["pids"]), timeout=60)
        assert _wait_for(lambda: not Path(seen["root"]).exists(), timeout=10)
    finally:
        program.kill()
        if seen and Path(seen["root"]).exists():  # the test failed: stop what it left
            ReplicaSet(Path(seen["root"]), find_postgres_bin_dir(), None).stop()


SYSTEM_BINARIES = sorted(
    (p for p in Path("/usr/lib/postgresql").glob("*/bin") if (p / "pg_basebackup").is_file()),
    reverse=True,
)


@pytest.mark.skipif(not SYSTEM_BINARIES, reason="no system PostgreSQL binaries")
def test_works_with_the_system_binaries_too() -> None:
    with ReplicaSet.start(bin_dir=SYSTEM_BINARIES[0]) as replica_set:
        with replica_set.engine("primary").begin() as conn:
            conn.execute(text("CREATE TABLE t AS SELECT 1 AS x"))
        replica_set.wait_for_replay()
        with replica_set.engine("replica").connect() as conn:
            version = conn.execute(text("SHOW server_version_num")).scalar_one()
            assert conn.execute(text("SELECT x FROM t")).scalar_one() == 1
    assert version.startswith(SYSTEM_BINARIES[0].parent.name)


def test_bad_arguments_are_refused(rs: ReplicaSet) -> None:
    with pytest.raises(TypeError, match="client must be hashable"):
        rs.session(client=["not", "hashable"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="apply_delay"):
        ReplicaSet.start(apply_delay=-1)
    with pytest.raises(TypeError, match="primary"):
        db.Router("postgresql://", None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lsn"):
        db.parse_lsn("nonsense")
    assert db.format_lsn(db.parse_lsn("16/B374D848")) == "16/B374D848"
