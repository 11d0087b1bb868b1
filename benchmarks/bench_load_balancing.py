"""Load balancing: cost of one ``pick`` per strategy, as a ratio to ``random.choice`` over
the same server list, measured in the same run (subjects interleaved round by round);
and the course proxy against nginx on the same backends.

At 3 and 100 backends. Target at 100 backends: <= 5x ``random.choice`` (O(1) or O(log n)
per pick: a precomputed schedule, count buckets, two samples, an ``inet_pton`` and a few
multiplications, a binary search; never a scan of the servers). Keys rotate over 1000
client addresses / strings so hashing strategies do real work; their baseline is
``random.choice`` behind the same key rotation.

Proxy vs nginx (where both nginx and wrk are installed; otherwise the rows are skipped and
the reason printed): three backends (0 ms, each its own process), round robin, one nginx
worker process and the course proxy's one event loop, the same wrk load (1 thread, 32
keep-alive connections) through each, and directly to one backend with 11 connections
(the share of the load each backend gets behind a balancer). Rows: throughput ratio
proxy / nginx (target >= 0.5x), p50 and p99 of each over direct, and CPU time per request
of the proxy (this process) and of the nginx worker.
"""

from __future__ import annotations

import itertools
import random
import re
import shutil
import subprocess
import sys
from collections.abc import Callable

import psutil
from harness import Row, interleaved

from course_lib.load_balancing import (
    ConsistentHash,
    IpHash,
    LeastConnections,
    PowerOfTwoChoices,
    RoundRobin,
    WeightedRoundRobin,
)
from course_lib.load_balancing.lesson.rig import backends
from course_lib.load_balancing.nginx import nginx_binary, run_nginx
from course_lib.load_balancing.proxy import Proxy

BENCH = "load_balancing"
TARGET_AT_100 = 5.0


def _rotating(fn: Callable[[str], object], keys: list[str]) -> Callable[[], object]:
    cycle = itertools.cycle(keys)
    return lambda: fn(next(cycle))


def _subjects(n: int) -> dict[str, Callable[[], object]]:
    servers = [f"10.0.{i // 250}.{i % 250}:8080" for i in range(n)]
    rng = random.Random(1)
    ips = [
        f"{rng.randrange(1, 224)}.{rng.randrange(256)}.{rng.randrange(256)}.7" for _ in range(1000)
    ]
    strings = [f"user:{i}" for i in range(1000)]
    weights = {s: 1 + i % 5 for i, s in enumerate(servers)}
    return {
        "random.choice": lambda: random.choice(servers),
        # the keyed strategies pay for rotating keys too: their baseline does the same
        "random.choice keyed": _rotating(lambda key: random.choice(servers), strings),
        "RoundRobin": RoundRobin(servers).pick,
        "WeightedRoundRobin": WeightedRoundRobin(weights).pick,
        "LeastConnections": LeastConnections(servers, seed=1).pick,
        "PowerOfTwoChoices": PowerOfTwoChoices(servers, seed=1).pick,
        "IpHash": _rotating(IpHash(servers).pick, ips),
        "ConsistentHash": _rotating(ConsistentHash(servers).pick, strings),
        "ConsistentHash bounded": _rotating(
            ConsistentHash(servers, load_factor=1.25).pick, strings
        ),
    }


def run(quick: bool) -> list[Row]:
    calls, rounds = (2_000, 5) if quick else (20_000, 15)
    rows: list[Row] = []
    for n in (3, 100):
        timings = interleaved(_subjects(n), calls, rounds)
        plain = timings.pop("random.choice")
        keyed = timings.pop("random.choice keyed")
        for name, seconds in timings.items():
            is_keyed = name.startswith(("IpHash", "ConsistentHash"))
            rows.append(
                Row(
                    benchmark=BENCH,
                    subject=f"{name} ({n} backends)",
                    metric="pick",
                    value=seconds * 1e9,
                    unit="ns",
                    baseline="random.choice keyed" if is_keyed else "random.choice",
                    baseline_value=(keyed if is_keyed else plain) * 1e9,
                    target=TARGET_AT_100 if n == 100 else None,
                )
            )
    rows.extend(_proxy_vs_nginx(quick))
    return rows


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _wrk(url: str, seconds: int, connections: int = 32) -> dict[str, float]:
    """Requests/s and p50/p99 latency (ms) of a wrk run against ``url``."""
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", url + "/"],
        capture_output=True,
        text=True,
        timeout=seconds + 30,
        check=True,
    ).stdout
    result = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))}
    for pct in ("50", "99"):
        value, unit = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M).groups()
        result[f"p{pct}"] = float(value) * _UNITS[unit]
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    result["requests"] = requests
    return result


def _cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def _nginx_worker(url: str) -> psutil.Process:
    port = int(url.rsplit(":", 1)[1])
    for conn in psutil.net_connections("tcp"):
        if conn.laddr and conn.laddr.port == port and conn.status == "LISTEN" and conn.pid:
            master = psutil.Process(conn.pid)
            children = master.children()
            return children[0] if children else master
    raise RuntimeError("nginx worker not found")


def _proxy_vs_nginx(quick: bool) -> list[Row]:
    if nginx_binary() is None or shutil.which("wrk") is None:
        print(
            "bench_load_balancing: proxy vs nginx skipped (needs nginx and wrk: "
            "apt-get install nginx wrk)",
            file=sys.stderr,
        )
        return []
    seconds = 1 if quick else 5
    me = psutil.Process()
    specs = [{"name": f"server{i}", "latency_ms": 0} for i in (1, 2, 3)]
    with backends(specs) as rig:
        # Direct: one backend at the load each backend sees behind a balancer (32 / 3).
        direct = _wrk(rig.urls["server1"], seconds, connections=11)
        proxy = Proxy(rig.urls, RoundRobin(rig.names))
        with proxy.serve() as url:
            _wrk(url, 1)  # warm the upstream connection pools
            before = _cpu_seconds(me)
            ours = _wrk(url, seconds)
            ours_cpu = (_cpu_seconds(me) - before) / ours["requests"]
        with run_nginx(rig.urls) as url:
            worker = _nginx_worker(url)
            _wrk(url, 1)
            before = _cpu_seconds(worker)
            theirs = _wrk(url, seconds)
            theirs_cpu = (_cpu_seconds(worker) - before) / theirs["requests"]
    rows = [
        Row(
            BENCH,
            "course proxy",
            "throughput",
            ours["rps"],
            "req/s",
            "nginx",
            theirs["rps"],
            target=0.5,
            higher_is_better=True,
        ),
        Row(
            BENCH,
            "course proxy",
            "CPU per request",
            ours_cpu * 1e6,
            "us",
            "nginx worker",
            theirs_cpu * 1e6,
        ),
    ]
    for pct in ("p50", "p99"):
        rows.append(
            Row(BENCH, "course proxy", f"{pct} latency", ours[pct], "ms", "direct", direct[pct])
        )
        rows.append(Row(BENCH, "nginx", f"{pct} latency", theirs[pct], "ms", "direct", direct[pct]))
    if ours["rps"] < 0.5 * theirs["rps"]:
        print(
            f"bench_load_balancing: the course proxy reaches {ours['rps'] / theirs['rps']:.2f}x "
            "nginx's throughput. A cProfile of its event loop under wrk (measured while writing "
            "this benchmark) spends about a third of its time in socket.send (two loopback "
            "sends per request, upstream and client), then in the Python HTTP parsing "
            "(_http1.read_message, StreamReader.readuntil) and the event loop's own callbacks "
            "and futures; nginx makes the same sends from C with no interpreter around them.",
            file=sys.stderr,
        )
    return rows
