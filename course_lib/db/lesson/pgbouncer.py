"""A PgBouncer the notebook owns, in front of the course's PostgreSQL, for one ``with`` block.

Only to stage what transaction pooling breaks (section 1 of notebook 04): it listens on a
Unix socket in a private temporary folder, trusts the local ``postgres`` user, keeps
``pool_size`` server connections, and is stopped (and its folder removed) when the block
ends, also if it raises. Started by root, it runs as the unprivileged PostgreSQL account.
The upstream's settings are quoted in its connection string, so a socket folder with spaces
or quotes reaches PgBouncer intact.
Needs the ``pgbouncer`` binary (Debian: ``apt-get install pgbouncer``); :func:`find_pgbouncer`
returns ``None`` without it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from course_lib.services.database import connect_kwargs
from course_lib.services.embedded import server_user
from course_lib.services.errors import ServiceError
from course_lib.validation import one_of, positive_int

__all__ = ["Bouncer", "find_pgbouncer", "pgbouncer"]

_PORT = 6432


def find_pgbouncer() -> Path | None:
    """The ``pgbouncer`` executable, or ``None`` if it is not installed."""
    found = shutil.which("pgbouncer") or next(
        (p for p in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer") if os.path.exists(p)), None
    )
    return Path(found) if found else None


@dataclass(frozen=True)
class Bouncer:
    """A running PgBouncer: ``connect()`` opens a psycopg connection through it."""

    socket_dir: Path
    pool_mode: str
    pool_size: int

    def connect(self, **kwargs: Any) -> psycopg.Connection:
        return psycopg.connect(
            host=str(self.socket_dir), port=_PORT, user="postgres", dbname="course", **kwargs
        )


def _line_value(name: str, value: object) -> str:
    """``value`` as the rest of an ini line: PgBouncer takes everything after ``=`` up to
    the end of the line, trimmed, with no quoting, and expands a leading ``~``; refuse
    (``ValueError`` naming ``name``) what that would change."""
    text = str(value)
    if "\n" in text or text != text.strip() or text.startswith("~"):
        raise ValueError(f"{name} cannot be written into pgbouncer.ini as is: {text!r}")
    return text


def _quoted(value: object) -> str:
    """``value`` quoted for a PgBouncer connection string: in single quotes, each quote
    doubled (spaces and quotes in a socket folder stay part of it)."""
    text = str(value).replace("'", "''")
    return f"'{text}'"


def _config(folder: Path, upstream: dict[str, Any], pool_mode: str, pool_size: int) -> str:
    fields = {key: upstream[key] for key in ("host", "port", "dbname") if key in upstream}
    fields["user"] = upstream.get("user", "postgres")
    target = _line_value(
        "upstream_url", " ".join(f"{key}={_quoted(value)}" for key, value in fields.items())
    )
    own = _line_value("folder", folder)
    return f"""[databases]
course = {target}

[pgbouncer]
unix_socket_dir = {own}
listen_port = {_PORT}
auth_type = trust
auth_file = {own}/users.txt
pool_mode = {pool_mode}
default_pool_size = {pool_size}
max_client_conn = 100
logfile = {own}/pgbouncer.log
pidfile = {own}/pgbouncer.pid
ignore_startup_parameters = extra_float_digits,options
"""


@contextlib.contextmanager
def pgbouncer(
    upstream_url: str, *, pool_mode: str = "transaction", pool_size: int = 1, timeout: float = 20
) -> Iterator[Bouncer]:
    """Run PgBouncer in front of ``upstream_url`` (a SQLAlchemy URL) for the block."""
    one_of("pool_mode", pool_mode, ("session", "transaction", "statement"))
    positive_int("pool_size", pool_size)
    binary = find_pgbouncer()
    if binary is None:
        raise ServiceError("pgbouncer is not installed (Debian/Ubuntu: apt-get install pgbouncer)")
    folder = Path(tempfile.mkdtemp(prefix="pc-pgb-", dir="/tmp"))
    process: subprocess.Popen[bytes] | None = None
    try:
        (folder / "pgbouncer.ini").write_text(
            _config(folder, connect_kwargs(upstream_url), pool_mode, pool_size)
        )
        (folder / "users.txt").write_text('"postgres" ""\n')
        user = server_user()
        kwargs: dict[str, Any] = {"cwd": "/"}
        if user is not None:
            for path in (folder, *folder.iterdir()):
                os.chown(path, user.pw_uid, user.pw_gid)
            kwargs |= {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
        process = subprocess.Popen(  # foreground (no -d): this process is the one we stop
            [str(binary), str(folder / "pgbouncer.ini")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            **kwargs,
        )
        bouncer = Bouncer(folder, pool_mode, pool_size)
        deadline = time.monotonic() + timeout
        while True:
            try:
                bouncer.connect(connect_timeout=2).close()
                break
            except psycopg.OperationalError as exc:
                if process.poll() is not None or time.monotonic() > deadline:
                    log = folder / "pgbouncer.log"
                    tail = log.read_text(errors="replace")[-1500:] if log.exists() else ""
                    raise ServiceError(f"pgbouncer did not start: {exc}; log: {tail}") from None
                time.sleep(0.05)
        yield bouncer
    finally:
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        shutil.rmtree(folder, ignore_errors=True)
