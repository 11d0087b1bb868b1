"""The notebook's PgBouncer (transaction mode) really shows what transaction pooling breaks,
and stops with its block. Skipped where the pgbouncer package is not installed (CI installs
it)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import psutil
import psycopg
import pytest

from course_lib import services
from course_lib.db.lesson.pgbouncer import find_pgbouncer, pgbouncer

pytestmark = pytest.mark.skipif(find_pgbouncer() is None, reason="pgbouncer is not installed")


def _pgbouncers_in(folder: Path) -> list[int]:
    found = []
    for process in psutil.process_iter(["name", "cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if "pgbouncer" in (process.info["name"] or "") and str(folder) in cmdline:
            found.append(process.pid)
    return found


def test_transaction_pooling_leaks_session_state_and_breaks_prepared_statements() -> None:
    with pgbouncer(services.database_url(), pool_size=1) as bouncer:
        folder = bouncer.socket_dir
        assert len(_pgbouncers_in(folder)) == 1
        with bouncer.connect(autocommit=True) as alice, bouncer.connect(autocommit=True) as bob:
            alice.execute("SET course.tenant = 'alice'")
            row = bob.execute("SELECT current_setting('course.tenant', true)").fetchone()
            assert row == ("alice",)
            for i in range(6):
                alice.execute("SELECT %s::int", (i,))
            with pytest.raises(psycopg.errors.DuplicatePreparedStatement):
                for i in range(6):
                    bob.execute("SELECT %s::int", (i,))
        options = {"autocommit": True, "prepare_threshold": None}
        with bouncer.connect(**options) as alice, bouncer.connect(**options) as bob:
            for i in range(6):
                assert alice.execute("SELECT %s::int", (i,)).fetchone() == (i,)
                assert bob.execute("SELECT %s::int", (i,)).fetchone() == (i,)
    assert _pgbouncers_in(folder) == [] and not folder.exists()


def test_session_mode_keeps_state_per_client_and_bad_arguments() -> None:
    with (
        pgbouncer(services.database_url(), pool_mode="session", pool_size=2) as bouncer,
        bouncer.connect(autocommit=True) as alice,
        bouncer.connect(autocommit=True) as bob,
    ):
        alice.execute("SET course.tenant = 'alice'")
        row = bob.execute("SELECT current_setting('course.tenant', true)").fetchone()
        assert row == (None,)  # each client keeps its own server connection
    with pytest.raises(ValueError, match="pool_mode"), pgbouncer("x", pool_mode="nope"):
        pass
    with pytest.raises(ValueError, match="pool_size"), pgbouncer("x", pool_size=0):
        pass


@pytest.mark.timeout(180)
def test_an_upstream_socket_folder_with_a_space_and_a_quote_reaches_pgbouncer_intact() -> None:
    # Before: the folder went into pgbouncer.ini unquoted, and the space cut it in two.
    base = Path(tempfile.mkdtemp(prefix="pc-b", dir="/tmp"))
    base.chmod(0o755)  # the server user walks down to its folder
    server = services.EmbeddedPostgres(base / "o'brien db")
    try:
        server.start()
        with pgbouncer(server.url(), pool_size=1) as bouncer, bouncer.connect() as conn:
            shown = conn.execute("SHOW unix_socket_directories").fetchone()
            assert shown == (str(server.root),)
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)
    with pytest.raises(ValueError, match="upstream_url"), pgbouncer(f"{server.url()}%0A"):
        pass
