"""A PostgreSQL schema of one's own: how notebooks and tests start from a clean database.

``schema_engine(name)`` creates the schema if missing and returns an engine whose
``search_path`` is that schema, so unqualified table names resolve there and two runs (or
two tests) never see each other's tables. ``drop_schema(name)`` removes it with everything
in it. ``unique_schema(prefix)`` makes a fresh name. Names are checked to be plain
identifiers before they are put into SQL (a schema name cannot be a bound parameter).
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import Engine, text

__all__ = ["drop_schema", "schema_engine", "unique_schema"]


def _check(schema: object) -> str:
    if not isinstance(schema, str) or not schema.isidentifier() or not schema.isascii():
        raise ValueError(f"schema must be a plain ASCII identifier, got {schema!r}")
    return schema


def unique_schema(prefix: str = "run") -> str:
    """A new schema name ``<prefix>_<12 hex digits>`` (``ValueError`` for a bad prefix)."""
    return _check(f"{prefix}_{uuid.uuid4().hex[:12]}")


def _admin(statement: str) -> None:
    """Run one DDL statement on a short-lived engine of the course database."""
    from course_lib import services  # the package imports this module

    admin = services.engine()
    try:
        with admin.begin() as conn:
            conn.execute(text(statement))
    finally:
        admin.dispose()


def schema_engine(schema: str, **kwargs: Any) -> Engine:
    """An engine on the course database whose ``search_path`` is ``schema`` (created if
    missing); ``kwargs`` go to :func:`course_lib.services.engine` (pool settings, ...)."""
    from course_lib import services

    _admin(f'CREATE SCHEMA IF NOT EXISTS "{_check(schema)}"')
    connect_args = dict(kwargs.pop("connect_args", {}))
    connect_args.setdefault("options", f"-c search_path={schema}")
    return services.engine(connect_args=connect_args, **kwargs)


def drop_schema(schema: str) -> None:
    """Drop ``schema`` and everything in it; nothing happens if it does not exist."""
    _admin(f'DROP SCHEMA IF EXISTS "{_check(schema)}" CASCADE')
