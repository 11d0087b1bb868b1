"""Load balancing: cost of one ``pick`` per strategy, as a ratio to ``random.choice`` over
the same server list, measured in the same run (subjects interleaved round by round);
and the course proxy against nginx on the same backends.

At 3 and 100 backends. Target at 100 backends: <= 5x ``random.choice`` (O(1) or O(log n)
per pick: a precomputed schedule, count buckets, two samples, an ``inet_pton`` and a few
multiplications, a binary search; never a scan of the servers). Keys rotate over 1000
client addresses / strings so hashing strategies do real work; their baseline is
``random.choice`` behind the same key rotation.

Proxy vs nginx (where both nginx and wrk are installed; otherwise the rows are skipped and
the reason printed): three backends (0 ms, each its own uvicorn process), round robin, one
nginx worker process and the course proxy's one event loop, the same wrk load (1 thread,
32 keep-alive connections) through each, in interleaved rounds (the order alternating), so
the machine's drift falls on both. Rows (medians over the rounds; the spread of the
per-round ratios goes to stderr): throughput (target >= 0.8x nginx), CPU time per request
of the proxy's process against the nginx worker's (target <= 2x), p50 and p99 latency
against nginx's (p99 target <= 1.2x), and each backend's own capacity under the same wrk
load, beside the proxy's throughput (a proxy near that would be measuring the backends),
and the CPU per request of a byte pipe on the same event loop (each client connection piped
to one backend connection, nothing parsed: the floor for a proxy written on uvloop; the
proxy's distance from it is its own Python per request).
On stderr: CPU per request split into user and system time, and the share of a core each
balancer used (on a machine too busy to give either a whole core, the scheduler gives both
about the same share, and throughput then goes as 1 / CPU per request). Then a py-spy
profile of the proxy under wrk prints its top functions by own time; the own time of the
loop's frame (``Proxy.serve.<locals>.run``) is uvloop's C code and its system calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from urllib.parse import urlsplit

import psutil
import uvloop
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
WRK_CONNECTIONS = 32
_FRAME = re.compile(r"\((?:.*/)?([^/:]+):\d+\)")


def _wrk(url: str, seconds: int, connections: int = WRK_CONNECTIONS) -> dict[str, float]:
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
    result["requests"] = int(re.search(r"(\d+) requests in", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        raise RuntimeError(f"{url}: {errors.group(1)} error responses under wrk")
    return result


def _cpu_seconds(process: psutil.Process) -> tuple[float, float]:
    """User and system CPU seconds of ``process`` so far."""
    times = process.cpu_times()
    return times.user, times.system


def _nginx_worker(url: str) -> psutil.Process:
    port = int(url.rsplit(":", 1)[1])
    for conn in psutil.net_connections("tcp"):
        if conn.laddr and conn.laddr.port == port and conn.status == "LISTEN" and conn.pid:
            master = psutil.Process(conn.pid)
            children = master.children()
            return children[0] if children else master
    raise RuntimeError("nginx worker not found")


def _measured(url: str, process: psutil.Process, seconds: int) -> dict[str, float]:
    """A wrk run with the CPU time ``process`` spent per request during it (``cpu``, and
    its ``user`` and ``system`` parts: the kernel's share is the sockets' cost, which a
    proxy in any language pays; the user share is the proxy's own code)."""
    user_before, system_before = _cpu_seconds(process)
    result = _wrk(url, seconds)
    user_after, system_after = _cpu_seconds(process)
    result["user"] = (user_after - user_before) / result["requests"]
    result["system"] = (system_after - system_before) / result["requests"]
    result["cpu"] = result["user"] + result["system"]
    return result


def _top_frames(url: str, seconds: int, top: int = 8) -> list[tuple[float, float, str]]:
    """py-spy's samples of this process's proxy thread under wrk: the ``top`` functions by
    own time, as (self %, total %, function), or [] when py-spy cannot attach."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "proxy.txt"
        spy = subprocess.Popen(
            [
                py_spy,
                "record",
                "--pid",
                str(os.getpid()),
                "--duration",
                str(seconds + 1),
                "--rate",
                "250",
                "--format",
                "raw",
                "--output",
                str(out),
                "--nonblocking",
                "--threads",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        _wrk(url, seconds)
        _, err = spy.communicate(timeout=seconds + 60)
        if spy.returncode != 0 or not out.exists():
            print(f"bench_load_balancing: py-spy failed: {err.decode()[-300:]}", file=sys.stderr)
            return []
        own: dict[str, int] = {}
        total: dict[str, int] = {}
        samples = 0
        for line in out.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if "lb-proxy" not in stack.split(";", 1)[0] or ";" not in stack:
                continue
            n = int(count)
            samples += n
            # "func (path/file.py:123)" -> "func (file.py)": a function, not one of its lines
            frames = [_FRAME.sub(r"(\1)", f) for f in stack.split(";")[1:]]
            own[frames[-1]] = own.get(frames[-1], 0) + n
            for frame in set(frames):
                total[frame] = total.get(frame, 0) + n
    if not samples:
        return []
    ranked = sorted(own.items(), key=lambda item: -item[1])[:top]
    return [(100 * n / samples, 100 * total[f] / samples, f) for f, n in ranked]


class _Pipe(asyncio.Protocol):
    """One end of a byte pipe: what it receives goes out of the other end unread."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.other: _Pipe | None = None
        self.early: list[bytes] = []  # received before the other end was connected

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.other is None or self.other.transport is None:
            self.early.append(data)
        else:
            self.other.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.close()


@contextlib.contextmanager
def _byte_pipe(urls: Mapping[str, str]) -> Iterator[str]:
    """The floor under any proxy on this event loop: each client connection piped to one
    backend connection (round robin by connection), bytes passed unparsed, on uvloop in a
    thread of this process. No HTTP, no balancing per request: what is left is the loop,
    two Python callbacks per request and the same system calls as nginx's."""
    targets = itertools.cycle(
        [(urlsplit(url).hostname, urlsplit(url).port) for url in urls.values()]
    )
    loop = uvloop.new_event_loop()
    ready = threading.Event()
    state: dict[str, object] = {}

    def client_end() -> _Pipe:
        end, backend = _Pipe(), _Pipe()
        end.other, backend.other = backend, end

        async def connect() -> None:
            host, port = next(targets)
            await loop.create_connection(lambda: backend, host, port)
            for data in end.early:
                backend.transport.write(data)  # type: ignore[union-attr]

        loop.create_task(connect())
        return end

    async def serve() -> None:
        server = await loop.create_server(client_end, "127.0.0.1", 0)
        stop = state["stop"] = asyncio.Event()
        state["url"] = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        ready.set()
        await stop.wait()
        server.close()

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    ready.wait(10)
    try:
        yield str(state["url"])
    finally:
        loop.call_soon_threadsafe(state["stop"].set)  # type: ignore[attr-defined]
        thread.join(10)


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f}x (min {min(values):.2f}, max {max(values):.2f})"


def _proxy_vs_nginx(quick: bool) -> list[Row]:
    if nginx_binary() is None or shutil.which("wrk") is None:
        print(
            "bench_load_balancing: proxy vs nginx skipped (needs nginx and wrk: "
            "apt-get install nginx wrk)",
            file=sys.stderr,
        )
        return []
    seconds, rounds = (1, 1) if quick else (5, 7)  # quick: a smoke test of every step
    me = psutil.Process()
    specs = [{"name": f"server{i}", "latency_ms": 0} for i in (1, 2, 3)]
    runs: dict[str, list[dict[str, float]]] = {"proxy": [], "nginx": [], "byte pipe": []}
    with backends(specs) as rig:
        # Each backend's own capacity, alone under the same wrk load: the balancers spread
        # that load over three of them, so a proxy far below this is not backend-bound.
        capacity = {name: _wrk(url, seconds)["rps"] for name, url in rig.urls.items()}
        proxy = Proxy(rig.urls, RoundRobin(rig.names))
        with proxy.serve() as ours, run_nginx(rig.urls) as theirs, _byte_pipe(rig.urls) as pipe:
            worker = _nginx_worker(theirs)
            _wrk(ours, 1)  # warm the upstream connection pools
            _wrk(theirs, 1)
            # Interleaved rounds (the order alternating) spread the machine's drift over all.
            for i in range(rounds):
                order = [("proxy", ours, me), ("nginx", theirs, worker), ("byte pipe", pipe, me)]
                for name, url, process in order if i % 2 == 0 else order[::-1]:
                    runs[name].append(_measured(url, process, seconds))
            frames = _top_frames(ours, seconds)
    ratio = {
        metric: [p[metric] / n[metric] for p, n in zip(runs["proxy"], runs["nginx"], strict=True)]
        for metric in ("rps", "cpu", "p50", "p99")
    }
    print(
        f"bench_load_balancing: proxy (one event loop in one thread) / nginx "
        f"(worker_processes 1) over {rounds} interleaved rounds of {seconds} s: "
        f"throughput {_spread(ratio['rps'])}, CPU per request {_spread(ratio['cpu'])}, "
        f"p50 {_spread(ratio['p50'])}, p99 {_spread(ratio['p99'])}",
        file=sys.stderr,
    )
    for name in ("proxy", "nginx", "byte pipe"):
        user = statistics.median(run["user"] for run in runs[name]) * 1e6
        system = statistics.median(run["system"] for run in runs[name]) * 1e6
        # CPU per request x requests per second: the share of one core it got. When both
        # get the same share (a busy machine's scheduler), throughput goes as 1 / CPU.
        share = statistics.median(run["cpu"] * run["rps"] for run in runs[name]) * 100
        print(
            f"bench_load_balancing: {name} CPU per request (medians): user {user:.1f} us, "
            f"system {system:.1f} us; it used {share:.0f}% of a core under wrk",
            file=sys.stderr,
        )
    if frames:
        print(
            "bench_load_balancing: the proxy under wrk (py-spy), top functions by own time:",
            file=sys.stderr,
        )
        for own, total, frame in frames:
            print(f"  {own:5.1f}% own {total:5.1f}% total  {frame}", file=sys.stderr)

    def median(name: str, metric: str) -> float:
        return statistics.median(run[metric] for run in runs[name])

    rows = [
        Row(
            BENCH,
            "course proxy",
            "throughput",
            median("proxy", "rps"),
            "req/s",
            "nginx",
            median("nginx", "rps"),
            target=0.8,
            higher_is_better=True,
        ),
        Row(
            BENCH,
            "course proxy",
            "CPU per request",
            median("proxy", "cpu") * 1e6,
            "us",
            "nginx worker",
            median("nginx", "cpu") * 1e6,
            target=2.0,
        ),
        Row(
            BENCH,
            "course proxy",
            "p50 latency",
            median("proxy", "p50"),
            "ms",
            "nginx",
            median("nginx", "p50"),
        ),
        Row(
            BENCH,
            "course proxy",
            "p99 latency",
            median("proxy", "p99"),
            "ms",
            "nginx",
            median("nginx", "p99"),
            target=1.2,
        ),
    ]
    rows.append(
        Row(
            BENCH,
            "byte pipe (no HTTP, the floor)",
            "CPU per request",
            median("byte pipe", "cpu") * 1e6,
            "us",
            "nginx worker",
            median("nginx", "cpu") * 1e6,
        )
    )
    for name, rps in capacity.items():
        rows.append(
            Row(
                BENCH,
                f"backend {name} alone",
                "capacity",
                rps,
                "req/s",
                "course proxy",
                median("proxy", "rps"),
                higher_is_better=True,
            )
        )
    return rows
