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
- a replica that does not answer is skipped: reads go to the primary. Health is probed with
  a fresh checkout at most every ``probe_interval`` seconds, so a replica that dies is noticed
  at most that late (a read routed in between fails once with the driver's error).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Hashable
from typing import Any

from sqlalchemy import Engine, Select, event, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from course_lib.validation import non_negative_number

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
    where they all see it (Redis, the user's session), as GitLab does.
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

    def __len__(self) -> int:
        with self._lock:
            return len(self._lsn)


def _is_plain_read(clause: Any) -> bool:
    return isinstance(clause, Select) and clause._for_update_arg is None


class Router:
    """Routes the statements of its sessions between ``primary`` and ``replica``."""

    def __init__(
        self,
        primary: Engine,
        replica: Engine,
        *,
        probe_interval: float = 1.0,
        pins: Pins | None = None,
    ) -> None:
        if not isinstance(primary, Engine):
            raise TypeError(f"primary must be an Engine, got {type(primary).__name__}")
        if not isinstance(replica, Engine):
            raise TypeError(f"replica must be an Engine, got {type(replica).__name__}")
        self.primary = primary
        self.replica = replica
        self.probe_interval = non_negative_number("probe_interval", probe_interval)
        self.pins = pins if pins is not None else Pins()
        self._lock = threading.Lock()
        self._probed_at = -float("inf")
        self._replica_up = False
        self.routed = {"primary": 0, "replica": 0}

    def session(
        self, client: Hashable | None = None, *, min_lsn: str | int | None = None, **kwargs: Any
    ) -> RoutingSession:
        """A routing session for ``client`` (pinned by id) and/or a carried ``min_lsn``."""
        return RoutingSession(self, client=client, min_lsn=min_lsn, **kwargs)

    def primary_lsn(self) -> int:
        """The primary's current WAL write position."""
        with self.primary.connect() as conn:
            return parse_lsn(conn.execute(text("SELECT pg_current_wal_lsn()::text")).scalar_one())

    def replica_available(self) -> bool:
        """Whether the replica answered its last probe (re-probed every ``probe_interval``)."""
        with self._lock:
            if time.monotonic() - self._probed_at < self.probe_interval:
                return self._replica_up
        try:
            with self.replica.connect() as conn:
                conn.execute(text("SELECT 1"))
            up = True
        except DBAPIError:
            up = False
        with self._lock:
            self._probed_at, self._replica_up = time.monotonic(), up
        return up

    def replayed_lsn(self) -> int | None:
        """How far the replica has replayed the primary's WAL; ``None`` if it is down."""
        try:
            with self.replica.connect() as conn:
                value = conn.execute(text("SELECT pg_last_wal_replay_lsn()::text")).scalar()
        except DBAPIError:
            with self._lock:
                self._probed_at, self._replica_up = time.monotonic(), False
            return None
        return None if value is None else parse_lsn(value)

    def read_engine(self, client: Hashable | None, min_lsn: int | None) -> Engine:
        """Where a plain read of ``client`` goes now."""
        required = max(
            (lsn for lsn in (min_lsn, self.pins.required(client)) if lsn is not None), default=None
        )
        chosen = self.replica if self.replica_available() else self.primary
        if chosen is self.replica and required is not None:
            replayed = self.replayed_lsn()
            if replayed is None or replayed < required:
                chosen = self.primary
            elif client is not None:
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
        event.listen(self, "after_commit", self._after_commit)
        event.listen(self, "after_rollback", self._after_rollback)

    def get_bind(self, mapper: Any = None, clause: Any = None, **kwargs: Any) -> Engine:
        if self._flushing or self._wrote or not _is_plain_read(clause):
            self._wrote = True
            with self.router._lock:
                self.router.routed["primary"] += 1
            return self.router.primary
        return self.router.read_engine(self.client, self.min_lsn)

    def _after_commit(self, session: Session) -> None:
        if not self._wrote:
            return
        self._wrote = False
        # A fresh connection after COMMIT returned: the commit record is at or before this.
        lsn = self.router.primary_lsn()
        self.write_lsn = format_lsn(lsn)
        self.min_lsn = max(lsn, self.min_lsn or 0)
        if self.client is not None:
            self.router.pins.pin(self.client, lsn)

    def _after_rollback(self, session: Session) -> None:
        self._wrote = False
