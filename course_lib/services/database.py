"""Connecting to PostgreSQL from a SQLAlchemy URL, and creating the course's database."""

from __future__ import annotations

import contextlib
from typing import Any

import psycopg
from psycopg import sql
from sqlalchemy.engine import URL, make_url

__all__ = ["connect", "connect_kwargs", "ensure_database"]


def connect_kwargs(url: str | URL) -> dict[str, Any]:
    """psycopg keyword arguments for a SQLAlchemy URL (``postgresql+psycopg://...``).

    Keywords rather than a URL string: psycopg quotes each value itself, so a socket folder
    with spaces or a password with ``@`` or ``/`` in it reaches libpq intact.
    """
    parsed = make_url(url) if isinstance(url, str) else url
    found: dict[str, Any] = {
        "user": parsed.username,
        "password": parsed.password,
        "host": parsed.host,
        "port": parsed.port,
        "dbname": parsed.database,
    }
    for key, value in parsed.query.items():
        found[key] = value if isinstance(value, str) else value[-1]
    return {key: value for key, value in found.items() if value not in (None, "")}


def connect(url: str | URL, **kwargs: Any) -> psycopg.Connection:
    """A psycopg connection to ``url``; ``kwargs`` (e.g. ``autocommit``) go to psycopg."""
    return psycopg.connect(**connect_kwargs(url), **kwargs)


def ensure_database(admin: str | URL, name: str, *, connect_timeout: int = 5) -> None:
    """Create database ``name`` through the ``admin`` URL unless it exists.

    Safe to call from several processes at once: losing the creation race is not an error.
    """
    with connect(admin, autocommit=True, connect_timeout=connect_timeout) as conn:
        found = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if found is None:
            with contextlib.suppress(
                psycopg.errors.DuplicateDatabase, psycopg.errors.UniqueViolation
            ):
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
