"""Router over several real streaming replicas: spread, max_lag, read-your-writes, failures.

One primary and two replicas for the whole module: ``replica0`` applies at once, ``replica1``
applies each commit ``DELAY`` seconds late (``recovery_min_apply_delay``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ordering import until
from sqlalchemy import func, select, update
from suspend import running, suspended

from course_lib import db
from course_lib.db.lesson.replicas import ReplicaSet
from course_lib.db.lesson.several_replicas import two_replicas_demo
from course_lib.services.embedded import find_postgres_bin_dir

# Every server here is a ReplicaSet of the test's own (the same PostgreSQL binaries in
# both passes of `make test`): one pass covers them.
pytestmark = pytest.mark.one_pass

DELAY = 1.5


# A replica set changes state within this (s): its servers start, stream and replay.
REPLICA_WAIT = 30.0


@pytest.fixture(scope="module")
def rs() -> Iterator[ReplicaSet]:
    with ReplicaSet.start(replicas=2, apply_delay=[None, DELAY]) as replica_set:
        db.populate(replica_set.engine("primary"), users=20, posts_per_user=1, seed=1)
        replica_set.wait_for_replay()
        yield replica_set


@pytest.fixture
def router(rs: ReplicaSet) -> Iterator[db.Router]:
    rs.wait_for_replay()  # every test starts with both replicas caught up
    router = db.Router(rs.engine("primary"), *rs.replica_engines(), probe_interval=0)
    yield router
    router.dispose()


def _read(router: db.Router, client: Any = None, user_id: int = 3) -> tuple[str, str]:
    """(the server that answered, as it names itself; the user's name it returned)."""
    query = select(func.current_setting("cluster_name"), db.User.name).where(db.User.id == user_id)
    with router.session(client) as session:
        server, name = session.execute(query).one()
    return server, name


def _write(router: db.Router, client: Any, user_id: int, name: str) -> int:
    with router.session(client) as session:
        session.execute(update(db.User).where(db.User.id == user_id).values(name=name))
        session.commit()
        assert session.write_lsn is not None
        return db.parse_lsn(session.write_lsn)


def test_the_set_streams_to_two_replicas_each_its_own_server(rs: ReplicaSet) -> None:
    assert rs.streaming_replicas() == 2
    assert rs.apply_delays == [None, DELAY]
    sockets = {server.socket_dir for server in (rs.primary, *rs.replicas)}
    assert len(sockets) == 3
    names = []
    for engine in (rs.engine("primary"), *rs.replica_engines()):
        with engine.connect() as conn:
            names.append(conn.execute(select(func.current_setting("cluster_name"))).scalar())
    assert names == ["primary", "replica0", "replica1"]


def test_reads_take_turns_over_the_two_replicas(router: db.Router) -> None:
    servers = [_read(router)[0] for _ in range(10)]
    assert servers == ["replica0", "replica1"] * 5
    assert router.routed_replicas == [5, 5]
    assert router.routed == {"primary": 0, "replica": 10}


@pytest.mark.parametrize("limit", [{"max_lag_bytes": 0}, {"max_lag": 0.5}])
def test_a_lagging_replica_is_left_out_until_it_catches_up(
    rs: ReplicaSet, limit: dict[str, float]
) -> None:
    router = db.Router(rs.engine("primary"), *rs.replica_engines(), probe_interval=0, **limit)
    try:
        # replica1's replay is held for the block (its DELAY is no bound on a busy machine):
        # over the limit soon after the commit (at once in bytes, after 0.5 s in seconds),
        # while it has not replayed it
        with rs.replay_paused(index=1):
            lsn = _write(router, None, 4, f"lag-{limit}")
            usable = [True, False]  # replica0 replays in ms, replica1 is held
            until(
                lambda: [r.usable for r in router.replica_status()] == usable,
                "replica1 is left out",
                REPLICA_WAIT,
            )
            lagging = router.replica_status()
            assert (lagging[1].replayed or 0) < lsn  # still behind: the exclusion is the lag's
            assert lagging[0].usable and lagging[1].lag_bytes > 0  # type: ignore[operator]
            servers = [_read(router)[0] for _ in range(6)]
            still_behind = (router.replayed_lsn(1) or 0) < lsn
        assert servers == ["replica0"] * 6 and still_behind
        rs.wait_for_replay(index=1)
        until(lambda: router.replica_status()[1].usable, "replica1 is usable again", REPLICA_WAIT)
        caught_up = router.replica_status()
        assert caught_up[1].lag_bytes == 0 and caught_up[1].lag_seconds == 0.0
        servers = [_read(router)[0] for _ in range(4)]
        assert sorted(servers) == ["replica0", "replica0", "replica1", "replica1"]
        assert router.routed["primary"] == 1  # the write; no read went there
    finally:
        router.dispose()


def test_read_your_writes_from_the_replica_that_has_the_lsn(
    rs: ReplicaSet, router: db.Router
) -> None:
    old = _read(router, user_id=5)[1]
    # replica0 replays at once; replica1's replay is held for the block (its DELAY is no
    # bound on a busy machine): wait for the first only
    with rs.replay_paused(index=1):
        lsn = _write(router, "alice", 5, "Alice v2")
        until(
            lambda: (router.replayed_lsn(0) or 0) >= lsn, "replica0 replays the write", REPLICA_WAIT
        )
        alice = [_read(router, "alice", user_id=5) for _ in range(4)]
        bob = [_read(router, "bob", user_id=5) for _ in range(4)]
        replica1_behind = (router.replayed_lsn(1) or 0) < lsn
    assert replica1_behind, "replica1 replayed the write before the reads ended"
    assert alice == [("replica0", "Alice v2")] * 4  # not the primary: replica0 has the LSN
    assert sorted(server for server, _ in bob) == ["replica0", "replica0", "replica1", "replica1"]
    assert ("replica1", old) in bob  # bob, not pinned, may read the stale replica
    assert router.routed["primary"] == 1  # the write only
    # one replica caught up is not enough to forget the pin (GitLab's fix of its bug)
    assert router.pins.required("alice") == lsn
    rs.wait_for_replay(index=1)
    alice = [_read(router, "alice", user_id=5) for _ in range(2)]
    assert sorted(alice) == [("replica0", "Alice v2"), ("replica1", "Alice v2")]
    assert router.pins.required("alice") is None  # every replica has it now


def test_a_pinned_read_goes_to_the_primary_only_when_no_replica_has_the_lsn(
    rs: ReplicaSet, router: db.Router
) -> None:
    rs.stop_replica(index=0)
    try:
        # replica1's 1.5 s delay is no bound on a busy machine, where the write and the read
        # took longer than that: its replay is held instead, so it certainly lacks the write.
        with rs.replay_paused(index=1):
            lsn = _write(router, "carol", 6, "Carol v2")
            carol = _read(router, "carol", user_id=6)
            behind = (router.replayed_lsn(1) or 0) < lsn
        assert carol == ("primary", "Carol v2") and behind  # nobody has it: the primary
        rs.wait_for_replay(index=1)
        assert _read(router, "carol", user_id=6) == ("replica1", "Carol v2")
        assert router.routed_replicas == [0, 1]
        assert router.pins.required("carol") == lsn  # replica0 is down: the pin is kept
    finally:
        rs.start_replica(index=0)
    until(lambda: rs.streaming_replicas() == 2, "both replicas stream", REPLICA_WAIT)


def test_one_replica_stopped_reads_go_to_the_other(rs: ReplicaSet, router: db.Router) -> None:
    rs.stop_replica(index=1)
    try:
        assert [_read(router)[0] for _ in range(4)] == ["replica0"] * 4
        assert router.routed == {"primary": 0, "replica": 4}
        assert not router.replica_available(1) and router.replica_available()
    finally:
        rs.start_replica(index=1)
    until(lambda: router.replica_available(1), "replica1 is available again", REPLICA_WAIT)
    assert sorted(_read(router)[0] for _ in range(2)) == ["replica0", "replica1"]


def test_a_hung_replica_is_skipped_within_the_probe_timeout(
    rs: ReplicaSet, router: db.Router
) -> None:
    assert [_read(router)[0] for _ in range(2)] == ["replica0", "replica1"]
    outcome: dict[str, Any] = {}

    def reads_while_hung() -> None:
        try:
            start = time.monotonic()
            outcome["servers"] = [_read(router)[0] for _ in range(4)]
            outcome["seconds"] = time.monotonic() - start
            probe = f"replica-probe-{id(router):x}-1"
            outcome["probes"] = [t.name for t in threading.enumerate()].count(probe)
        except BaseException as exc:
            outcome["error"] = exc

    with suspended(rs.replicas[1].pid()):
        reader = threading.Thread(target=reads_while_hung)
        reader.start()
        reader.join(30)
        assert not reader.is_alive(), "a routed read hung with the replica"
    reader.join(60)
    assert "error" not in outcome, outcome
    assert outcome["servers"] == ["replica0"] * 4
    assert router.routed_replicas == [5, 1]
    assert outcome["probes"] == 1  # the hung probe is not repeated
    # one wait of probe_timeout (1 s) in all, then none: bounded, with room for a busy machine
    assert outcome["seconds"] < 1 + 5
    until(lambda: router.replica_available(1), "replica1 is available again", REPLICA_WAIT)
    assert sorted(_read(router)[0] for _ in range(2)) == ["replica0", "replica1"]


ORPHAN_SCRIPT = """
import json, time
from course_lib.db.lesson.replicas import ReplicaSet
from course_lib.services.embedded import find_postgres_bin_dir
rs = ReplicaSet.start(replicas=2)
print(json.dumps({"pids": rs.pids(), "root": str(rs.root)}), flush=True)
time.sleep(120)
"""


def test_the_reaper_stops_every_replica_of_a_program_killed_outright() -> None:
    program = subprocess.Popen(
        [sys.executable, "-c", ORPHAN_SCRIPT], stdout=subprocess.PIPE, text=True
    )
    seen: dict[str, Any] = {}
    try:
        seen = json.loads(program.stdout.readline())  # type: ignore[union-attr]
        assert len(seen["pids"]) >= 6 and all(running(pid) for pid in seen["pids"])
        program.kill()  # no atexit, no context manager
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
            ReplicaSet(Path(seen["root"]), find_postgres_bin_dir()).stop()


def test_bad_arguments_are_refused(rs: ReplicaSet) -> None:
    primary, (first, second) = rs.engine("primary"), rs.replica_engines()
    with pytest.raises(ValueError, match="replicas"):
        db.Router(primary)
    with pytest.raises(ValueError, match="replicas"):
        db.Router(primary, first, first)
    with pytest.raises(ValueError, match="replicas"):
        db.Router(primary, first, primary)
    with pytest.raises(TypeError, match="replicas"):
        db.Router(primary, first, "postgresql://")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_lag"):
        db.Router(primary, first, second, max_lag=-1)
    with pytest.raises(TypeError, match="max_lag_bytes"):
        db.Router(primary, first, second, max_lag_bytes=1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="pins"):
        db.Router(primary, first, pins={})  # type: ignore[arg-type]
    router = db.Router(primary, first, second)
    try:
        with pytest.raises(ValueError, match="index"):
            router.replayed_lsn(2)
    finally:
        router.dispose()
    with pytest.raises(ValueError, match="replicas"):
        ReplicaSet.start(replicas=0)
    with pytest.raises(ValueError, match="replicas"):
        ReplicaSet.start(replicas=9)
    with pytest.raises(TypeError, match="replicas"):
        ReplicaSet.start(replicas=2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="apply_delay"):
        ReplicaSet.start(replicas=2, apply_delay=[1.0])
    with pytest.raises(ValueError, match="apply_delay"):
        ReplicaSet.start(replicas=2, apply_delay=[1.0, -1])
    with pytest.raises(TypeError, match="apply_delay"):
        ReplicaSet.start(replicas=2, apply_delay="1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="index"):
        rs.stop_replica(index=2)
    with pytest.raises(ValueError, match="max_lag"):
        two_replicas_demo(rs, max_lag=DELAY)
    with pytest.raises(TypeError, match="rs"):
        two_replicas_demo("rs")  # type: ignore[arg-type]


@pytest.mark.parametrize("own_set", [False, True], ids=["module set", "own set"])
def test_the_lesson_demo_shows_each_rule(rs: ReplicaSet, own_set: bool) -> None:
    if own_set:
        reads = two_replicas_demo(apply_delay=1.0, max_lag=0.5, every_s=0.05)
    else:
        reads = two_replicas_demo(rs, max_lag=0.5, every_s=0.05)
        until(lambda: rs.streaming_replicas() == 2, "replica0 streams again", REPLICA_WAIT)
    phase = {name: rows for name, rows in reads.groupby("phase", sort=False)}
    assert list(phase["caught up"].went_to) == ["replica0", "replica1"] * 3
    wrote = phase["alice wrote"]
    alice, bob = wrote[wrote.client == "alice"], wrote[wrote.client == "bob"]
    assert list(alice.went_to) == ["replica0"] * 4 and set(alice.saw) == {"Alice v2"}
    assert "primary" not in set(bob.went_to) and "replica1" in set(bob.went_to)
    assert set(bob[bob.went_to == "replica1"].saw) - {"Alice v2"}  # stale for bob only
    assert (wrote.lag_bytes_replica1 > 0).all()
    capped = phase["max_lag"]
    over = capped[capped.lag_ms_replica1 > 500]
    assert len(over) >= 1 and "primary" not in set(capped.went_to)
    # over max_lag before the read: left out, unless it replayed the write in between
    assert ((over.went_to == "replica0") | (over.saw == "Carol v2")).all()
    # replica1 has replayed it: both take turns again, and both return the write
    assert sorted(capped.went_to[-2:]) == ["replica0", "replica1"]
    assert set(capped.saw[-2:]) == {"Carol v2"}
    assert list(phase["no replica has it"].went_to) == ["primary", "replica1"]
    assert set(phase["no replica has it"].saw) == {"Alice v3"}


def test_replay_paused_holds_what_arrives_until_the_block_ends(
    rs: ReplicaSet, router: db.Router
) -> None:
    replica0 = rs.engine("replica", 0)

    def received() -> int:
        with replica0.connect() as conn:
            lsn = conn.execute(select(func.pg_last_wal_receive_lsn())).scalar_one()
        return db.parse_lsn(lsn)

    with rs.replay_paused(index=0):
        lsn = _write(router, None, 5, "paused")
        until(
            lambda: received() >= lsn, "the WAL reaches replica0", REPLICA_WAIT
        )  # the WAL is on replica0...
        assert (router.replayed_lsn(0) or 0) < lsn  # ...and not applied
        assert _read(router, None, 5) != ("replica0", "paused")
    until(
        lambda: (router.replayed_lsn(0) or 0) >= lsn, "replica0 replays on resuming", REPLICA_WAIT
    )
