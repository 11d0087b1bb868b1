"""The shared layers every section builds on: http, QueryCounter, schemas, workloads,
validation, run_async and the asyncio fail-fast client."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import psutil
import pytest
import redis as redis_lib
from sqlalchemy import text

from course_lib import http, orphans, services, validation
from course_lib.measure import QueryCounter, run_async
from course_lib.workloads import zipf_keys


@pytest.mark.one_pass
def test_serve_many_runs_apps_in_threads_and_stops_them() -> None:
    with http.serve_many([http.echo_app("a"), http.echo_app("b")]) as urls:
        names = [httpx.get(url).json()["name"] for url in urls]
        assert all(url.startswith("http://127.0.0.1:") for url in urls)
    assert names == ["a", "b"]
    with pytest.raises(httpx.ConnectError):
        httpx.get(urls[0], timeout=2)


@pytest.mark.one_pass
def test_serve_processes_gives_killable_processes_and_leaves_nothing_behind() -> None:
    with http.serve_processes("course_lib.http:echo_app", [{"name": "a"}, {"name": "b"}]) as ps:
        replies = [httpx.get(p.url).json() for p in ps]
        assert [r["name"] for r in replies] == ["a", "b"]
        assert {r["pid"] for r in replies} == {p.pid for p in ps} and os.getpid() not in {
            r["pid"] for r in replies
        }
        ps[0].kill()
        assert not ps[0].alive and ps[0].returncode == -signal.SIGKILL
        with pytest.raises(httpx.ConnectError):
            httpx.get(ps[0].url, timeout=2)
        assert httpx.get(ps[1].url).json()["name"] == "b"  # the others keep serving
    assert not any(psutil.pid_exists(p.pid) for p in ps)


@pytest.mark.one_pass
def test_serve_processes_stops_everything_when_the_block_raises() -> None:
    started: list[http.ServerProcess] = []
    with pytest.raises(KeyError), http.serve_processes("course_lib.http:echo_app", [{}] * 3) as ps:
        started.extend(ps)
        raise KeyError("a failing cell")
    assert len(started) == 3
    assert not any(psutil.pid_exists(p.pid) for p in started)


@pytest.mark.one_pass
def test_serve_processes_reports_a_server_that_cannot_start() -> None:
    with (
        pytest.raises(TimeoutError, match="ModuleNotFoundError"),
        http.serve_processes("no_such_module:app", [{}], startup_timeout=10),
    ):
        pass


@pytest.mark.one_pass
@pytest.mark.parametrize(
    ("factory", "kwargs_list", "error"),
    [
        ("not-a-factory", [{}], ValueError),
        ("course_lib.http:echo_app", [], ValueError),
        ("course_lib.http:echo_app", [{"x": object()}], TypeError),
    ],
)
def test_serve_processes_rejects_bad_input(factory, kwargs_list, error) -> None:
    with pytest.raises(error), http.serve_processes(factory, kwargs_list):
        pass


def test_query_counter_counts_and_keeps_statements(pg_engine) -> None:
    with pg_engine.begin() as conn:
        conn.execute(text("CREATE TABLE t (id int)"))
    with (
        QueryCounter(pg_engine) as every,
        QueryCounter(pg_engine, where=lambda sql: sql.startswith("SELECT")) as selects,
        pg_engine.begin() as conn,
    ):
        conn.execute(text("INSERT INTO t VALUES (:v)"), [{"v": 1}, {"v": 2}])
        conn.execute(text("SELECT count(*) FROM t"))
        conn.execute(text("SELECT   id\n FROM t WHERE id = :v"), {"v": 1})
    assert every.count == 3  # an executemany is one statement
    assert selects.statements == ["SELECT count(*) FROM t", "SELECT id FROM t WHERE id = %(v)s"]
    with pg_engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    assert every.count == 3  # no longer listening
    with pytest.raises(TypeError, match="where"):
        QueryCounter(pg_engine, where="SELECT")  # type: ignore[arg-type]


def test_schema_engine_isolates_and_drop_schema_removes() -> None:
    name = services.unique_schema("tk")
    engine = services.schema_engine(name)
    try:
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE mine (id int)"))
            assert conn.execute(text("SELECT current_schema()")).scalar() == name
    finally:
        engine.dispose()
        services.drop_schema(name)
    admin = services.engine()
    with admin.connect() as conn:
        found = conn.execute(
            text("SELECT count(*) FROM information_schema.schemata WHERE schema_name = :s"),
            {"s": name},
        ).scalar()
    admin.dispose()
    assert found == 0
    services.drop_schema(name)  # dropping twice is fine
    for bad in ("x; DROP TABLE users", "a-b", "", "naïve"):
        with pytest.raises(ValueError, match="schema"):
            services.drop_schema(bad)
    with pytest.raises(ValueError, match="schema"):
        services.unique_schema("bad prefix")


@pytest.mark.one_pass
def test_zipf_keys_are_deterministic_and_skewed() -> None:
    keys = zipf_keys(1000, 20_000, s=1.1, seed=3)
    assert keys == zipf_keys(1000, 20_000, s=1.1, seed=3)
    assert keys != zipf_keys(1000, 20_000, s=1.1, seed=4)
    assert set(keys) <= set(range(1, 1001))
    top = max(keys.count(k) for k in set(keys))
    assert top / len(keys) > 0.05  # one key far above the uniform 0.1 %
    with pytest.raises(ValueError, match="n_keys"):
        zipf_keys(0, 10)
    with pytest.raises(TypeError, match="s must be a number"):
        zipf_keys(10, 10, s=True)  # type: ignore[arg-type]


@pytest.mark.one_pass
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_validation_refuses_nan_and_infinity(bad: float) -> None:
    for check in (validation.positive_number, validation.non_negative_number):
        with pytest.raises(ValueError, match=r"^ttl must be a finite number"):
            check("ttl", bad)


@pytest.mark.one_pass
def test_validation_names_the_parameter_and_refuses_bools() -> None:
    assert validation.positive_number("ttl", 2) == 2.0
    assert validation.non_negative_int("n", 0) == 0
    assert validation.optional_positive_number("t", None) is None
    cases = [
        (validation.positive_number, "ttl", True, TypeError),
        (validation.positive_number, "ttl", 0, ValueError),
        (validation.non_negative_number, "wait", -0.1, ValueError),
        (validation.positive_int, "limit", 1.5, TypeError),
        (validation.positive_int, "limit", 0, ValueError),
        (validation.non_negative_int, "n", -1, ValueError),
        (validation.finite_number, "x", "1", TypeError),
    ]
    for check, name, value, error in cases:
        with pytest.raises(error, match=f"^{name} "):
            check(name, value)
    with pytest.raises(ValueError, match="could never be admitted"):
        validation.cost_within(11, 10, "limit")


@pytest.mark.one_pass
def test_validation_ranges_and_choices() -> None:
    assert validation.int_in_range("index", 2, 0, 2) == 2
    assert validation.int_in_range("primaries", 7, 3) == 7
    assert validation.integer("seed", -5) == -5
    assert validation.one_of("mode", "session", ("session", "transaction")) == "session"
    cases = [
        (
            lambda: validation.int_in_range("index", 3, 0, 2),
            ValueError,
            r"index must be in \[0, 2\]",
        ),
        (lambda: validation.int_in_range("index", -1, 0, 2), ValueError, "index must be in"),
        (
            lambda: validation.int_in_range("index", True, 0, 2),
            TypeError,
            "index must be an integer",
        ),
        (lambda: validation.int_in_range("primaries", 2, 3), ValueError, "primaries must be >= 3"),
        (lambda: validation.integer("seed", "1"), TypeError, "seed must be an integer"),
        (
            lambda: validation.one_of("mode", "x", ("a", "b")),
            ValueError,
            "mode must be one of 'a', 'b'",
        ),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=f"^{message}"):
            call()


@pytest.mark.one_pass
def test_validation_of_ttls_names_and_protocols() -> None:
    assert validation.whole_milliseconds("ttl", 0.001) == 1
    assert validation.whole_milliseconds("ttl", 3600) == 3_600_000
    assert validation.text("group", "db") == "db"
    assert validation.instance_of("n", 1, int, "an int") == 1
    cases = [
        (validation.whole_milliseconds, ("ttl", 0.0005), ValueError),  # 0 ms for Redis
        (validation.whole_milliseconds, ("ttl", "60"), TypeError),
        (validation.text, ("group", " "), ValueError),
        (validation.text, ("group", 7), TypeError),
        (validation.instance_of, ("store", object(), int, "an int"), TypeError),
    ]
    for check, args, error in cases:
        with pytest.raises(error, match=f"^{args[0]} "):
            check(*args)


@pytest.mark.one_pass
def test_run_async_runs_inside_a_running_loop_and_propagates_errors() -> None:
    async def inner() -> str:
        await asyncio.sleep(0)
        return "done"

    async def outer() -> str:
        return run_async(inner())  # as from a Jupyter cell, where a loop already runs

    assert asyncio.run(outer()) == "done"

    async def broken() -> None:
        raise KeyError("inside")

    with pytest.raises(KeyError, match="inside"):
        run_async(broken())

    async def stuck() -> None:
        time.sleep(2)  # blocks the loop: only the outer timeout can end the wait

    with pytest.raises(TimeoutError, match="still running"):
        run_async(stuck(), timeout=0.2)


@pytest.mark.one_pass
def test_fail_fast_async_redis_gives_up_fast(embedded_dir) -> None:
    server = services.EmbeddedRedis(embedded_dir / "redis")
    url = server.start()
    server.stop()

    async def ping() -> float:
        client = services.fail_fast_async_redis(url, timeout=0.3)
        start = time.monotonic()
        try:
            with pytest.raises(redis_lib.ConnectionError):
                await client.ping()
            return time.monotonic() - start
        finally:
            await client.aclose()

    assert run_async(ping()) < 5  # no retries with backoff
    with pytest.raises(ValueError, match="timeout"):
        services.fail_fast_async_redis(url, timeout=0)


@pytest.mark.one_pass
def test_watch_parent_fires_only_once_the_expected_parent_is_gone() -> None:
    fired = threading.Event()
    orphans.watch_parent(fired.set, interval=0.01)  # our parent (pytest's launcher) lives
    assert not fired.wait(0.2)
    # a parent that died before the watch began (its pid is no longer our parent's)
    orphans.watch_parent(fired.set, parent=os.getppid() + 1_000_000, interval=0.01)
    assert fired.wait(5)
    with pytest.raises(ValueError, match="interval"):
        orphans.watch_parent(fired.set, interval=0)


# Each script starts one long-lived child the course uses, prints its pid, then waits; the
# test SIGKILLs the script (no context manager exit, no atexit: the kernel-restart case).
ORPHAN_SCRIPTS = {
    "http server": """
from course_lib.http import serve_processes
with serve_processes("course_lib.http:echo_app", [{"name": "orphan"}]) as servers:
    print(servers[0].pid, flush=True)
    time.sleep(60)
""",
    "write-behind worker": """
from course_lib.caching import WriteBehind
from course_lib.caching.lesson.users import UserStore
wb = WriteBehind(services.redis_client(), UserStore(services.engine()), stream=KEY, group="g")
print(wb.start_worker("orphan").pid, flush=True)
time.sleep(60)
""",
    "rq worker": """
from course_lib.caching.lesson import rq_write_behind as rwb
queue = rwb.json_queue(KEY, services.redis_client())
with rwb.rq_workers(queue, [KEY], schema="public") as (worker,):
    print(worker.pid, flush=True)
    time.sleep(60)
""",
}


def _gone(pid: int) -> bool:
    with contextlib.suppress(psutil.NoSuchProcess):
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    return True


# The HTTP server's case uses no service of the course: one pass of `make test` covers it.
@pytest.mark.parametrize(
    "child",
    [
        pytest.param(n, marks=pytest.mark.one_pass) if n == "http server" else n
        for n in ORPHAN_SCRIPTS
    ],
)
def test_a_child_whose_parent_is_killed_stops_itself(child: str) -> None:
    key = f"orphan-test-{os.getpid()}-{time.monotonic_ns()}"
    prelude = f"import time\nfrom course_lib import services\nKEY = {key!r}\n"
    parent = subprocess.Popen(
        [sys.executable, "-c", prelude + ORPHAN_SCRIPTS[child]], stdout=subprocess.PIPE, text=True
    )
    child_pid = None
    try:
        child_pid = int(parent.stdout.readline())  # type: ignore[union-attr]
        assert not _gone(child_pid)
        parent.kill()
        parent.wait(10)
        deadline = time.monotonic() + 15
        while not _gone(child_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _gone(child_pid), f"the orphaned {child} kept running"
    finally:
        parent.kill()
        if child_pid is not None and not _gone(child_pid):  # the test failed: do not leak it
            os.kill(child_pid, signal.SIGKILL)
        client = services.redis_client()
        leftovers = list(client.scan_iter(match=f"*{key}*"))
        if leftovers:
            client.delete(*leftovers)
        client.close()
