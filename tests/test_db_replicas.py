"""ReplicaSet and the routing session against a real primary + streaming replica."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from ordering import until
from sqlalchemy import Engine, create_engine, event, func, select, text
from sqlalchemy.exc import InternalError, OperationalError
from suspend import running, suspended

from course_lib import db
from course_lib.db.lesson.replicas import ReplicaSet
from course_lib.services.embedded import find_postgres_bin_dir
from course_lib.services.errors import ServiceError

# Every server here is a ReplicaSet of the test's own (the same PostgreSQL binaries in
# both passes of `make test`): one pass covers them.
pytestmark = pytest.mark.one_pass


# A replica set changes state within this (s): its servers start, stream and replay.
REPLICA_WAIT = 30.0


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

    until(visible, "the replica shows the write", REPLICA_WAIT)
    until(lambda: rs.lag_bytes() == 0, "the replica has replayed all it received", REPLICA_WAIT)
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
    # The replica's replay is held for the reads: its 3 s delay is no bound on a busy machine.
    with delayed.replay_paused():
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
    # bob reads the replica, behind: the anomaly alice is protected from
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
    until(lambda: rs.streaming_replicas() == 1, "the replica streams again", REPLICA_WAIT)


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
    assert not [pid for pid in pids if running(pid)]  # type: ignore[attr-defined]
    assert not Path(seen["root"]).exists()  # type: ignore[arg-type]


ORPHAN_SCRIPT = """
import json, time
from course_lib.db.lesson.replicas import ReplicaSet
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
        assert len(seen["pids"]) >= 4 and all(running(pid) for pid in seen["pids"])
        program.kill()  # no atexit, no context manager: a kernel killed with SIGKILL
        program.wait(10)
        until(
            lambda: not any(running(pid) for pid in seen["pids"]),
            "the reaper stops every server",
            60,
        )
        until(lambda: not Path(seen["root"]).exists(), "the reaper removes the set's folder", 10)
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
    primary, replica = rs.engine("primary"), rs.engine("replica")
    with pytest.raises(ValueError, match="probe_timeout"):
        db.Router(primary, replica, probe_timeout=0)
    with pytest.raises(TypeError, match="probe_interval"):
        db.Router(primary, replica, probe_interval="1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lsn"):
        db.parse_lsn("nonsense")
    assert db.format_lsn(db.parse_lsn("16/B374D848")) == "16/B374D848"


def _small_router(rs: ReplicaSet, size: int, **kw: Any) -> tuple[db.Router, Engine]:
    primary = create_engine(rs.primary_url, pool_size=size, max_overflow=0, pool_timeout=10)
    return db.Router(primary, rs.engine("replica"), **kw), primary


def test_a_commit_on_a_pool_of_one_pins_from_the_connection_it_holds(rs: ReplicaSet) -> None:
    router, primary = _small_router(rs, 1)
    checkouts = []
    event.listen(primary, "checkout", lambda *args: checkouts.append(1))
    try:
        before = router.primary_lsn()
        checkouts.clear()
        with router.session(client="pool-of-one") as session:
            session.add(db.Post(user_id=2, title="pool of one", likes=0))
            session.commit()  # before: a second checkout, TimeoutError after pool_timeout
            token = session.write_lsn
        assert token is not None and db.parse_lsn(token) > before
        assert router.pins.required("pool-of-one") == db.parse_lsn(token)
        assert len(checkouts) == 1 and primary.pool.checkedout() == 0
    finally:
        router.dispose()
        primary.dispose()


def test_two_sessions_commit_on_a_pool_of_two_without_waiting(rs: ReplicaSet) -> None:
    router, primary = _small_router(rs, 2)
    both_hold = threading.Barrier(2, timeout=30)
    checkouts: list[int] = []
    event.listen(primary, "checkout", lambda *args: checkouts.append(1))
    tokens: dict[str, str | None] = {}
    errors: list[BaseException] = []

    def writer(client: str) -> None:
        try:
            with router.session(client=client) as session:
                session.add(db.Post(user_id=3, title=client, likes=0))
                session.flush()  # each session now holds one of the two connections
                both_hold.wait()
                session.commit()
                tokens[client] = session.write_lsn
        except BaseException as exc:  # reported below, with the thread's name
            errors.append(exc)

    try:
        threads = [threading.Thread(target=writer, args=(f"w{i}",)) for i in range(2)]
        start = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        elapsed = time.monotonic() - start
        assert errors == []
        assert all(tokens[c] is not None for c in ("w0", "w1")), tokens
        assert len(router.pins) == 2
        assert len(checkouts) == 2  # one per session: nobody waited for a third connection
        assert elapsed < 10  # pool_timeout: a wait for the pool would have taken that long
    finally:
        router.dispose()
        primary.dispose()


def test_a_released_or_rolled_back_savepoint_keeps_reads_on_the_primary(rs: ReplicaSet) -> None:
    router = db.Router(rs.engine("primary"), rs.engine("replica"), probe_interval=0)
    marker = f"savepoint-{time.monotonic_ns()}"
    count = select(func.count()).select_from(db.Post).where(db.Post.title == marker)
    try:
        with router.session(client="sp") as session:
            session.add(db.Post(user_id=4, title=marker, likes=0))
            session.flush()
            with session.begin_nested():
                session.add(db.Post(user_id=4, title=marker, likes=1))
            # still one open transaction: its rows exist only on the primary
            assert session.scalar(count) == 2
            with pytest.raises(RuntimeError), session.begin_nested():
                session.add(db.Post(user_id=4, title=marker, likes=2))
                session.flush()
                raise RuntimeError("roll the savepoint back")
            assert session.scalar(count) == 2
            assert router.pins.required("sp") is None  # nothing committed yet
            session.rollback()
        assert router.routed["replica"] == 0
    finally:
        router.dispose()


def test_a_connection_lost_after_commit_does_not_fail_the_commit(rs: ReplicaSet) -> None:
    router = db.Router(rs.engine("primary"), rs.engine("replica"))
    marker = f"lost-{time.monotonic_ns()}"
    try:
        with router.session(client="lost") as session:
            session.add(db.Post(user_id=5, title=marker, likes=0))
            backend = session.execute(text("SELECT pg_backend_pid()")).scalar_one()

            def kill_backend(_: Any) -> None:  # runs after COMMIT, before the LSN is read
                with rs.engine("primary").connect() as conn:
                    query = text("SELECT pg_terminate_backend(:pid, 10000)")
                    assert conn.execute(query, {"pid": backend}).scalar_one() is True

            event.listen(session, "after_commit", kill_backend, insert=True)
            session.commit()
            assert session.write_lsn is None
        assert router.pins.required("lost") is None
        with rs.engine("primary").connect() as conn:
            query = select(func.count()).select_from(db.Post).where(db.Post.title == marker)
            assert conn.execute(query).scalar_one() == 1
    finally:
        router.dispose()


def test_a_hung_replica_is_skipped_within_the_probe_timeout(rs: ReplicaSet) -> None:
    router = db.Router(rs.engine("primary"), rs.engine("replica"), probe_interval=0)
    query = select(db.User.name).where(db.User.id == 7)
    outcome: dict[str, Any] = {}

    def reads_while_hung() -> None:
        try:
            start = time.monotonic()
            for _ in range(3):
                with router.session() as session:
                    outcome.setdefault("names", []).append(session.scalar(query))
            outcome["seconds"] = time.monotonic() - start
            probe = f"replica-probe-{id(router):x}-0"  # the probe threads of replica 0
            outcome["probes"] = [t.name for t in threading.enumerate()].count(probe)
            with pytest.raises(ServiceError, match="did not answer"):
                rs.lag_bytes()
        except BaseException as exc:
            outcome["error"] = exc

    try:
        with router.session() as session:
            assert session.scalar(query) is not None
        assert router.routed == {"primary": 0, "replica": 1}
        with suspended(rs.replica.pid()):
            reader = threading.Thread(target=reads_while_hung)
            reader.start()
            reader.join(30)  # before: blocked in the probe's pre-ping until SIGCONT
            assert not reader.is_alive(), "a routed read hung with the replica"
        reader.join(60)
        assert "error" not in outcome, outcome
        assert len(outcome["names"]) == 3 and None not in outcome["names"]
        assert router.routed == {"primary": 3, "replica": 1}
        # one wait of probe_timeout (1 s), then no more: the hung probe is not repeated
        assert outcome["probes"] == 1
        assert outcome["seconds"] < 1 + 10
        until(router.replica_available, "the stuck probe answers after SIGCONT", REPLICA_WAIT)
        with router.session() as session:
            assert session.scalar(query) is not None
        assert router.routed["replica"] == 2
    finally:
        router.dispose()


def test_servers_listen_on_private_unix_sockets_only(rs: ReplicaSet) -> None:
    assert stat.S_IMODE(rs.root.stat().st_mode) & 0o076 == 0  # others: pass through at most
    for server in (rs.primary, rs.replica):
        sockets = psutil.Process(server.pid()).net_connections(kind="inet")
        assert [c for c in sockets if c.status == psutil.CONN_LISTEN] == []
        assert stat.S_IMODE(server.socket_dir.stat().st_mode) == 0o700
        socket = server.socket_dir / ".s.PGSQL.5432"
        assert socket.is_socket() and stat.S_IMODE(socket.stat().st_mode) == 0o700


ATEXIT_SCRIPT = """
import json
import stat
from course_lib.db.lesson.replicas import ReplicaSet
rs = ReplicaSet.start()
rs._reaper.kill()  # only the interpreter's exit can stop the servers now
rs._reaper.wait()
print(json.dumps({"pids": rs.pids(), "root": str(rs.root)}), flush=True)
"""


def test_a_replica_set_the_program_forgets_to_stop_is_stopped_at_exit() -> None:
    program = subprocess.run(
        [sys.executable, "-c", ATEXIT_SCRIPT], capture_output=True, text=True, timeout=120
    )
    seen = json.loads(program.stdout)
    try:
        assert program.returncode == 0, program.stderr
        assert len(seen["pids"]) >= 4
        # stopped before the interpreter exited: no reaper could have done it
        assert not [pid for pid in seen["pids"] if running(pid)]
        assert not Path(seen["root"]).exists()
    finally:
        if Path(seen["root"]).exists():  # the test failed: stop what it left
            ReplicaSet(Path(seen["root"]), find_postgres_bin_dir(), None).stop()


def test_pins_of_clients_that_never_read_again_are_forgotten(rs: ReplicaSet) -> None:
    router = db.Router(rs.engine("primary"), rs.engine("replica"), probe_interval=0)
    try:
        for client in ("gone-1", "gone-2", "gone-3"):
            with router.session(client=client) as session:
                session.add(db.Post(user_id=6, title=client, likes=0))
                session.commit()
        assert len(router.pins) == 3
        target = router.primary_lsn()
        # no session of theirs reads again; the router's own probes catch up with them
        until(
            lambda: (router.replayed_lsn() or 0) >= target,
            "the probes see the target replayed",
            REPLICA_WAIT,
        )
        assert len(router.pins) == 0  # before: kept forever
    finally:
        router.dispose()
