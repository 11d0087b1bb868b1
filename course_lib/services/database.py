"""Creating the course's database on a PostgreSQL server that lacks it."""

from __future__ import annotations

import contextlib

import psycopg
from psycopg import sql

__all__ = ["ensure_database"]


def ensure_database(admin_url: str, name: str, *, connect_timeout: float = 5) -> None:
    """Create database ``name`` through ``admin_url`` (a libpq URL) unless it exists.

    Safe to call from several processes at once: losing the creation race is not an error.
    """
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=int(connect_timeout)) as conn:
        found = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if found is None:
            with contextlib.suppress(
                psycopg.errors.DuplicateDatabase, psycopg.errors.UniqueViolation
            ):
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
