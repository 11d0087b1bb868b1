"""Notebook 04, section 4: reads over two real replicas that apply at different delays.

:func:`two_replicas_demo` starts a primary and two streaming replicas (``replica0`` applies at
once, ``replica1`` each commit ``apply_delay`` seconds late), routes reads through
:class:`course_lib.db.Router` and returns one row per read: which server answered (as it names
itself, ``current_setting('cluster_name')``), what it returned, and the lag the router
measured for each replica just before the read.
"""

from __future__ import annotations

import time
from collections.abc import Hashable
from typing import Any

import pandas as pd
from sqlalchemy import func, select, update

from course_lib.db.lesson.replicas import ReplicaSet
from course_lib.db.models import User
from course_lib.db.populate import populate
from course_lib.db.routing import Router, parse_lsn
from course_lib.validation import positive_number

__all__ = ["two_replicas_demo"]

_USER = 11  # the row every phase writes and reads


def _read(router: Router, phase: str, client: Hashable | None, origin: float) -> dict[str, Any]:
    status = router.replica_status()
    query = select(func.current_setting("cluster_name"), User.name).where(User.id == _USER)
    with router.session(client) as session:
        server, name = session.execute(query).one()
    row: dict[str, Any] = {
        "phase": phase,
        "t_s": time.monotonic() - origin,
        "client": client,
        "went_to": server,
        "saw": name,
    }
    for replica in status:
        lag = replica.lag_seconds
        row[f"lag_ms_replica{replica.index}"] = None if lag is None else lag * 1e3
        row[f"lag_bytes_replica{replica.index}"] = replica.lag_bytes
    return row


def _write(router: Router, client: Hashable, name: str) -> int:
    with router.session(client) as session:
        session.execute(update(User).where(User.id == _USER).values(name=name))
        session.commit()
        if session.write_lsn is None:
            raise RuntimeError("the write's position could not be read: nothing is pinned")
        return parse_lsn(session.write_lsn)


def _until(predicate: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {timeout:.0f} s")
        time.sleep(0.01)


def two_replicas_demo(
    rs: ReplicaSet | None = None,
    *,
    apply_delay: float = 1.0,
    max_lag: float = 0.5,
    every_s: float = 0.1,
) -> pd.DataFrame:
    """Four phases on one primary and two replicas (``replica1`` ``apply_delay`` s late),
    one row per read (columns: phase, t_s since the phase began, client, went_to, saw,
    lag_ms_replica{0,1}, lag_bytes_replica{0,1}):

    1. ``caught up``: 6 unpinned reads take turns over the two replicas;
    2. ``alice wrote``: alice renames the user; once replica0 has replayed it (replica1,
       its replay paused for the phase, has not), alice and bob read 4 times each, in
       turn: alice only from replica0 (never the primary), and sees her write; bob, not
       pinned, gets the next replica of the round robin, replica1 here (alice's read took
       replica0), and sees the old name;
    3. ``max_lag``: a router with ``max_lag`` seconds; after a write, an unpinned client reads
       every ``every_s`` s until replica1 has replayed it: replica1 is left out while its lag
       is over ``max_lag`` and used again once it catches up;
    4. ``no replica has it``: replica0 stopped, alice writes again: her read goes to the
       primary (replica1, paused, is behind), then, once replica1 has replayed it, to
       replica1.

    Without ``rs`` it starts (and stops) its own set of 20 users. Given ``rs``, a populated
    set of exactly two replicas, replica0 without delay and replica1 with one over
    ``max_lag`` (``apply_delay`` is then rs's), it uses that one and starts replica0 again
    at the end; it renames user 11.
    """
    max_lag = positive_number("max_lag", max_lag)
    positive_number("every_s", every_s)
    if rs is None:
        apply_delay = positive_number("apply_delay", apply_delay)
    elif not isinstance(rs, ReplicaSet):
        raise TypeError(f"rs must be a ReplicaSet, got {type(rs).__name__}")
    elif len(rs.apply_delays) != 2 or rs.apply_delays[0] is not None or not rs.apply_delays[1]:
        raise ValueError(
            f"rs must have two replicas, replica0 without delay, got delays {rs.apply_delays}"
        )
    else:
        apply_delay = rs.apply_delays[1]  # type: ignore[assignment]
    if max_lag >= apply_delay:
        raise ValueError(f"max_lag must be < apply_delay to be seen at work, got {max_lag}")
    if rs is not None:
        return _phases(rs, max_lag, every_s)
    with ReplicaSet.start(replicas=2, apply_delay=[None, apply_delay]) as own:
        populate(own.engine("primary"), users=20, posts_per_user=1, seed=1)
        return _phases(own, max_lag, every_s)


def _phases(rs: ReplicaSet, max_lag: float, every_s: float) -> pd.DataFrame:
    rows: list[dict[str, Any]] = []
    rs.wait_for_replay()
    router = Router(rs.engine("primary"), *rs.replica_engines(), probe_interval=0)
    capped = Router(rs.engine("primary"), *rs.replica_engines(), probe_interval=0, max_lag=max_lag)
    try:
        origin = time.monotonic()
        rows += [_read(router, "caught up", "bob", origin) for _ in range(6)]

        # replica1's delay alone would hold the write back only while the phase is quicker
        # than the delay; paused, it holds it back however slow the machine is.
        with rs.replay_paused(index=1):
            lsn = _write(router, "alice", "Alice v2")
            origin = time.monotonic()
            _until(lambda: (router.replayed_lsn(0) or 0) >= lsn, "replica0 did not replay")
            for _ in range(4):
                rows += [_read(router, "alice wrote", c, origin) for c in ("alice", "bob")]

        rs.wait_for_replay()
        lsn = _write(capped, "carol", "Carol v2")
        origin = time.monotonic()
        while (replayed := capped.replayed_lsn(1)) is None or replayed < lsn:
            rows.append(_read(capped, "max_lag", None, origin))
            time.sleep(every_s)
        rows += [_read(capped, "max_lag", None, origin) for _ in range(2)]

        rs.stop_replica(index=0)
        try:
            with rs.replay_paused(index=1):
                _write(router, "alice", "Alice v3")
                origin = time.monotonic()
                rows.append(_read(router, "no replica has it", "alice", origin))
            rs.wait_for_replay(index=1)
            rows.append(_read(router, "no replica has it", "alice", origin))
        finally:
            rs.start_replica(index=0)
    finally:
        router.dispose()
        capped.dispose()
    return pd.DataFrame(rows)
