"""A real PostgreSQL primary with a streaming replica, owned by the course for one block.

``with ReplicaSet.start() as rs:`` runs ``initdb`` for a primary, takes a base backup of it
with ``pg_basebackup -R`` (which also writes ``standby.signal`` and ``primary_conninfo``)
into a second data directory, starts that as a hot standby streaming from the primary, and
waits until the primary reports the replica as ``streaming``.

Guarantees:

- Both servers listen on Unix sockets only (mode 0700), each in its own folder (mode 0700)
  under a private temporary directory (``/tmp/pc-rs-*``, mode 0700; started by root it
  belongs to the server user and others may pass through it, never list or write it);
  nothing is reachable from the network.
- Binaries: the embedded server's (pgserver bundles ``pg_basebackup``) or the system's, found
  as :func:`course_lib.services.embedded.find_postgres_bin_dir` finds them. Started by root,
  the servers run as the unprivileged ``postgres`` (or ``perfcourse``) user, as the embedded
  server does.
- Leaving the block stops both servers, also when the block raises; a server that does not
  stop in time is killed with its children; the directory is removed. A ReplicaSet that the
  program forgets to stop is stopped at interpreter exit. The servers are daemons, so a
  program killed outright (SIGKILL, a kernel restart) could not stop them: a small reaper
  process started with them waits for that program to die and then stops them and removes
  the directory (:func:`course_lib.orphans.watch_parent`).
- ``apply_delay`` (seconds) sets ``recovery_min_apply_delay`` on the replica: it receives the
  WAL at once but applies each commit that much later, the way to stage replication lag.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Hashable
from pathlib import Path
from types import TracebackType
from typing import Any

import psutil
from sqlalchemy import Engine, create_engine, text

from course_lib.orphans import watch_parent
from course_lib.services.embedded import (
    find_postgres_bin_dir,
    make_traversable,
    server_user,
)
from course_lib.services.errors import ServiceError
from course_lib.validation import optional_positive_number, positive_number

from .routing import Router, RoutingSession

__all__ = ["ReplicaSet"]

_SERVER_OPTIONS = (
    "-c fsync=off -c full_page_writes=off -c shared_buffers=32MB -c max_connections=60"
    " -c unix_socket_permissions=0700 -c wal_level=replica -c max_wal_senders=4"
)


def _url(socket_dir: Path) -> str:
    return f"postgresql+psycopg://postgres@/postgres?host={socket_dir}"


def _run_tool(bin_dir: Path, what: str, *args: str, timeout: float = 60.0) -> str:
    """Run PostgreSQL's program ``args[0]`` from ``bin_dir`` (as the server user when root)
    with a deadline; its output, or ``ServiceError`` naming ``what`` if it fails."""
    user = server_user()
    kwargs: dict[str, Any] = {"cwd": "/"}
    if user is not None:
        kwargs |= {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
    try:
        done = subprocess.run(
            [str(bin_dir / args[0]), *args[1:]],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            **kwargs,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise ServiceError(f"{what} failed: {exc}") from None
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().replace("\n", " ")[-1500:]
        raise ServiceError(f"{what} failed (exit {done.returncode}): {detail}")
    return done.stdout


class _Server:
    """One cluster: its data directory, socket folder and log, driven by ``pg_ctl``."""

    def __init__(self, root: Path, bin_dir: Path, name: str, extra: str = "") -> None:
        self.bin_dir = bin_dir
        self.name = name
        self.data = root / name
        self.socket_dir = root / f"{name[0]}s"
        self.log = root / f"{name}.log"
        self.extra = extra

    def pid(self) -> int | None:
        try:
            pid = int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        with contextlib.suppress(psutil.Error):
            process = psutil.Process(pid)
            if process.status() != psutil.STATUS_ZOMBIE and "postgres" in process.name():
                return pid
        return None

    def start(self, timeout: float) -> None:
        # pg_ctl hands -o to /bin/sh: quote the folder with the shell's rules
        options = f"-h '' -k {shlex.quote(str(self.socket_dir))} {_SERVER_OPTIONS} {self.extra}"
        _run_tool(
            self.bin_dir,
            f"starting the {self.name}",
            "pg_ctl", "start", "-w", "-t", str(int(timeout)), "-D", str(self.data),
            "-l", str(self.log), "-o", options,
            timeout=timeout + 5,
        )  # fmt: skip

    def stop(self, timeout: float = 30.0) -> None:
        pid = self.pid()
        if pid is None:
            return
        try:
            _run_tool(
                self.bin_dir,
                f"stopping the {self.name}",
                "pg_ctl", "stop", "-w", "-m", "fast", "-t", str(int(timeout)),
                "-D", str(self.data),
                timeout=timeout + 5,
            )  # fmt: skip
        except ServiceError:
            _kill_tree(pid)

    def restart(self, timeout: float) -> None:
        self.stop()
        self.start(timeout)


def _kill_tree(pid: int) -> None:
    with contextlib.suppress(psutil.Error):
        parent = psutil.Process(pid)
        for process in [*parent.children(recursive=True), parent]:
            with contextlib.suppress(psutil.Error):
                process.send_signal(signal.SIGKILL)
        psutil.wait_procs([parent], timeout=10)


class ReplicaSet:
    """A running primary and streaming replica; build it with :meth:`start`."""

    def __init__(self, root: Path, bin_dir: Path, apply_delay: float | None) -> None:
        self.root = root
        self.bin_dir = bin_dir
        self.apply_delay = apply_delay
        delay = f"-c recovery_min_apply_delay={int(apply_delay * 1000)}ms" if apply_delay else ""
        self.primary = _Server(root, bin_dir, "primary")
        self.replica = _Server(root, bin_dir, "replica", delay)
        self._engines: dict[str, Engine] = {}
        self._router: Router | None = None
        self._stopped = False
        self._reaper: subprocess.Popen[bytes] | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    @classmethod
    def start(
        cls,
        *,
        apply_delay: float | None = None,
        bin_dir: str | Path | None = None,
        timeout: float = 60.0,
    ) -> ReplicaSet:
        """Create, start and connect a primary and its streaming replica (see the module)."""
        apply_delay = optional_positive_number("apply_delay", apply_delay)
        positive_number("timeout", timeout)
        binaries = Path(bin_dir) if bin_dir is not None else find_postgres_bin_dir()
        if not (binaries / "pg_basebackup").is_file():
            raise ServiceError(f"no pg_basebackup in {binaries}: a replica cannot be created")
        root = Path(tempfile.mkdtemp(prefix="pc-rs-", dir="/tmp"))
        rs = cls(root, binaries, apply_delay)
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
        for server in (self.primary, self.replica):
            server.socket_dir.mkdir(mode=0o700)
        if user is not None:
            make_traversable(self.root)
            make_traversable(self.bin_dir)
            for path in (self.root, self.primary.socket_dir, self.replica.socket_dir):
                os.chown(path, user.pw_uid, user.pw_gid)
        _run_tool(
            self.bin_dir,
            "initdb of the primary",
            "initdb", "-D", str(self.primary.data), "-U", "postgres", "--auth=trust",
            "--encoding=UTF8", "--locale=C", "--no-sync",
        )  # fmt: skip
        self.primary.start(timeout)
        _run_tool(
            self.bin_dir,
            "pg_basebackup of the replica",
            "pg_basebackup", "-D", str(self.replica.data), "-R", "-X", "stream",
            "-c", "fast", "--no-sync", "-h", str(self.primary.socket_dir), "-U", "postgres",
            timeout=timeout,
        )  # fmt: skip
        self.replica.start(timeout)
        deadline = time.monotonic() + timeout
        while self.streaming_replicas() < 1:
            if time.monotonic() > deadline:
                raise ServiceError(f"the replica did not start streaming within {timeout:.0f} s")
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop both servers (replica first) and remove their directory; idempotent."""
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
            self.replica.stop()
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

    def stop_replica(self) -> None:
        """Stop the replica only (reads then fall back to the primary)."""
        self.replica.stop()

    def start_replica(self, timeout: float = 60.0) -> None:
        """Start the replica again after :meth:`stop_replica`."""
        self.replica.start(timeout)

    def restart_primary(self, timeout: float = 60.0) -> None:
        """Stop and start the primary: every connection open to it is broken."""
        self.primary.restart(timeout)

    def pids(self) -> list[int]:
        """Process ids of every server process running now (postmasters and children)."""
        found: list[int] = []
        for server in (self.primary, self.replica):
            pid = server.pid()
            if pid is None:
                continue
            with contextlib.suppress(psutil.Error):
                found += [pid, *(p.pid for p in psutil.Process(pid).children(recursive=True))]
        return found

    # -- connections -------------------------------------------------------------------------

    @property
    def primary_url(self) -> str:
        return _url(self.primary.socket_dir)

    @property
    def replica_url(self) -> str:
        return _url(self.replica.socket_dir)

    def engine(self, which: str) -> Engine:
        """The set's own pooled engine on ``"primary"`` or ``"replica"`` (``pool_pre_ping``)."""
        if which not in ("primary", "replica"):
            raise ValueError(f"which must be 'primary' or 'replica', got {which!r}")
        if which not in self._engines:
            url = self.primary_url if which == "primary" else self.replica_url
            self._engines[which] = create_engine(
                url, pool_pre_ping=True, connect_args={"connect_timeout": 5}
            )
        return self._engines[which]

    @property
    def router(self) -> Router:
        """The router behind :meth:`session`: probes the replica at most every 0.2 s."""
        if self._router is None:
            self._router = Router(
                self.engine("primary"), self.engine("replica"), probe_interval=0.2
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

    def lag_bytes(self) -> int:
        """WAL bytes written on the primary and not yet replayed on the replica
        (``ServiceError`` if the replica does not answer within the router's probe_timeout)."""
        written = self.router.primary_lsn()
        replayed = self.router.replayed_lsn()
        if replayed is None:
            raise ServiceError("the replica did not answer its probe: no replay position")
        return max(0, written - replayed)

    def wait_for_replay(self, timeout: float = 30.0) -> float:
        """Block until the replica has replayed everything the primary has written so far;
        return the seconds waited (``TimeoutError`` after ``timeout``)."""
        positive_number("timeout", timeout)
        target = self.router.primary_lsn()
        start = time.monotonic()
        while (replayed := self.router.replayed_lsn()) is None or replayed < target:
            if time.monotonic() - start > timeout:
                raise TimeoutError(f"the replica did not replay the primary's WAL in {timeout} s")
            time.sleep(0.01)
        return time.monotonic() - start


_REAPER = "from course_lib.db.replicas import _reap_when_orphaned; _reap_when_orphaned()"


def _reap_when_orphaned() -> None:
    """Body of the reaper process (argv: root, bin_dir, the program's pid): once the program
    that started the servers is gone, stop them and remove ``root`` as its ``stop`` would."""
    root, bin_dir, parent = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    orphaned = threading.Event()
    watch_parent(orphaned.set, parent=parent)
    while root.exists():  # the program's own stop removes it
        if orphaned.wait(0.5):
            ReplicaSet(root, bin_dir, None).stop()
            return
