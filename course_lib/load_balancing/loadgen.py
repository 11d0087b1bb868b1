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
import re
import time
from collections.abc import Sequence
from urllib.parse import urlsplit

import pandas as pd

from course_lib.measure import collector_paused, run_async
from course_lib.progress import progress as progress_bar
from course_lib.validation import optional_positive_number, positive_int, positive_number

from ._http1 import ClientConnection, ProtocolError, open_connection

__all__ = ["COLUMNS", "run_load"]

_TOKEN = re.compile(r"[A-Z]+")
_TARGET = re.compile(r"/[\x21-\x7e]*")
_FIELD = re.compile(r"[\x21-\x7e]+")

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
    (open loop) or the actual send time (closed loop) to the end of the response. The
    cyclic garbage collector is off during the run (:func:`.measure.collector_paused`).
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
    # They go into the request as written: refuse what would change its framing.
    if not isinstance(method, str) or not _TOKEN.fullmatch(method):
        raise ValueError(f"method must be an HTTP method token such as 'GET', got {method!r}")
    if not isinstance(path, str) or not _TARGET.fullmatch(path):
        raise ValueError(f"path must start with '/' and hold no space or control, got {path!r}")
    for client in clients or ():
        if not isinstance(client, str) or not _FIELD.fullmatch(client):
            raise ValueError(f"clients must be header-safe strings, got {client!r}")
    # The client and a proxy in this process share one heap: a full collection mid-run
    # would stall both and turn the schedule into a burst (see collector_paused).
    with collector_paused():
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
    request_line = f"{method} {path} HTTP/1.1\r\nhost: {host}:{port}\r\n".encode("latin-1")
    if body:
        request_line += b"content-length: %d\r\n" % len(body)
    head_only = method == "HEAD"
    start = time.perf_counter()

    async def client_task() -> None:
        conn: ClientConnection | None = None
        for i in counter:
            client = clients[i % len(clients)] if clients else "-"
            intended = i / rate if rate else None
            if intended is not None:
                wait = start + intended - time.perf_counter()
                if wait > 0:
                    await asyncio.sleep(wait)
            sent = time.perf_counter() - start
            head = request_line
            if clients:
                head += f"x-forwarded-for: {client}\r\n".encode("latin-1")
            head += b"\r\n"
            status, backend = 0, ""
            try:
                if conn is None or conn.closed:
                    conn = await asyncio.wait_for(open_connection(host, port), timeout)
                response = await conn.request(head, body, head_only=head_only, timeout=timeout)
                status = response.status
                backend = response.header("x-backend", "") or ""
            except (OSError, TimeoutError, ProtocolError):
                if conn is not None:
                    conn.close()
                conn = None
            done = time.perf_counter() - start
            began = intended if intended is not None else sent
            rows[i] = (i, client, began, sent, done, (done - began) * 1000, status, backend)
            bar.update()
        if conn is not None:
            conn.close()

    try:
        await asyncio.gather(*(client_task() for _ in range(concurrency)))
    finally:
        bar.close()
    return pd.DataFrame(rows, columns=COLUMNS)
