"""The live rig: backends in their own processes, the course proxy (retry on a SIGKILLed
backend, never a POST; passive health checks; X-Forwarded-For from loopback only), the
load generator, and nginx's config (and a live nginx where it is installed)."""

from __future__ import annotations

import gc
import json
import socket
import urllib.request
from collections.abc import Iterator

import pandas as pd
import pytest

from course_lib.http import ServerProcess, serve_processes
from course_lib.load_balancing import IpHash, RoundRobin, WeightedRoundRobin
from course_lib.load_balancing.lesson.rig import busy_signs
from course_lib.load_balancing.loadgen import run_load
from course_lib.load_balancing.nginx import nginx_binary, nginx_config, run_nginx
from course_lib.load_balancing.proxy import Proxy

# The proxy, its backends and nginx only, no Redis or PostgreSQL: one pass of `make test`
# covers them.
pytestmark = pytest.mark.one_pass

FACTORY = "course_lib.load_balancing.backends:backend_app"
NAMES = ["server1", "server2", "server3"]


@pytest.fixture(scope="module")
def procs() -> Iterator[list[ServerProcess]]:
    with serve_processes(FACTORY, [{"name": n, "latency_ms": 1} for n in NAMES]) as started:
        yield started


def urls(procs: list[ServerProcess]) -> dict[str, str]:
    return {p.kwargs["name"]: p.url for p in procs}


def test_proxy_balances_and_records(procs: list[ServerProcess]) -> None:
    proxy = Proxy(urls(procs), RoundRobin(NAMES))
    with proxy.serve() as url:
        df = run_load(url, requests=30, concurrency=1, progress=False)
    assert df.backend.tolist() == NAMES * 10
    assert set(df.status) == {200}
    records = proxy.records()
    assert len(records) == 30 and records.backend.value_counts().to_dict() == dict.fromkeys(
        NAMES, 10
    )
    assert (records.attempts == 1).all() and (records.latency_ms > 0).all()


def test_load_runs_with_the_collector_paused_and_restores_it(procs: list[ServerProcess]) -> None:
    # The proxy runs in this process: its key function sees the process's collector state
    # as each request goes through.
    seen = []

    def key(client: str, target: str, request: object) -> str:
        seen.append(gc.isenabled())
        return client

    proxy = Proxy(urls(procs), RoundRobin(NAMES), key=key)
    assert gc.isenabled()
    with proxy.serve() as url:
        df = run_load(url, requests=6, concurrency=2, progress=False)
    assert set(df.status) == {200} and seen == [False] * 6
    assert gc.isenabled()


def test_proxy_trusts_x_forwarded_for_from_loopback(procs: list[ServerProcess]) -> None:
    clients = [f"10.0.{i}.7" for i in range(20)]
    ip = IpHash(NAMES)
    proxy = Proxy(urls(procs), IpHash(NAMES))
    with proxy.serve() as url:
        df = run_load(url, requests=20, concurrency=2, clients=clients, progress=False)
    assert df.backend.tolist() == [ip.pick(c) for c in clients]
    assert sorted(proxy.records().client) == sorted(clients)


def test_proxy_ignores_x_forwarded_for_from_other_addresses(procs: list[ServerProcess]) -> None:
    # 127.0.0.2 is a local address but not the one trusted proxy (nginx's
    # set_real_ip_from 127.0.0.1): its X-Forwarded-For is not believed.
    proxy = Proxy(urls(procs), RoundRobin(NAMES))
    with proxy.serve() as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), source_address=("127.0.0.2", 0)) as s:
            s.sendall(b"GET / HTTP/1.1\r\nhost: x\r\nx-forwarded-for: 6.6.6.6\r\n\r\n")
            assert s.recv(4096).startswith(b"HTTP/1.1 200")
        run_load(url, requests=1, concurrency=1, clients=["7.7.7.7"], progress=False)
    assert proxy.records().client.tolist() == ["127.0.0.2", "7.7.7.7"]


def test_proxy_retries_a_get_on_a_killed_backend_and_marks_it_down() -> None:
    with serve_processes(FACTORY, [{"name": n} for n in NAMES]) as started:
        started[1].kill()
        assert not started[1].alive
        proxy = Proxy(urls(started), RoundRobin(NAMES), max_fails=1, fail_timeout=30)
        with proxy.serve() as url:
            df = run_load(url, requests=30, concurrency=1, progress=False)
        records = proxy.records()
        events = proxy.events()
    assert set(df.status) == {200}
    assert "server2" not in set(df.backend)
    retried = records[records.attempts == 2]
    assert len(retried) == 1 and retried.backend.iloc[0] == "server3"  # the next backend
    assert events[["backend", "event"]].values.tolist() == [["server2", "down"]]


def test_proxy_never_retries_a_post() -> None:
    with serve_processes(FACTORY, [{"name": n} for n in NAMES]) as started:
        started[1].kill()
        proxy = Proxy(urls(started), RoundRobin(NAMES), max_fails=0)
        with proxy.serve() as url:
            posts = run_load(url, requests=9, concurrency=1, method="POST", progress=False)
            gets = run_load(url, requests=9, concurrency=1, progress=False)
        records = proxy.records()
    assert posts.status.tolist() == [200, 502, 200] * 3
    assert (records[records.method == "POST"].attempts == 1).all()
    assert set(gets.status) == {200}  # without health checks every third GET is retried
    assert (records[records.method == "GET"].attempts == 2).sum() == 3


def test_proxy_without_retry_shows_the_errors() -> None:
    with serve_processes(FACTORY, [{"name": n} for n in NAMES]) as started:
        started[0].kill()
        proxy = Proxy(urls(started), RoundRobin(NAMES), max_fails=0, retry=False)
        with proxy.serve() as url:
            df = run_load(url, requests=6, concurrency=1, progress=False)
    assert df.status.tolist() == [502, 200, 200] * 2


def test_backend_profiles_and_stats() -> None:
    kwargs = [{"name": "bad", "profile": "failing"}, {"name": "ok", "latency_ms": 0}]
    with serve_processes(FACTORY, kwargs) as (bad, ok):
        failing = run_load(bad.url, requests=3, concurrency=1, progress=False)
        fine = run_load(ok.url, requests=4, concurrency=2, clients=["1.2.3.4"], progress=False)
        stats = json.loads(urllib.request.urlopen(ok.url + "/stats", timeout=5).read())
    assert failing.status.tolist() == [500] * 3
    assert set(fine.status) == {200} and set(fine.backend) == {"ok"}
    assert stats == {"name": "ok", "served": 4, "clients": {"1.2.3.4": 4}}


def test_slowdown_and_random_profiles() -> None:
    kwargs = [
        {"name": "later", "profile": "slowdown", "latency_ms": 20, "factor": 5, "slow_after_s": 0},
        {"name": "never", "profile": "slowdown", "latency_ms": 0, "slow_after_s": 3600},
        {"name": "random", "profile": "random", "latency_ms": 1, "seed": 3},
    ]
    with serve_processes(FACTORY, kwargs) as procs:
        runs = [run_load(p.url, requests=4, concurrency=1, progress=False) for p in procs]
    assert all(set(r.status) == {200} for r in runs)
    # 20 ms x 5 from the start: a lower bound, less the 1 ms an event loop's timer may fire
    # early (uvicorn runs on uvloop where installed; its timers have millisecond resolution)
    assert (runs[0].latency_ms >= 99).all()
    assert runs[2].backend.tolist() == ["random"] * 4


def test_open_loop_measures_from_the_intended_time() -> None:
    # One connection, >= 50 ms per request, one request due every 10 ms: request i cannot
    # start before i * 50 ms although it was due at i * 10 ms, so open-loop latency of the
    # last of 20 is at least 19 * 40 ms. Closed-loop latency never counts that wait.
    with serve_processes(FACTORY, [{"name": "slow", "latency_ms": 50}]) as (slow,):
        opened = run_load(slow.url, requests=20, concurrency=1, rate=100, progress=False)
        closed = run_load(slow.url, requests=20, concurrency=1, progress=False)
    assert opened.latency_ms.iloc[-1] >= 19 * 40
    assert closed.latency_ms.median() < opened.latency_ms.iloc[-1] / 3
    assert (opened.intended_s.diff().dropna().round(3) == 0.01).all()
    assert (opened.sent_s >= opened.intended_s).all()


def test_bad_rig_input() -> None:
    with pytest.raises(ValueError, match="differ"):
        Proxy({"a": "http://127.0.0.1:1"}, RoundRobin(["b"]))
    with pytest.raises(ValueError, match="backend 'a'"):
        Proxy({"a": "ftp://x"}, RoundRobin(["a"]))
    with pytest.raises(TypeError, match="strategy"):
        Proxy({"a": "http://127.0.0.1:1"}, ["a"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="keepalive"):
        Proxy({"a": "http://127.0.0.1:1"}, RoundRobin(["a"]), keepalive=0)
    with pytest.raises(ValueError, match="requests"):
        run_load("http://127.0.0.1:1", requests=0)
    with pytest.raises(ValueError, match="url"):
        run_load("127.0.0.1:1", requests=1)
    with pytest.raises(ValueError, match="profile"):
        from course_lib.load_balancing.backends import backend_app

        backend_app("x", profile="sleepy")


# -- nginx -----------------------------------------------------------------------------------
BACKENDS = {"server1": "http://127.0.0.1:8001", "server2": "http://127.0.0.1:8002"}


def test_nginx_config_generation() -> None:
    conf = nginx_config(BACKENDS, port=9000, prefix="/tmp/x", method="ip_hash")
    assert "worker_processes 1;" in conf
    assert "        ip_hash;\n" in conf
    assert "server 127.0.0.1:8001 max_fails=1 fail_timeout=10s;  # server1" in conf
    assert "set_real_ip_from 127.0.0.1;" in conf and "real_ip_header X-Forwarded-For;" in conf
    assert "listen 127.0.0.1:9000;" in conf and "keepalive 64;" in conf
    weighted = nginx_config(
        BACKENDS,
        port=9000,
        prefix="/tmp/x",
        method="weighted",
        weights={"server1": 5, "server2": 1},
    )
    assert "8001 weight=5 max_fails" in weighted and "8002 weight=1 max_fails" in weighted
    assert "random two least_conn;" in nginx_config(
        BACKENDS, port=1, prefix="/p", method="random_two"
    )
    assert "hash $request_uri consistent;" in nginx_config(
        BACKENDS, port=1, prefix="/p", method="hash"
    )
    assert "least_conn;" in nginx_config(BACKENDS, port=1, prefix="/p", method="least_conn")
    for bad, match in (
        ({"method": "fastest"}, "method"),
        ({"method": "weighted"}, "weights"),
        ({"method": "weighted", "weights": {"server1": 0, "server2": 1}}, "weight of 'server1'"),
        ({"weights": {"server1": 1, "server2": 1}}, "weights"),
    ):
        with pytest.raises(ValueError, match=match):
            nginx_config(BACKENDS, port=1, prefix="/p", **bad)
    # a weight of the wrong type is a TypeError (course_lib.validation's rule)
    with pytest.raises(TypeError, match="weight of 'server2'"):
        nginx_config(
            BACKENDS, port=1, prefix="/p", method="weighted", weights={"server1": 1, "server2": 1.5}
        )


@pytest.mark.skipif(nginx_binary() is None, reason="nginx is not installed")
def test_nginx_live_matches_the_course_strategies(procs: list[ServerProcess]) -> None:
    backends = urls(procs)
    weights = {"server1": 5, "server2": 1, "server3": 1}
    with run_nginx(backends) as url:
        rr = run_load(url, requests=9, concurrency=1, progress=False).backend.tolist()
    with run_nginx(backends, method="weighted", weights=weights) as url:
        wrr = run_load(url, requests=14, concurrency=1, progress=False).backend.tolist()
    clients = [f"172.{a}.{b}.9" for a in (16, 17) for b in range(20)]
    with run_nginx(backends, method="ip_hash") as url:
        sticky = run_load(url, requests=40, concurrency=2, clients=clients, progress=False)
    ours = RoundRobin(NAMES)
    assert rr == [ours.pick() for _ in range(9)]
    ours_w = WeightedRoundRobin(weights)
    assert wrr == [ours_w.pick() for _ in range(14)]
    ip = IpHash(NAMES)
    assert sticky.backend.tolist() == [ip.pick(c) for c in clients]


@pytest.mark.parametrize(
    ("backends", "prefix", "match"),
    [
        (
            {"a\n}\nserver { listen 0.0.0.0:9; root /; autoindex on; }\n#": "http://127.0.0.1:1"},
            "/p",
            "backend name",
        ),
        ({"a;b": "http://127.0.0.1:1"}, "/p", "backend name"),
        ({"a": "http://127.0.0.1;x:1"}, "/p", "host of backend 'a'"),
        ({"a": "http://127.0.0.1:1"}, "/p;\nuser root", "prefix"),
        ({"a": "http://127.0.0.1:1"}, "/p q", "prefix"),
    ],
)
def test_nginx_config_refuses_values_nginx_would_read_as_syntax(
    backends: dict[str, str], prefix: str, match: str
) -> None:
    # A name with a newline once ended the comment it goes into and added a server block.
    with pytest.raises(ValueError, match=match):
        nginx_config(backends, port=1, prefix=prefix)


def test_nginx_config_accepts_ipv6_and_names() -> None:
    conf = nginx_config(
        {"web-1.eu": "http://[::1]:8001", "b": "http://backend.local:8002"}, port=1, prefix="/p"
    )
    assert "server [::1]:8001 " in conf and "server backend.local:8002 " in conf


def _run(late_s: float, fast_ms: float) -> pd.DataFrame:
    rows = []
    for i in range(300):
        backend = NAMES[i % 3]
        intended = i / 100
        latency = 600.0 if backend == "server3" else fast_ms
        rows.append((intended, intended + late_s, latency, backend))
    return pd.DataFrame(rows, columns=["intended_s", "sent_s", "latency_ms", "backend"])


def test_busy_signs_name_what_makes_a_tail_comparison_meaningless() -> None:
    fast = ["server1", "server2"]
    # server3's own queue (600 ms) is the experiment, not a sign of a busy machine.
    assert busy_signs(_run(0.002, 8.0), fast=fast, work_ms=4) == []
    late = busy_signs(_run(0.150, 8.0), fast=fast, work_ms=4)
    assert late == ["the client sent its p99 request 150 ms late"]
    slow = busy_signs(_run(0.002, 40.0), fast=fast, work_ms=4)
    assert slow == ["the fast backends' median took 40 ms for 4 ms of work"]
    assert len(busy_signs(_run(0.150, 40.0), fast=fast, work_ms=4)) == 2
    with pytest.raises(ValueError, match="work_ms"):
        busy_signs(_run(0, 8.0), fast=fast, work_ms=0)
