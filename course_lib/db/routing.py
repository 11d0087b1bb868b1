"""Reads to replicas, writes to the primary, and every client reads its own writes.

A :class:`Router` holds a primary engine and one or more replica engines;
:meth:`Router.session` gives a :class:`RoutingSession`, a SQLAlchemy ``Session`` whose
``get_bind`` picks the engine per statement:

- writes (flushes, ``INSERT``/``UPDATE``/``DELETE``, ``SELECT ... FOR UPDATE``, raw
  ``text()``) go to the primary, and so does every read of a session that has written in its
  current transaction (its uncommitted rows exist only there);
- other reads are spread over the **usable** replicas in round robin: each read goes to the
  next usable replica after the one the previous read used, so with every replica usable
  they take turns exactly. A replica is usable when it answered its last probe and, if the
  router was given ``max_lag`` (seconds) or ``max_lag_bytes``, its replay lag is within
  them (a replica over the limit is left out until a probe sees it back within); with no
  usable replica, reads go to the primary;
- a **pinned** client reads only from a usable replica that has replayed its LSN: after a
  commit that wrote, the primary's WAL position (LSN, ``pg_current_wal_lsn()``) is recorded
  for that client, and its reads go to the replicas whose ``pg_last_wal_replay_lsn()`` has
  reached it (in round robin among them), to the primary only when none has. This is
  GitLab's database load balancer rule: one caught-up replica is enough to read from, so a
  write does not send all of that client's reads to the primary. The pin is released only
  once *every* replica has replayed it (GitLab fixed releasing it when one had: the next
  read could land on a replica that had not). The pin follows the *client* (any hashable
  id: a user id, a session cookie), not one ``Session`` object; a caller that carries the
  LSN itself (in a cookie or a header) passes it as ``min_lsn`` instead
  (:attr:`RoutingSession.write_lsn` is the token);
- a replica that does not answer is skipped. Each replica's health, replay position and lag
  are probed at most every ``probe_interval`` seconds by one query on a connection of the
  router's own, in a background thread per replica; a read starts the probes it needs
  together and waits for them at most ``probe_timeout`` seconds in all, however many
  replicas there are: a replica that hangs (a stopped process, a full disk) delays reads by
  at most ``probe_timeout``; while its probe hangs no other is started for it and reads skip
  it without waiting (until a probe answers again), so a hung replica holds at most one
  probe thread and one connection. A read routed to a replica just before it stopped
  answering (at most ``probe_interval`` earlier) waits for it like any query, and one routed
  to a replica that died fails once with the driver's error.

Replay lag, per replica, as the router measures it (:meth:`Router.replica_status`): in bytes,
the WAL the replica has received, or the primary was seen to write (the router's own commits
and :meth:`Router.primary_lsn`), that it has not replayed; in seconds, 0 when nothing is
pending, else how long ago the router saw the oldest primary position the replica has not
replayed (exact for the router's own commits, to the time their position was read), and
when the pending WAL is none the router saw (another process wrote it), the time since the
replica last replayed a commit (``now() - pg_last_xact_replay_timestamp()``, what GitLab
measures), an upper bound. An unknown lag counts as over the limit. The router remembers the
positions of its last 4096 commits that some replica has not replayed.

A commit that wrote reads the primary's WAL position on the connection the session already
holds (right after its ``COMMIT``), so pinning never needs a second connection: a session
commits on a pool of one. If that connection breaks between the ``COMMIT`` and the position
read, ``commit()`` still returns (the write is committed), :attr:`RoutingSession.write_lsn`
stays ``None`` and the client is not pinned.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, Select, create_engine, event, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session, SessionTransaction

from course_lib.validation import (
    int_in_range,
    non_negative_int,
    non_negative_number,
    positive_number,
)

__all__ = [
    "Pins",
    "ReplicaStatus",
    "Router",
    "RoutingSession",
    "format_lsn",
    "parse_lsn",
]


def parse_lsn(lsn: str | int) -> int:
    """An LSN such as ``'0/3000148'`` (or already an int) as a byte position."""
    if isinstance(lsn, int) and not isinstance(lsn, bool):
        return non_negative_int("lsn", lsn)
    if not isinstance(lsn, str) or lsn.count("/") != 1:
        raise ValueError(f"lsn must look like 'X/Y' (hex), got {lsn!r}")
    high, low = lsn.split("/")
    return (int(high, 16) << 32) | int(low, 16)


def format_lsn(position: int) -> str:
    """A byte position as PostgreSQL prints an LSN (``'0/3000148'``)."""
    return f"{position >> 32:X}/{position & 0xFFFFFFFF:X}"


class Pins:
    """Per client, the LSN a replica must have replayed before that client reads from it.

    Thread-safe. Kept in process memory here; a service with several processes keeps it
    where they all see it (Redis, the user's session), as GitLab does. It holds only the
    clients whose writes some replica has not replayed yet: every probe forgets the pins
    that every replica has caught up with, so a client that never reads again is not kept
    forever (while a replica is down, the pins written meanwhile wait for it to come back).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lsn: dict[Hashable, int] = {}

    def pin(self, client: Hashable, lsn: int) -> None:
        with self._lock:
            self._lsn[client] = max(lsn, self._lsn.get(client, 0))

    def required(self, client: Hashable) -> int | None:
        with self._lock:
            return self._lsn.get(client)

    def release(self, client: Hashable, replayed: int) -> None:
        """Forget ``client``'s pin if it is at or before ``replayed``."""
        with self._lock:
            if self._lsn.get(client, replayed + 1) <= replayed:
                del self._lsn[client]

    def expire(self, replayed: int) -> None:
        """Forget every pin at or before ``replayed``."""
        with self._lock:
            self._lsn = {client: lsn for client, lsn in self._lsn.items() if lsn > replayed}

    def __len__(self) -> int:
        with self._lock:
            return len(self._lsn)


def _is_plain_read(clause: Any) -> bool:
    return isinstance(clause, Select) and clause._for_update_arg is None


_PROBE = text(
    "SELECT pg_last_wal_replay_lsn()::text, pg_last_wal_receive_lsn()::text,"
    " extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8"
)


@dataclass(frozen=True)
class ReplicaStatus:
    """What the last probe of replica ``index`` saw (see the module for the lag's meaning).

    ``up``: it answered; ``replayed``: its replay LSN (``None`` if down or not a standby);
    ``lag_bytes`` / ``lag_seconds``: ``None`` when unknown; ``usable``: unpinned reads may
    go to it now (up and within ``max_lag`` / ``max_lag_bytes``).
    """

    index: int
    up: bool
    replayed: int | None
    lag_bytes: int | None
    lag_seconds: float | None
    usable: bool


class _Replica:
    """One replica engine, the probe's own pool on it and what its last probe saw (all the
    mutable fields are guarded by the router's lock)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        # The probe's own pool (same connect settings as the replica's): a probe never waits
        # behind the sessions' connections, and sessions never wait behind a hung probe.
        self.probe_engine = create_engine(engine.url, pool=engine.pool.recreate())
        self.probed_at = -float("inf")
        self.up = False
        self.replayed: int | None = None
        self.received: int | None = None
        self.since_replay: float | None = None  # seconds since its last replayed commit
        self.probe_done: threading.Event | None = None  # set while a probe runs
        self.probe_deadline = 0.0


class Router:
    """Routes the statements of its sessions between ``primary`` and ``replicas`` (see the
    module for the rules and guarantees).

    ``Router(primary, replica_a, replica_b, ...)``: one or more replica engines, all
    distinct and none the primary. ``probe_interval`` (seconds, default 1) is how old a
    replica's probe may be before a read probes again; ``probe_timeout`` (seconds, default
    1) is how long a read waits for the probes in all. ``max_lag`` (seconds) and
    ``max_lag_bytes``, each optional, leave out of the rotation a replica whose replay lag
    exceeds them. :attr:`routed` counts reads and writes by ``"primary"`` / ``"replica"``
    (all replicas), :attr:`routed_replicas` the reads per replica. Call :meth:`dispose` when
    done: it closes the probes' connections (the engines stay the caller's).
    """

    def __init__(
        self,
        primary: Engine,
        *replicas: Engine,
        probe_interval: float = 1.0,
        probe_timeout: float = 1.0,
        max_lag: float | None = None,
        max_lag_bytes: int | None = None,
        pins: Pins | None = None,
    ) -> None:
        if not isinstance(primary, Engine):
            raise TypeError(f"primary must be an Engine, got {type(primary).__name__}")
        if not replicas:
            raise ValueError("replicas: give at least one replica engine")
        for engine in replicas:
            if not isinstance(engine, Engine):
                raise TypeError(f"replicas must be Engines, got {type(engine).__name__}")
        if len({id(engine) for engine in replicas}) != len(replicas) or primary in replicas:
            raise ValueError("replicas must be distinct engines, none of them the primary")
        if pins is not None and not isinstance(pins, Pins):
            raise TypeError(f"pins must be a Pins, got {type(pins).__name__}")
        self.primary = primary
        self.replicas = replicas
        self.probe_interval = non_negative_number("probe_interval", probe_interval)
        self.probe_timeout = positive_number("probe_timeout", probe_timeout)
        self.max_lag = None if max_lag is None else non_negative_number("max_lag", max_lag)
        self.max_lag_bytes = (
            None if max_lag_bytes is None else non_negative_int("max_lag_bytes", max_lag_bytes)
        )
        self.pins = pins if pins is not None else Pins()
        self._replicas = [_Replica(engine) for engine in replicas]
        self._lock = threading.Lock()
        self._next = 0  # round robin: the first replica the next read tries
        # (LSN, when seen) of the primary positions some replica has not replayed, in order
        self._seen: deque[tuple[int, float]] = deque(maxlen=4096)
        self.routed = {"primary": 0, "replica": 0}
        self.routed_replicas = [0] * len(replicas)

    @property
    def replica(self) -> Engine:
        """The first replica engine (the only one of a one-replica router)."""
        return self.replicas[0]

    def session(
        self, client: Hashable | None = None, *, min_lsn: str | int | None = None, **kwargs: Any
    ) -> RoutingSession:
        """A routing session for ``client`` (pinned by id) and/or a carried ``min_lsn``."""
        return RoutingSession(self, client=client, min_lsn=min_lsn, **kwargs)

    def dispose(self) -> None:
        """Close the probes' pooled connections (a probe still hung keeps its own)."""
        for replica in self._replicas:
            replica.probe_engine.dispose()

    def saw_primary_lsn(self, lsn: int) -> None:
        """Record a primary WAL position (a commit's): the byte lag is measured against the
        highest one seen."""
        with self._lock:
            if not self._seen or lsn > self._seen[-1][0]:
                self._seen.append((lsn, time.monotonic()))

    def primary_lsn(self) -> int:
        """The primary's current WAL write position (a connection from the primary's pool)."""
        with self.primary.connect() as conn:
            lsn = parse_lsn(conn.execute(text("SELECT pg_current_wal_lsn()::text")).scalar_one())
        self.saw_primary_lsn(lsn)
        return lsn

    # -- probes ------------------------------------------------------------------------------

    def _probe(self, replica: _Replica, done: threading.Event) -> None:
        """Body of a probe thread: one query for "up?", "replayed and received how far?" and
        "since when no commit replayed?"."""
        try:
            with replica.probe_engine.connect() as conn:
                replayed, received, since = conn.execute(_PROBE).one()
            up = True
        except (DBAPIError, PoolTimeout):
            up, replayed, received, since = False, None, None, None
        with self._lock:
            replica.up = up
            replica.replayed = None if replayed is None else parse_lsn(replayed)
            replica.received = None if received is None else parse_lsn(received)
            replica.since_replay = since
            replica.probed_at = time.monotonic()
            replica.probe_done = None
            everywhere = self._replayed_everywhere()
            while everywhere is not None and self._seen and self._seen[0][0] <= everywhere:
                self._seen.popleft()  # replayed everywhere: no lag left to measure from it
        if everywhere is not None:
            self.pins.expire(everywhere)
        done.set()

    def _replayed_everywhere(self) -> int | None:
        """The LSN every replica has replayed (``None`` while one is down or unknown); call
        with the lock held."""
        replayed = [replica.replayed for replica in self._replicas]
        return None if None in replayed else min(replayed)  # type: ignore[type-var]

    def _refresh(self, max_age: float) -> None:
        """Make every replica's state at most ``max_age`` seconds old: start the probes that
        are due (one at a time per replica) and wait for them together, each until its own
        deadline, at most ``probe_timeout`` after its probe started, so never more than
        ``probe_timeout`` in all; a replica whose probe is still out then is down until a
        probe answers."""
        waits = []
        with self._lock:
            now = time.monotonic()
            for index, replica in enumerate(self._replicas):
                if now - replica.probed_at <= max_age:
                    continue
                if replica.probe_done is None:
                    replica.probe_done = threading.Event()
                    replica.probe_deadline = now + self.probe_timeout
                    threading.Thread(
                        target=self._probe,
                        args=(replica, replica.probe_done),
                        name=f"replica-probe-{id(self):x}-{index}",
                        daemon=True,
                    ).start()
                waits.append((replica, replica.probe_done, replica.probe_deadline))
        for replica, done, deadline in waits:
            if not done.wait(max(0.0, deadline - time.monotonic())):
                with self._lock:
                    if replica.probe_done is done:  # still no answer: down until one answers
                        replica.up, replica.probed_at = False, time.monotonic()

    def _status(self, index: int, now: float) -> ReplicaStatus:
        """Replica ``index``'s state as of its last probe; call with the lock held."""
        replica = self._replicas[index]
        lag_bytes = lag_seconds = None
        if replica.up and replica.replayed is not None:
            seen = self._seen[-1][0] if self._seen else 0
            lag_bytes = max(0, max(seen, replica.received or 0) - replica.replayed)
            oldest = next((at for lsn, at in self._seen if lsn > replica.replayed), None)
            if lag_bytes == 0:
                lag_seconds = 0.0
            elif oldest is not None:
                lag_seconds = now - oldest
            elif replica.since_replay is not None:
                lag_seconds = max(0.0, replica.since_replay) + (now - replica.probed_at)
        usable = replica.up and not (
            (self.max_lag is not None and (lag_seconds is None or lag_seconds > self.max_lag))
            or (
                self.max_lag_bytes is not None
                and (lag_bytes is None or lag_bytes > self.max_lag_bytes)
            )
        )
        return ReplicaStatus(index, replica.up, replica.replayed, lag_bytes, lag_seconds, usable)

    def replica_status(self) -> list[ReplicaStatus]:
        """Every replica's state, re-probed if older than ``probe_interval`` (waits at most
        ``probe_timeout``)."""
        self._refresh(self.probe_interval)
        with self._lock:
            now = time.monotonic()
            return [self._status(index, now) for index in range(len(self._replicas))]

    def replica_available(self, index: int | None = None) -> bool:
        """Whether replica ``index`` (default: any replica) answered its last probe
        (re-probed every ``probe_interval``; waits at most ``probe_timeout``)."""
        self._refresh(self.probe_interval)
        with self._lock:
            if index is None:
                return any(replica.up for replica in self._replicas)
            return self._replicas[self._index(index)].up

    def replayed_lsn(self, index: int = 0) -> int | None:
        """How far replica ``index`` has replayed the primary's WAL, from a new probe (waits
        at most ``probe_timeout``); ``None`` if it does not answer or is not a standby."""
        index = self._index(index)
        self._refresh(0.0)
        with self._lock:
            replica = self._replicas[index]
            return replica.replayed if replica.up else None

    def _index(self, index: int) -> int:
        """``index`` checked: a replica's position among the router's replicas."""
        return int_in_range("index", index, 0, len(self._replicas) - 1)

    # -- routing -----------------------------------------------------------------------------

    def write_engine(self) -> Engine:
        """Where a write (or a read of a transaction that wrote) goes: the primary; counted."""
        with self._lock:
            self.routed["primary"] += 1
        return self.primary

    def _choose(self, required: int | None) -> int | None:
        """The next usable replica in round robin that has replayed ``required``, counted
        (``None``: none); call with the lock held."""
        now = time.monotonic()
        count = len(self._replicas)
        for step in range(count):
            index = (self._next + step) % count
            status = self._status(index, now)
            if status.usable and (
                required is None or (status.replayed is not None and status.replayed >= required)
            ):
                self._next = (index + 1) % count
                self.routed["replica"] += 1
                self.routed_replicas[index] += 1
                return index
        return None

    def read_engine(self, client: Hashable | None, min_lsn: int | None) -> Engine:
        """Where a plain read of ``client`` goes now (see the module); counted."""
        required = max(
            (lsn for lsn in (min_lsn, self.pins.required(client)) if lsn is not None), default=None
        )
        asked = time.monotonic()
        self._refresh(self.probe_interval)
        with self._lock:
            chosen = self._choose(required)
            retry = chosen is None and required is not None
            retry = retry and any(replica.up for replica in self._replicas)
        if retry:  # the last probes saw every live replica behind this client: ask again, once
            self._refresh(time.monotonic() - asked)
            with self._lock:
                chosen = self._choose(required)
        with self._lock:
            everywhere = self._replayed_everywhere()
            if chosen is None:
                self.routed["primary"] += 1
        if client is not None and everywhere is not None:
            self.pins.release(client, everywhere)
        return self.primary if chosen is None else self.replicas[chosen]


class RoutingSession(Session):
    """A ``Session`` whose statements go to the router's primary or replicas (see module)."""

    def __init__(
        self,
        router: Router,
        *,
        client: Hashable | None = None,
        min_lsn: str | int | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(router, Router):
            raise TypeError(f"router must be a Router, got {type(router).__name__}")
        try:
            hash(client)
        except TypeError:
            kind = type(client).__name__
            raise TypeError(f"client must be hashable (an id), got {kind}") from None
        super().__init__(**kwargs)
        self.router = router
        self.client = client
        self.min_lsn = None if min_lsn is None else parse_lsn(min_lsn)
        self.write_lsn: str | None = None  # token of this session's last committed write
        self._wrote = False
        self._primary: Connection | None = None  # this transaction's primary connection
        event.listen(self, "after_begin", self._after_begin)
        event.listen(self, "after_commit", self._after_commit)
        event.listen(self, "after_transaction_end", self._after_transaction_end)

    def get_bind(self, mapper: Any = None, clause: Any = None, **kwargs: Any) -> Engine:
        if self._flushing or self._wrote or not _is_plain_read(clause):
            self._wrote = True
            return self.router.write_engine()
        return self.router.read_engine(self.client, self.min_lsn)

    def _after_begin(self, session: Session, txn: SessionTransaction, conn: Connection) -> None:
        if conn.engine is self.router.primary:
            self._primary = conn

    def _after_commit(self, session: Session) -> None:
        # A savepoint's release also fires this; the outer transaction is still open then.
        if not self._wrote or self._primary is None or session.in_nested_transaction():
            return
        try:
            # The connection that sent the COMMIT: the commit record is at or before this.
            value = self._primary.exec_driver_sql("SELECT pg_current_wal_lsn()::text")
            lsn = parse_lsn(value.scalar_one())
        except DBAPIError:
            return  # committed all the same: no position, no pin (module docstring)
        self.write_lsn = format_lsn(lsn)
        self.min_lsn = max(lsn, self.min_lsn or 0)
        self.router.saw_primary_lsn(lsn)
        if self.client is not None:
            self.router.pins.pin(self.client, lsn)

    def _after_transaction_end(self, session: Session, txn: SessionTransaction) -> None:
        if txn.parent is None:  # the outermost transaction (not a savepoint, not a flush's)
            self._wrote = False
            self._primary = None
