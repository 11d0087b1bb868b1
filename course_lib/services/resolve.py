"""Choosing where Redis and PostgreSQL come from.

Order, per service:

1. ``COURSE_SERVICES=embedded``: the embedded server, whatever else is set.
2. ``REDIS_URL`` / ``DATABASE_URL``: used as given. If it cannot be reached, a
   :class:`ServiceError` names it; it is never silently replaced by another server.
3. A server already running on the default local address: Redis on 127.0.0.1:6379;
   PostgreSQL on 127.0.0.1:5432 or the usual socket folders, in a database ``course``
   created if missing.
4. The embedded server (:mod:`course_lib.services.embedded`).
"""

from __future__ import annotations

import getpass
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
import redis
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from .clients import fail_fast_redis
from .database import connect, ensure_database
from .embedded import EmbeddedPostgres, EmbeddedRedis
from .errors import ServiceError

__all__ = [
    "COURSE_DATABASE",
    "Resolution",
    "mask",
    "mode",
    "resolve_postgres",
    "resolve_redis",
    "sqlalchemy_url",
]

COURSE_DATABASE = "course"
MODES = ("auto", "embedded")
LOCAL_REDIS = "redis://127.0.0.1:6379/0"
_PROBE_TIMEOUT = 1.0


@dataclass(frozen=True)
class Resolution:
    """Where one service comes from: its URL, the source chosen and why."""

    service: str
    url: str
    source: str
    reason: str


# scheme://user:PASSWORD@host, up to the token's last "@" as urllib (and so redis-py) reads
# it: a password may itself hold an "@".
_URL_PASSWORD = re.compile(r"(?P<keep>://[^/@:\s]*:)(?P<secret>\S*)(?=@)")
# password=... (libpq DSN keyword, also sslpassword; URL query parameter): a bare value, or
# a single-quoted one with spaces and backslash escapes as libpq allows, even unterminated.
_KEYWORD_PASSWORD = re.compile(
    r"(?P<keep>(?<![\w.-])(?:ssl)?password\s*=\s*)(?:'(?:[^'\\]|\\.?)*'?|[^&\s]*)",
    re.IGNORECASE,
)


def mask(text: str) -> str:
    """``text`` (a URL, a libpq DSN or an error message quoting one) with passwords as ``***``.

    Masked: ``user:PASSWORD@`` in a URL, up to its last ``@`` (a password may hold ``@``;
    the part after one is masked too where a parser that split at the first ``@`` quotes it
    as a host, ``'TAIL@127.0.0.1'``), and the value of ``password=`` / ``sslpassword=`` in a
    DSN or a URL query, quoted values with spaces included.
    """
    for match in _URL_PASSWORD.finditer(text):
        tails = match.group("secret").split("@")[1:]
        for i in range(len(tails)):
            text = re.sub(re.escape("@".join(tails[i:])) + "(?=@)", "***", text)
    text = _URL_PASSWORD.sub(lambda m: m.group("keep") + "***", text)
    return _KEYWORD_PASSWORD.sub(lambda m: m.group("keep") + "***", text)


def mode() -> str:
    """``COURSE_SERVICES``: ``auto`` (default) or ``embedded``."""
    value = os.environ.get("COURSE_SERVICES", "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ServiceError(f"COURSE_SERVICES={value!r} is not one of {', '.join(MODES)}")
    return value


def _redis_error(url: str, timeout: float) -> str | None:
    """``None`` if a Redis at ``url`` answers PING, else why not."""
    try:
        client = fail_fast_redis(url, timeout=timeout)
    except ValueError as exc:
        return mask(f"not a Redis URL: {exc}")
    try:
        client.ping()
        return None
    except (redis.RedisError, OSError) as exc:
        return mask(str(exc)) or type(exc).__name__
    finally:
        client.close()


def resolve_redis() -> Resolution:
    """Pick the Redis every part of the course uses (see the module docstring for the order)."""
    if mode() == "embedded":
        return Resolution(
            "redis", EmbeddedRedis.default().start(), "embedded", "COURSE_SERVICES=embedded"
        )
    explicit = os.environ.get("REDIS_URL", "").strip()
    if explicit:
        error = _redis_error(explicit, timeout=3.0)
        if error is not None:
            # Masked whole: the URL tells which parts of the driver's error are secret.
            raise ServiceError(
                mask(
                    f"REDIS_URL={explicit} is set but unreachable ({error}); start that "
                    "server, correct the URL, or unset REDIS_URL to let the course choose"
                )
            )
        return Resolution("redis", explicit, "environment", "REDIS_URL is set")
    if _redis_error(LOCAL_REDIS, timeout=_PROBE_TIMEOUT) is None:
        return Resolution("redis", LOCAL_REDIS, "local", "a server answers on 127.0.0.1:6379")
    return Resolution(
        "redis",
        EmbeddedRedis.default().start(),
        "embedded",
        "no REDIS_URL and no server on 127.0.0.1:6379",
    )


def sqlalchemy_url(url: str) -> URL:
    """Parse a PostgreSQL URL and point it at the psycopg 3 driver."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        raise ServiceError(f"DATABASE_URL={mask(url)} is not a database URL") from None
    if parsed.get_backend_name() not in ("postgresql", "postgres"):
        raise ServiceError(f"DATABASE_URL={mask(url)} is not a PostgreSQL URL")
    return parsed.set(drivername="postgresql+psycopg")


def _postgres_error(url: URL, timeout: float) -> str | None:
    try:
        with connect(url, connect_timeout=max(1, int(timeout))) as conn:
            conn.execute("SELECT 1")
        return None
    except psycopg.Error as exc:
        lines = str(exc).strip().splitlines()
        return mask(lines[0]) if lines else type(exc).__name__


def _local_candidates() -> Iterator[URL]:
    users = dict.fromkeys(["postgres", getpass.getuser()])
    for user in users:
        yield URL.create("postgresql+psycopg", username=user, host="127.0.0.1", port=5432)
        for folder in ("/var/run/postgresql", "/tmp"):
            if os.path.exists(os.path.join(folder, ".s.PGSQL.5432")):
                yield URL.create("postgresql+psycopg", username=user, query={"host": folder})


def resolve_postgres() -> Resolution:
    """Pick the PostgreSQL every part of the course uses (see the module docstring)."""
    if mode() == "embedded":
        return Resolution(
            "postgres", EmbeddedPostgres.default().start(), "embedded", "COURSE_SERVICES=embedded"
        )
    explicit = os.environ.get("DATABASE_URL", "").strip()
    if explicit:
        parsed = sqlalchemy_url(explicit)
        error = _postgres_error(parsed, timeout=5.0)
        if error is not None:
            # Masked whole: the URL tells which parts of the driver's error are secret.
            raise ServiceError(
                mask(
                    f"DATABASE_URL={explicit} is set but unreachable ({error}); start that "
                    "server, correct the URL, or unset DATABASE_URL to let the course choose"
                )
            )
        return Resolution(
            "postgres",
            parsed.render_as_string(hide_password=False),
            "environment",
            "DATABASE_URL is set",
        )
    for candidate in _local_candidates():
        admin = candidate.set(database="postgres")
        if _postgres_error(admin, timeout=_PROBE_TIMEOUT) is not None:
            continue
        try:
            ensure_database(admin, COURSE_DATABASE)
        except psycopg.Error:
            continue
        where = candidate.host or candidate.query.get("host")
        return Resolution(
            "postgres",
            candidate.set(database=COURSE_DATABASE).render_as_string(hide_password=False),
            "local",
            f"a server accepts user {candidate.username} on {where}",
        )
    return Resolution(
        "postgres",
        EmbeddedPostgres.default().start(),
        "embedded",
        "no DATABASE_URL and no local server that accepts the course",
    )
