"""Reads to a replica, writes to the primary, and every client reads its own writes.

A :class:`Router` holds a primary engine and a replica engine; :meth:`Router.session` gives a
:class:`RoutingSession`, a SQLAlchemy ``Session`` whose ``get_bind`` picks the engine per
statement:

- writes (flushes, ``INSERT``/``UPDATE``/``DELETE``, ``SELECT ... FOR UPDATE``, raw
  ``text()``) go to the primary, and so does every read of a session that has written in its
  current transaction (its uncommitted rows exist only there);
- other reads go to the replica, unless the client is **pinned**: after a commit that wrote,
  the primary's WAL position (LSN, ``pg_current_wal_lsn()``) is recorded for that client, and
  its reads stay on the primary until the replica has replayed that LSN
  (``pg_last_wal_replay_lsn()``), then the pin is released. This is what GitLab's database
  load balancer does. The pin follows the *client* (any hashable id: a user id, a session
  cookie), not one ``Session`` object; a caller that carries the LSN itself (in a cookie or a
  header) passes it as ``min_lsn`` instead (:attr:`RoutingSession.write_lsn` is the token);
- a replica that does not answer is skipped: reads go to the primary. Its health (and how far
  it has replayed) is probed at most every ``probe_interval`` seconds by one query on a
  connection of the router's own, in a background thread that the read waits for at most
  ``probe_timeout`` seconds: a replica that hangs (a stopped process, a full disk) delays
  reads by at most ``probe_timeout``; while its probe hangs no other is started and reads go
  to the primary without waiting (until a probe answers again), so a hung replica holds at
  most one probe thread and one connection. A read routed to the replica just before it
  stopped answering (at most ``probe_interval`` earlier) waits for it like any query, and one
  routed to a replica that died fails once with the driver's error.

A commit that wrote reads the primary's WAL position on the connection the session already
holds (right after its ``COMMIT``), so pinning never needs a second connection: a session
commits on a pool of one. If that connection breaks between the ``COMMIT`` and the position
read, ``commit()`` still returns (the write is committed), :attr:`RoutingSession.write_lsn`
stays ``None`` and the client is not pinned.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Hashable
from typing import Any

from sqlalchemy import Connection, Engine, Select, create_engine, event, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session, SessionTransaction

from course_lib.validation import non_negative_number, positive_number

__all__ = ["Pins", "Router", "RoutingSession", "format_lsn", "parse_lsn"]


def parse_lsn(lsn: str | int) -> int:
    """An LSN such as ``'0/3000148'`` (or already an int) as a byte position."""
    if isinstance(lsn, int) and not isinstance(lsn, bool):
        if lsn < 0:
            raise ValueError(f"lsn must be >= 0, got {lsn}")
        return lsn
    if not isinstance(lsn, str) or lsn.count("/") != 1:
        raise ValueError(f"lsn must look like 'X/Y' (hex), got {lsn!r}")
    high, low = lsn.split("/")
    return (int(high, 16) << 32) | int(low, 16)


def format_lsn(position: int) -> str:
    """A byte position as PostgreSQL prints an LSN (``'0/3000148'``)."""
    return f"{position >> 32:X}/{position & 0xFFFFFFFF:X}"


class Pins:
    """Per client, the LSN the replica must have replayed before that client reads from it.

    Thread-safe. Kept in process memory here; a service with several processes keeps it
    where they all see it (Redis, the user's session), as GitLab does. It holds only the
    clients whose writes the replica has not replayed yet: every probe of the replica forgets
    the pins it has caught up with, so a client that never reads again is not kept forever.
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
        """Forget ``client``'s pin if the replica has replayed up to ``replayed``."""
        with self._lock:
            if self._lsn.get(client, replayed + 1) <= replayed:
                del self._lsn[client]

    def expire(self, replayed: int) -> None:
        """Forget every pin the replica has replayed (``<= replayed``)."""
        with self._lock:
            self._lsn = {client: lsn for client, lsn in self._lsn.items() if lsn > replayed}

    def __len__(self) -> int:
        with self._lock:
            return len(self._lsn)


def _is_plain_read(clause: Any) -> bool:
    return isinstance(clause, Select) and clause._for_update_arg is None


class Router:
    """Routes the statements of its sessions between ``primary`` and ``replica``.

    ``probe_interval`` (seconds, default 1) is how old a probe of the replica may be before
    a read probes again; ``probe_timeout`` (seconds, default 1) is how long a read waits for
    a probe (see the module). Call :meth:`dispose` when done: it closes the probe's
    connection (the two engines stay the caller's).
    """

    def __init__(
        self,
        primary: Engine,
        replica: Engine,
        *,
        probe_interval: float = 1.0,
        probe_timeout: float = 1.0,
        pins: Pins | None = None,
    ) -> None:
        if not isinstance(primary, Engine):
            raise TypeError(f"primary must be an Engine, got {type(primary).__name__}")
        if not isinstance(replica, Engine):
            raise TypeError(f"replica must be an Engine, got {type(replica).__name__}")
        self.primary = primary
        self.replica = replica
        self.probe_interval = non_negative_number("probe_interval", probe_interval)
        self.probe_timeout = positive_number("probe_timeout", probe_timeout)
        self.pins = pins if pins is not None else Pins()
        # The probe's own pool (same connect settings as the replica's): a probe never waits
        # behind the sessions' connections, and sessions never wait behind a hung probe.
        self._probe_engine = create_engine(replica.url, pool=replica.pool.recreate())
        self._lock = threading.Lock()
        self._probed_at = -float("inf")
        self._replica_up = False
        self._replayed: int | None = None
        self._probe_done: threading.Event | None = None  # set while a probe runs
        self._probe_deadline = 0.0
        self.routed = {"primary": 0, "replica": 0}

    def session(
        self, client: Hashable | None = None, *, min_lsn: str | int | None = None, **kwargs: Any
    ) -> RoutingSession:
        """A routing session for ``client`` (pinned by id) and/or a carried ``min_lsn``."""
        return RoutingSession(self, client=client, min_lsn=min_lsn, **kwargs)

    def dispose(self) -> None:
        """Close the probe's pooled connection (a probe still hung keeps its own)."""
        self._probe_engine.dispose()

    def primary_lsn(self) -> int:
        """The primary's current WAL write position (a connection from the primary's pool)."""
        with self.primary.connect() as conn:
            return parse_lsn(conn.execute(text("SELECT pg_current_wal_lsn()::text")).scalar_one())

    def _probe(self, done: threading.Event) -> None:
        """Body of the probe thread: one query that answers both "up?" and "replayed how far?"."""
        try:
            with self._probe_engine.connect() as conn:
                value = conn.execute(text("SELECT pg_last_wal_replay_lsn()::text")).scalar()
            up, replayed = True, None if value is None else parse_lsn(value)
        except (DBAPIError, PoolTimeout):
            up, replayed = False, None
        if replayed is not None:
            self.pins.expire(replayed)
        with self._lock:
            self._replica_up, self._replayed = up, replayed
            self._probed_at = time.monotonic()
            self._probe_done = None
        done.set()

    def _replica_state(self, max_age: float) -> tuple[bool, int | None]:
        """(up, replayed LSN) from a probe at most ``max_age`` seconds old, else from a new
        one (or the one running), waited for until its deadline: one probe at a time."""
        with self._lock:
            if time.monotonic() - self._probed_at <= max_age:
                return self._replica_up, self._replayed
            if self._probe_done is None:
                self._probe_done = threading.Event()
                self._probe_deadline = time.monotonic() + self.probe_timeout
                name = f"replica-probe-{id(self):x}"
                threading.Thread(
                    target=self._probe, args=(self._probe_done,), name=name, daemon=True
                ).start()
            done, deadline = self._probe_done, self._probe_deadline
        if not done.wait(max(0.0, deadline - time.monotonic())):
            with self._lock:
                if self._probe_done is done:  # still no answer: down until a probe answers
                    self._replica_up, self._probed_at = False, time.monotonic()
        with self._lock:
            return self._replica_up, self._replayed

    def replica_available(self) -> bool:
        """Whether the replica answered its last probe (re-probed every ``probe_interval``;
        waits at most ``probe_timeout``)."""
        return self._replica_state(self.probe_interval)[0]

    def replayed_lsn(self) -> int | None:
        """How far the replica has replayed the primary's WAL, from a new probe (waits at
        most ``probe_timeout``); ``None`` if it does not answer or is not a standby."""
        up, replayed = self._replica_state(0.0)
        return replayed if up else None

    def write_engine(self) -> Engine:
        """Where a write (or a read of a transaction that wrote) goes: the primary; counted."""
        with self._lock:
            self.routed["primary"] += 1
        return self.primary

    def read_engine(self, client: Hashable | None, min_lsn: int | None) -> Engine:
        """Where a plain read of ``client`` goes now; counted."""
        required = max(
            (lsn for lsn in (min_lsn, self.pins.required(client)) if lsn is not None), default=None
        )
        asked = time.monotonic()
        up, replayed = self._replica_state(self.probe_interval)
        if up and required is not None and (replayed is None or replayed < required):
            # the last probe saw the replica behind this client: ask again, once
            up, replayed = self._replica_state(time.monotonic() - asked)
        caught_up = required is None or (replayed is not None and replayed >= required)
        chosen = self.replica if up and caught_up else self.primary
        if chosen is self.replica and client is not None and replayed is not None:
            self.pins.release(client, replayed)
        with self._lock:
            self.routed["replica" if chosen is self.replica else "primary"] += 1
        return chosen


class RoutingSession(Session):
    """A ``Session`` whose statements go to the router's primary or replica (see module)."""

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
        if self.client is not None:
            self.router.pins.pin(self.client, lsn)

    def _after_transaction_end(self, session: Session, txn: SessionTransaction) -> None:
        if txn.parent is None:  # the outermost transaction (not a savepoint, not a flush's)
            self._wrote = False
            self._primary = None
