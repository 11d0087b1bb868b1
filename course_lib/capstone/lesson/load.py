"""An open-loop trace player for the capstone: every request has an intended send time.

:func:`course_lib.load_balancing.loadgen.run_load` sends one path from anonymous clients;
the capstone needs a *trace*: which client asks for which user's feed, and writes that the
same client reads back at once (carrying the write's WAL position in ``X-Min-LSN``). So this
player takes a list of :class:`Op` and, as ``run_load`` does, measures each latency from the
op's intended time (no coordinated omission: a stall shows in every op due during it).

A write op is ``POST /posts`` then ``GET`` of the writer's feed with the LSN; its latency
covers both, and ``ryw`` says whether the read showed the post just written.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import pandas as pd

from course_lib.measure import collector_paused, run_async
from course_lib.validation import positive_int, positive_number

__all__ = ["COLUMNS", "NOISY", "Op", "make_trace", "play"]

NOISY = "noisy"
COLUMNS = [
    "i", "client", "kind", "intended_s", "done_s", "latency_ms",
    "status", "statements", "on_primary", "redis", "backend", "ryw",
]  # fmt: skip


@dataclass(frozen=True)
class Op:
    """One request of a trace: due ``at`` seconds after the start."""

    at: float
    client: str
    kind: str  # "read" or "write"
    user: int


def make_trace(
    *,
    rate: float,
    seconds: float,
    users: int,
    clients: int = 8,
    write_share: float = 0.05,
    noisy_rate: float = 0.0,
    seed: int = 6,
) -> list[Op]:
    """``clients`` well-behaved clients sending ``rate`` requests/s in all, evenly spaced per
    client, reading feeds of popular users (Zipf) and writing ``write_share`` of the time to
    their own user; plus, if ``noisy_rate`` > 0, a noisy client reading random users' feeds
    (what a scraper does) at ``noisy_rate`` requests/s. Same arguments, same trace."""
    rate = positive_number("rate", rate)
    seconds = positive_number("seconds", seconds)
    users = positive_int("users", users)
    clients = positive_int("clients", clients)
    rng = random.Random(seed)
    weights = [1 / rank**1.1 for rank in range(1, users + 1)]
    ranked = list(range(1, users + 1))
    rng.shuffle(ranked)
    ops = []
    per_client = rate / clients
    for c in range(clients):
        phase = rng.random() / per_client
        for k in range(int(seconds * per_client)):
            at = phase + k / per_client
            if rng.random() < write_share:
                ops.append(Op(at, f"c{c}", "write", c + 1))
            else:
                ops.append(Op(at, f"c{c}", "read", rng.choices(ranked, weights)[0]))
    for k in range(int(seconds * noisy_rate)):
        ops.append(Op(k / noisy_rate, NOISY, "read", rng.randint(1, users)))
    ops.sort(key=lambda op: op.at)
    return ops


class _Conn:
    """One keep-alive HTTP/1.1 connection (responses framed by Content-Length)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(
        self, method: str, path: str, headers: dict[str, str], body: bytes = b""
    ) -> tuple[int, dict[str, str], bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        head = f"{method} {path} HTTP/1.1\r\nhost: {self.host}:{self.port}\r\n"
        head += "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        head += f"content-length: {len(body)}\r\n\r\n"
        self.writer.write(head.encode("latin-1") + body)
        raw = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        fields = {}
        for line in lines[1:]:
            if ":" in line:
                name, value = line.split(":", 1)
                fields[name.strip().lower()] = value.strip()
        payload = await self.reader.readexactly(int(fields.get("content-length", "0")))
        if fields.get("connection", "").lower() == "close":
            self.close()
        return status, fields, payload

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def play(
    url: str,
    trace: Sequence[Op],
    *,
    concurrency: int = 48,
    timeout: float = 10.0,
    t0: float | None = None,
) -> pd.DataFrame:
    """Play ``trace`` against ``url`` open loop; one row per op (see :data:`COLUMNS`).

    ``status`` 0: no HTTP answer within ``timeout`` (or the connection broke). ``statements``
    and ``redis`` come from the app's ``X-Statements``/``X-Redis`` (summed over both requests
    of a write); ``ryw`` is ``None`` for reads. Clients send their name as ``X-Api-Key``.
    ``t0`` (a ``time.perf_counter()`` value, default now) is when the trace starts, so a
    thread injecting faults can share the clock. The cyclic garbage collector is off
    during the play (:func:`course_lib.measure.collector_paused`).
    """
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname or not parts.port:
        raise ValueError(f"url must be an http://host:port URL, got {url!r}")
    concurrency = positive_int("concurrency", concurrency)
    timeout = positive_number("timeout", timeout)
    start = time.perf_counter() if t0 is None else t0
    # A proxy in this process shares the heap: a full collection would stall both (see
    # collector_paused).
    with collector_paused():
        return run_async(
            _play(parts.hostname, parts.port, list(trace), concurrency, timeout, start)
        )


async def _play(
    host: str, port: int, trace: list[Op], concurrency: int, timeout: float, start: float
) -> pd.DataFrame:
    rows: list[tuple] = [()] * len(trace)
    queue = iter(range(len(trace)))

    async def one(conn: _Conn, op: Op) -> tuple[Any, ...]:
        headers = {"x-api-key": op.client}
        if op.kind == "read":
            status, fields, _ = await conn.request("GET", f"/users/{op.user}/feed", headers)
            return status, *_costs(fields), fields.get("x-backend", ""), None
        body = json.dumps({"user_id": op.user, "title": f"from {op.client}"}).encode()
        status, fields, payload = await conn.request("POST", "/posts", headers, body)
        costs = _costs(fields)
        if status != 201:
            return status, *costs, fields.get("x-backend", ""), None
        post = json.loads(payload)
        read_headers = {**headers, "x-min-lsn": post["lsn"]} if post["lsn"] else headers
        status, fields, payload = await conn.request("GET", f"/users/{op.user}/feed", read_headers)
        costs = tuple(a + b for a, b in zip(costs, _costs(fields), strict=True))
        seen = status == 200 and any(p["id"] == post["id"] for p in json.loads(payload)["posts"])
        return status, *costs, fields.get("x-backend", ""), seen

    async def worker() -> None:
        conn = _Conn(host, port)
        for i in queue:
            op = trace[i]
            wait = start + op.at - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
            try:
                result = await asyncio.wait_for(one(conn, op), timeout)
            except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError, IndexError):
                conn.close()
                result = (0, 0, 0, 0, "", None)
            done = time.perf_counter() - start
            rows[i] = (i, op.client, op.kind, op.at, done, (done - op.at) * 1000, *result)
        conn.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return pd.DataFrame(rows, columns=COLUMNS)


def _costs(fields: dict[str, str]) -> tuple[int, int, int]:
    """Statements, of them on the primary, Redis round trips (headers of the app)."""
    return tuple(
        int(fields.get(name, 0)) for name in ("x-statements", "x-primary-statements", "x-redis")
    )  # type: ignore[return-value]
