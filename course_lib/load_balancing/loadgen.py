"""A load generator: closed loop or open loop, results as a DataFrame.

- Closed loop (``rate=None``): ``concurrency`` clients, each sending its next request as
  soon as the previous one answered. Simple, but a stalled server also stalls the load,
  so its stall hides in fewer samples.
- Open loop (``rate`` requests/s): request ``i`` is due at ``i / rate`` seconds, and its
  latency is measured from that intended time, not from when a connection was free to
  send it, so a stall shows up in every request that should have been sent during it
  (coordinated omission, as Gil Tene's wrk2 explains it).

Each client keeps one keep-alive connection (reconnecting after an error). ``clients``
gives the ``X-Forwarded-For`` address of each request (cycled), so sticky sessions can be
shown through a proxy that trusts loopback. A status of 0 means the request failed
without an HTTP answer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from urllib.parse import urlsplit

import pandas as pd

from course_lib.measure import run_async
from course_lib.progress import progress as progress_bar
from course_lib.validation import optional_positive_number, positive_int, positive_number

from ._http1 import ProtocolError, read_message, render

__all__ = ["COLUMNS", "run_load"]

COLUMNS = ["i", "client", "intended_s", "sent_s", "done_s", "latency_ms", "status", "backend"]


def run_load(
    url: str,
    *,
    requests: int,
    concurrency: int = 8,
    rate: float | None = None,
    clients: Sequence[str] | None = None,
    method: str = "GET",
    path: str = "/",
    timeout: float = 10.0,
    progress: bool = True,
    desc: str = "requests",
) -> pd.DataFrame:
    """Send ``requests`` requests to ``url``; one row per request (see :data:`COLUMNS`).

    Times are seconds since the start; ``latency_ms`` runs from the intended send time
    (open loop) or the actual send time (closed loop) to the end of the response.
    """
    requests = positive_int("requests", requests)
    concurrency = positive_int("concurrency", concurrency)
    rate = optional_positive_number("rate", rate)
    timeout = positive_number("timeout", timeout)
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname or not parts.port:
        raise ValueError(f"url must be an http://host:port URL, got {url!r}")
    if clients is not None and not clients:
        raise ValueError("clients must not be empty (or None)")
    return run_async(
        _load(
            parts.hostname,
            parts.port,
            requests=requests,
            concurrency=concurrency,
            rate=rate,
            clients=list(clients) if clients else None,
            method=method,
            path=path,
            timeout=timeout,
            progress=progress,
            desc=desc,
        )
    )


async def _load(
    host: str,
    port: int,
    *,
    requests: int,
    concurrency: int,
    rate: float | None,
    clients: list[str] | None,
    method: str,
    path: str,
    timeout: float,
    progress: bool,
    desc: str,
) -> pd.DataFrame:
    rows: list[tuple] = [()] * requests
    counter = iter(range(requests))
    bar = progress_bar(total=requests, desc=desc, unit="req", disable=not progress)
    body = b"x" if method in ("POST", "PUT", "PATCH") else b""
    start = time.perf_counter()

    async def client_task() -> None:
        conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        for i in counter:
            client = clients[i % len(clients)] if clients else "-"
            intended = i / rate if rate else None
            if intended is not None:
                wait = start + intended - time.perf_counter()
                if wait > 0:
                    await asyncio.sleep(wait)
            sent = time.perf_counter() - start
            headers = [("host", f"{host}:{port}")]
            if clients:
                headers.append(("x-forwarded-for", client))
            status, backend = 0, ""
            try:
                if conn is None:
                    conn = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
                conn[1].write(render(f"{method} {path} HTTP/1.1", headers, body))
                response = await asyncio.wait_for(read_message(conn[0]), timeout)
                if response is None:
                    raise ConnectionResetError("server closed the connection")
                status = int(response.start[1])
                backend = response.header("x-backend", "") or ""
                if not response.keep_alive:
                    conn[1].close()
                    conn = None
            except (OSError, TimeoutError, asyncio.IncompleteReadError, ProtocolError):
                if conn is not None:
                    conn[1].close()
                conn = None
            done = time.perf_counter() - start
            began = intended if intended is not None else sent
            rows[i] = (i, client, began, sent, done, (done - began) * 1000, status, backend)
            bar.update()
        if conn is not None:
            conn[1].close()

    try:
        await asyncio.gather(*(client_task() for _ in range(concurrency)))
    finally:
        bar.close()
    return pd.DataFrame(rows, columns=COLUMNS)
