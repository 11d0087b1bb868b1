"""A real PostgreSQL primary with streaming replicas, owned by the course for one block.

Lesson code: it stages replication for notebook 04 and the tests (a service gets its
primary and replicas from its platform, and copies only :class:`course_lib.db.Router`).
Each server is a :class:`course_lib.services.embedded.PostgresServer`, the course's one way
to create, start and stop PostgreSQL; this module adds the replication around them.

``with ReplicaSet.start() as rs:`` runs ``initdb`` for a primary, takes a base backup of it
with ``pg_basebackup -R`` (which also writes ``standby.signal`` and ``primary_conninfo``)
into a second data directory, starts that as a hot standby streaming from the primary, and
waits until the primary reports the replica as ``streaming``. ``replicas=N`` does that N
times: N replicas of the one primary, each with its own data directory and socket, replica
``i`` named ``replica{i}`` (its ``cluster_name``, which ``current_setting('cluster_name')``
returns, and the primary's is ``primary``).

Guarantees:

- Every server listens on Unix sockets only (mode 0700), each in its own folder (mode 0700)
  under a private temporary directory (``/tmp/pc-rs-*``, mode 0700; started by root it
  belongs to the server user and others may pass through it, never list or write it);
  nothing is reachable from the network.
- Binaries: the embedded server's (pgserver bundles ``pg_basebackup``) or the system's, found
  as :func:`course_lib.services.embedded.find_postgres_bin_dir` finds them. Started by root,
  the servers run as the unprivileged ``postgres`` (or ``perfcourse``) user, as the embedded
  server does.
- Leaving the block stops every server, also when the block raises; a server that does not
  stop in time is killed with its children; the directory is removed. A ReplicaSet that the
  program forgets to stop is stopped at interpreter exit. The servers are daemons, so a
  program killed outright (SIGKILL, a kernel restart) could not stop them: a small reaper
  process started with them waits for that program to die and then stops them and removes
  the directory (:func:`course_lib.orphans.watch_parent`).
- ``apply_delay`` (seconds; one number for every replica or one per replica, 0 or ``None``
  for none) sets ``recovery_min_apply_delay`` on the replica: it receives the WAL at once
  but applies each commit that much later, the way to stage replication lag.
"""

from __future__ import annotations

import atexit
import contextlib
import numbers
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Hashable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import psutil
from sqlalchemy import Engine, create_engine, text

from course_lib.db.routing import Router, RoutingSession
from course_lib.orphans import watch_parent
from course_lib.services.embedded import (
    PostgresServer,
    find_postgres_bin_dir,
    make_traversable,
    server_user,
)
from course_lib.services.errors import ServiceError
from course_lib.validation import int_in_range, non_negative_number, one_of, positive_number

__all__ = ["ReplicaSet"]

# A throwaway cluster: no durability, small, enough connections for the notebook's pools.
_SETTINGS = (
    ("full_page_writes", "off"),
    ("shared_buffers", "32MB"),
    ("max_connections", "60"),
    ("wal_level", "replica"),
)
_MAX_REPLICAS = 8  # each costs a server process tree and a base backup


def _url(socket_dir: Path) -> str:
    return f"postgresql+psycopg://postgres@/postgres?host={socket_dir}"


def _server(
    root: Path, bin_dir: Path, name: str, sockets: str, settings: tuple[tuple[str, str], ...]
) -> PostgresServer:
    """Server ``name`` of a set in ``root``: data in ``root/name``, socket in ``root/sockets``."""
    return PostgresServer(
        data=root / name,
        socket_dir=root / sockets,
        log=root / f"{name}.log",
        bin_dir=bin_dir,
        settings=(*_SETTINGS, ("cluster_name", name), *settings),
        name=name,
    )


class ReplicaSet:
    """A running primary and its streaming replicas; build it with :meth:`start`.

    ``replicas`` holds the replica servers (``replica`` is the first); ``apply_delays`` the
    delay of each (``None``: none). Built directly, ``ReplicaSet(root, bin_dir)`` only stops
    the servers a set left in ``root`` (the reaper's and a test's clean-up): with
    ``replicas=None`` it finds them from the data directories there.
    """

    def __init__(
        self,
        root: Path,
        bin_dir: Path,
        apply_delay: float | Sequence[float | None] | None = None,
        *,
        replicas: int | None = None,
    ) -> None:
        if replicas is None:  # clean-up of a set left in root: as many as it created
            replicas = max(1, sum(path.is_dir() for path in root.glob("replica[0-9]*")))
        delays = _apply_delays(apply_delay, replicas)
        self.root = root
        self.bin_dir = bin_dir
        self.apply_delays = delays
        senders = (("max_wal_senders", str(replicas + 3)),)  # a standby needs >= its primary's
        self.primary = _server(root, bin_dir, "primary", "ps", senders)
        self.replicas = [
            _server(
                root,
                bin_dir,
                f"replica{index}",
                f"r{index}s",
                (*senders, ("recovery_min_apply_delay", f"{int(delay * 1000)}ms"))
                if delay
                else senders,
            )
            for index, delay in enumerate(delays)
        ]
        self._engines: dict[tuple[str, int], Engine] = {}
        self._router: Router | None = None
        self._stopped = False
        self._reaper: subprocess.Popen[bytes] | None = None

    @property
    def replica(self) -> PostgresServer:
        """The first replica server."""
        return self.replicas[0]

    @property
    def apply_delay(self) -> float | None:
        """The first replica's apply delay (seconds, ``None``: none)."""
        return self.apply_delays[0]

    # -- lifecycle ---------------------------------------------------------------------------

    @classmethod
    def start(
        cls,
        *,
        replicas: int = 1,
        apply_delay: float | Sequence[float | None] | None = None,
        bin_dir: str | Path | None = None,
        timeout: float = 60.0,
    ) -> ReplicaSet:
        """Create, start and connect a primary and ``replicas`` streaming replicas (1 to 8),
        ``apply_delay`` one number for all or one per replica (see the module); returns once
        the primary streams to all of them (``ServiceError`` after ``timeout`` seconds)."""
        int_in_range("replicas", replicas, 1, _MAX_REPLICAS)
        _apply_delays(apply_delay, replicas)
        positive_number("timeout", timeout)
        binaries = Path(bin_dir) if bin_dir is not None else find_postgres_bin_dir()
        if not (binaries / "pg_basebackup").is_file():
            raise ServiceError(f"no pg_basebackup in {binaries}: a replica cannot be created")
        root = Path(tempfile.mkdtemp(prefix="pc-rs-", dir="/tmp"))
        rs = cls(root, binaries, apply_delay, replicas=replicas)
        atexit.register(rs.stop)
        rs._reaper = subprocess.Popen(
            [sys.executable, "-c", _REAPER, str(root), str(binaries), str(os.getpid())],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # a signal to this program's group leaves it running
        )
        try:
            rs._create(timeout)
        except BaseException:
            rs.stop()
            raise
        return rs

    def _create(self, timeout: float) -> None:
        user = server_user()
        servers = (self.primary, *self.replicas)
        for server in servers:
            server.socket_dir.mkdir(mode=0o700)
        if user is not None:
            make_traversable(self.root)
            make_traversable(self.bin_dir)
            for path in (self.root, *(server.socket_dir for server in servers)):
                os.chown(path, user.pw_uid, user.pw_gid)
        self.primary.initdb(sync=False)
        self.primary.start(timeout)
        deadline = time.monotonic() + timeout
        for replica in self.replicas:
            replica.run(
                f"pg_basebackup of {replica.name}",
                "pg_basebackup", "-D", str(replica.data), "-R", "-X", "stream",
                "-c", "fast", "--no-sync", "-h", str(self.primary.socket_dir), "-U", "postgres",
                timeout=timeout,
            )  # fmt: skip
            replica.start(timeout)
        while self.streaming_replicas() < len(self.replicas):
            if time.monotonic() > deadline:
                raise ServiceError(
                    f"the replicas did not all start streaming within {timeout:.0f} s"
                )
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop every server (replicas first) and remove their directory; idempotent."""
        if self._stopped:
            return
        self._stopped = True
        atexit.unregister(self.stop)
        if self._router is not None:
            self._router.dispose()
        for engine in self._engines.values():
            engine.dispose()
        self._engines.clear()
        try:
            for replica in self.replicas:
                replica.stop()  # a server that does not stop in time is killed
        finally:
            try:
                self.primary.stop()
            finally:
                shutil.rmtree(self.root, ignore_errors=True)
                if self._reaper is not None:  # stopped here: nothing left to reap
                    self._reaper.kill()
                    self._reaper.wait()

    def __enter__(self) -> ReplicaSet:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def stop_replica(self, *, index: int = 0) -> None:
        """Stop replica ``index`` only (its reads then go to the others, or the primary)."""
        self.replicas[self._index(index)].stop()

    def start_replica(self, timeout: float = 60.0, *, index: int = 0) -> None:
        """Start replica ``index`` again after :meth:`stop_replica`."""
        self.replicas[self._index(index)].start(positive_number("timeout", timeout))

    @contextlib.contextmanager
    def replay_paused(self, *, index: int = 0) -> Iterator[None]:
        """Hold replica ``index``'s replay for the block (``pg_wal_replay_pause()``), resumed
        on exit, also on error: WAL still arrives, nothing past the pause is applied, however
        long the block takes. A replica busy replaying a long migration lags like this."""
        with self.engine("replica", index).connect() as conn:
            conn.execute(text("SELECT pg_wal_replay_pause()"))
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_wal_replay_resume()"))

    def restart_primary(self, timeout: float = 60.0) -> None:
        """Stop and start the primary: every connection open to it is broken."""
        timeout = positive_number("timeout", timeout)
        self.primary.stop()
        self.primary.start(timeout)

    def pids(self) -> list[int]:
        """Process ids of every server process running now (postmasters and children)."""
        found: list[int] = []
        for server in (self.primary, *self.replicas):
            pid = server.pid()
            if pid is None:
                continue
            with contextlib.suppress(psutil.Error):
                found += [pid, *(p.pid for p in psutil.Process(pid).children(recursive=True))]
        return found

    def _index(self, index: int) -> int:
        """``index`` checked: a replica's position in the set."""
        return int_in_range("index", index, 0, len(self.replicas) - 1)

    # -- connections -------------------------------------------------------------------------

    @property
    def primary_url(self) -> str:
        return _url(self.primary.socket_dir)

    @property
    def replica_url(self) -> str:
        """The first replica's URL (:meth:`replica_urls` has them all)."""
        return _url(self.replica.socket_dir)

    def replica_urls(self) -> list[str]:
        return [_url(replica.socket_dir) for replica in self.replicas]

    def engine(self, which: str, index: int = 0) -> Engine:
        """The set's own pooled engine (``pool_pre_ping``) on ``"primary"`` or on replica
        ``index`` (``"replica"``)."""
        one_of("which", which, ("primary", "replica"))
        key = (which, 0 if which == "primary" else self._index(index))
        if key not in self._engines:
            server = self.primary if which == "primary" else self.replicas[key[1]]
            self._engines[key] = create_engine(
                _url(server.socket_dir), pool_pre_ping=True, connect_args={"connect_timeout": 5}
            )
        return self._engines[key]

    def replica_engines(self) -> list[Engine]:
        """The set's engine on each replica, in order."""
        return [self.engine("replica", index) for index in range(len(self.replicas))]

    @property
    def router(self) -> Router:
        """The router behind :meth:`session`, over every replica: probes each at most every
        0.2 s."""
        if self._router is None:
            self._router = Router(
                self.engine("primary"), *self.replica_engines(), probe_interval=0.2
            )
        return self._router

    def session(
        self, client: Hashable | None = None, *, min_lsn: str | int | None = None, **kw: Any
    ) -> RoutingSession:
        """A routing session with read-your-writes for ``client`` (see :mod:`.routing`)."""
        return self.router.session(client, min_lsn=min_lsn, **kw)

    def streaming_replicas(self) -> int:
        """How many standbys the primary streams WAL to right now."""
        with self.engine("primary").connect() as conn:
            query = "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'"
            return int(conn.execute(text(query)).scalar_one())

    def lag_bytes(self, index: int = 0) -> int:
        """WAL bytes written on the primary and not yet replayed on replica ``index``
        (``ServiceError`` if it does not answer within the router's probe_timeout)."""
        index = self._index(index)
        written = self.router.primary_lsn()
        replayed = self.router.replayed_lsn(index)
        if replayed is None:
            raise ServiceError(f"replica{index} did not answer its probe: no replay position")
        return max(0, written - replayed)

    def wait_for_replay(self, timeout: float = 30.0, *, index: int | None = None) -> float:
        """Block until replica ``index`` (default: every replica) has replayed everything the
        primary has written so far; return the seconds waited (``TimeoutError`` after
        ``timeout``)."""
        positive_number("timeout", timeout)
        indexes = range(len(self.replicas)) if index is None else [self._index(index)]
        target = self.router.primary_lsn()
        start = time.monotonic()
        for one in indexes:
            while (replayed := self.router.replayed_lsn(one)) is None or replayed < target:
                if time.monotonic() - start > timeout:
                    raise TimeoutError(
                        f"replica{one} did not replay the primary's WAL in {timeout} s"
                    )
                time.sleep(0.01)
        return time.monotonic() - start


def _apply_delays(
    apply_delay: float | Sequence[float | None] | None, replicas: int
) -> list[float | None]:
    """One apply delay per replica (``None`` for none), checked: ``apply_delay`` is ``None``,
    a number >= 0 for all, or a sequence of one such per replica."""
    if apply_delay is None or isinstance(apply_delay, numbers.Real):
        apply_delay = [apply_delay] * replicas
    elif not isinstance(apply_delay, Sequence) or isinstance(apply_delay, str):
        kind = type(apply_delay).__name__
        raise TypeError(f"apply_delay must be a number or a sequence of numbers, got {kind}")
    elif len(apply_delay) != replicas:
        raise ValueError(
            f"apply_delay must give one delay per replica ({replicas}), got {len(apply_delay)}"
        )
    delays = []
    for delay in apply_delay:
        seconds = None if delay is None else non_negative_number("apply_delay", delay)
        delays.append(seconds or None)
    return delays


_REAPER = "from course_lib.db.lesson.replicas import _reap_when_orphaned; _reap_when_orphaned()"


def _reap_when_orphaned() -> None:
    """Body of the reaper process (argv: root, bin_dir, the program's pid): once the program
    that started the servers is gone, stop them and remove ``root`` as its ``stop`` would."""
    root, bin_dir, parent = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    orphaned = threading.Event()
    watch_parent(orphaned.set, parent=parent)
    while root.exists():  # the program's own stop removes it
        if orphaned.wait(0.5):
            ReplicaSet(root, bin_dir).stop()
            return
