"""A PostgreSQL schema of one's own: how notebooks and tests start from a clean database.

``schema_engine(name)`` creates the schema if missing and returns an engine whose
``search_path`` is that schema, so unqualified table names resolve there and two runs (or
two tests) never see each other's tables. ``drop_schema(name)`` removes it with everything
in it. ``unique_schema(prefix)`` makes a fresh name.

Names are plain ASCII identifiers of at most 63 bytes (PostgreSQL would silently cut a
longer one, and two names that differ only after byte 63 would share a schema); case is
kept: ``Run_x`` and ``run_x`` are two schemas. A schema name cannot be a bound parameter, so
it is always sent as a double-quoted identifier: in ``CREATE``/``DROP SCHEMA`` and in the
``search_path`` alike.
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import Engine, text
from sqlalchemy.dialects import postgresql

__all__ = ["drop_schema", "schema_engine", "unique_schema"]

_MAX_IDENTIFIER = 63  # PostgreSQL's NAMEDATALEN - 1
_POSTGRESQL = postgresql.dialect()


def _check(schema: object) -> str:
    if not isinstance(schema, str):
        raise TypeError(f"schema must be a str, got {type(schema).__name__}")
    if not schema.isidentifier() or not schema.isascii():
        raise ValueError(f"schema must be a plain ASCII identifier, got {schema!r}")
    if len(schema) > _MAX_IDENTIFIER:
        raise ValueError(f"schema must be at most {_MAX_IDENTIFIER} characters, got {schema!r}")
    return schema


def _quoted(schema: object) -> str:
    """``schema`` as a double-quoted identifier, as PostgreSQL's own ``quote_ident`` does."""
    return _POSTGRESQL.identifier_preparer.quote_identifier(_check(schema))


def unique_schema(prefix: str = "run") -> str:
    """A new schema name ``<prefix>_<12 hex digits>`` (``ValueError`` for a bad prefix)."""
    longest = _MAX_IDENTIFIER - 13
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
    if len(prefix) > longest:
        raise ValueError(
            f"prefix must be a str of at most {longest} characters (the schema name is "
            f"<prefix>_<12 hex digits>), got {prefix!r}"
        )
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

    quoted = _quoted(schema)
    _admin(f"CREATE SCHEMA IF NOT EXISTS {quoted}")
    connect_args = dict(kwargs.pop("connect_args", {}))
    # quoted here too: unquoted, PostgreSQL would lowercase it and miss a schema named Run_x
    connect_args.setdefault("options", f"-c search_path={quoted}")
    return services.engine(connect_args=connect_args, **kwargs)


def drop_schema(schema: str) -> None:
    """Drop ``schema`` and everything in it; nothing happens if it does not exist."""
    _admin(f"DROP SCHEMA IF EXISTS {_quoted(schema)} CASCADE")
