"""An asyncio reverse proxy that balances across backends with any strategy.

- Keep-alive upstream connections: a pool of idle connections per backend, reused.
- Active requests per backend are counted by the strategy (``acquire``), so least
  connections and two choices see the real load; ``sample_every`` records them over time.
- Passive health checks with nginx's semantics: a backend that fails ``max_fails`` times
  within ``fail_timeout`` seconds is marked down for ``fail_timeout`` seconds
  (``max_fails=0`` disables it). A failure is what nginx's default
  ``proxy_next_upstream error timeout`` counts: no connection, a reset, a timeout; an HTTP
  error status is passed to the client, not retried.
- A failed request is retried on the next backend not yet tried, for idempotent methods
  only (a ``POST`` may have been processed before the connection broke, so it gets a
  ``502``), as nginx does since 1.9.13.
- The client address is the peer's, or the last ``X-Forwarded-For`` entry when the peer is
  loopback (the only proxy trusted, as nginx's ``set_real_ip_from 127.0.0.1``).
- One record per request: backend, latency, status, attempts (:meth:`Proxy.records`).

Use it as a context manager: ``with Proxy(backends, RoundRobin(...)).serve() as url``; it
runs its own event loop in a thread and stops (closing every connection) on exit, also when
the block raises.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

import pandas as pd

from course_lib.http import free_socket
from course_lib.validation import non_negative_int, optional_positive_number, positive_number

from ._http1 import Message, ProtocolError, read_message, render
from .strategies import NoBackendAvailable, Strategy

__all__ = ["IDEMPOTENT", "Proxy", "client_key"]

IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS", "TRACE"})
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "content-length", "date", "server"}
)
LOOPBACK = ("127.0.0.1", "::1")

KeyFunction = Callable[[str, str, Message], str | None]


def client_key(client: str, target: str, request: Message) -> str:
    """The default balancing key: the client address (what ``IpHash`` needs)."""
    return client


class _Failure(Exception):
    """An upstream attempt failed the way nginx counts (error or timeout)."""


@dataclass
class _Upstream:
    host: str
    port: int
    idle: deque[tuple[asyncio.StreamReader, asyncio.StreamWriter]]


class Proxy:
    """Balance HTTP requests across ``backends`` ({name: base URL}) with ``strategy``,
    whose servers are the same names."""

    def __init__(
        self,
        backends: Mapping[str, str],
        strategy: Strategy,
        *,
        max_fails: int = 1,
        fail_timeout: float = 10.0,
        retry: bool = True,
        connect_timeout: float = 1.0,
        read_timeout: float = 10.0,
        key: KeyFunction = client_key,
        sample_every: float | None = None,
    ) -> None:
        if not isinstance(strategy, Strategy):
            raise TypeError(f"strategy must be a load_balancing strategy, got {strategy!r}")
        if not backends:
            raise ValueError("backends must not be empty")
        names = set(strategy.servers)
        if set(backends) != names:
            raise ValueError(
                f"backends {sorted(backends)} and the strategy's servers {sorted(names)} differ"
            )
        self.backends = dict(backends)
        self.strategy = strategy
        self.max_fails = non_negative_int("max_fails", max_fails)
        self.fail_timeout = positive_number("fail_timeout", fail_timeout)
        self.retry = bool(retry)
        self.connect_timeout = positive_number("connect_timeout", connect_timeout)
        self.read_timeout = positive_number("read_timeout", read_timeout)
        self.sample_every = optional_positive_number("sample_every", sample_every)
        self.key = key
        self._upstreams = {}
        for name, url in self.backends.items():
            parts = urlsplit(url)
            if parts.scheme != "http" or not parts.hostname or not parts.port:
                raise ValueError(f"backend {name!r} must be an http://host:port URL, got {url!r}")
            self._upstreams[name] = _Upstream(parts.hostname, parts.port, deque())
        self._fails: dict[str, deque[float]] = {name: deque() for name in self.backends}
        self._records: list[tuple[float, str, str, float, int, int, str]] = []
        self._samples: list[tuple[float, str, int]] = []
        self._events: list[tuple[float, str, str]] = []
        self._t0 = time.perf_counter()
        self._handlers: set[asyncio.Task[None]] = set()
        self.url = ""

    # -- lifecycle ----------------------------------------------------------------------
    @contextlib.contextmanager
    def serve(self) -> Iterator[str]:
        """Run the proxy on a free loopback port in a thread; yield its URL."""
        loop = asyncio.new_event_loop()
        sock = free_socket()
        ready = threading.Event()
        stop: dict[str, asyncio.Event] = {}
        errors: list[BaseException] = []

        async def main() -> None:
            server = await asyncio.start_server(self._client, sock=sock, backlog=2048)
            stop["event"] = asyncio.Event()
            sampler = asyncio.create_task(self._sample()) if self.sample_every else None
            ready.set()
            await stop["event"].wait()
            if sampler:
                sampler.cancel()
            server.close()
            # Client connections still open (keep-alive) would outlive the loop: end them.
            for task in list(self._handlers):
                task.cancel()
            await asyncio.gather(*self._handlers, return_exceptions=True)
            for upstream in self._upstreams.values():
                while upstream.idle:
                    upstream.idle.pop()[1].close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), 2)

        def run() -> None:
            try:
                loop.run_until_complete(main())
            except BaseException as exc:
                errors.append(exc)
                ready.set()
            finally:
                loop.close()

        thread = threading.Thread(target=run, name="lb-proxy", daemon=True)
        thread.start()
        ready.wait(10)
        if errors:
            raise errors[0]
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self._t0 = time.perf_counter()
        try:
            yield self.url
        finally:
            if "event" in stop and not loop.is_closed():
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(stop["event"].set)
            thread.join(10)
            sock.close()

    # -- what it recorded ---------------------------------------------------------------
    def records(self) -> pd.DataFrame:
        """One row per request: ``t`` (s since start), method, backend (last tried),
        ``latency_ms``, ``status``, ``attempts``, ``client``."""
        columns = ["t", "method", "backend", "latency_ms", "status", "attempts", "client"]
        frame = pd.DataFrame(list(self._records), columns=columns)
        frame["latency_ms"] *= 1000
        return frame

    def active_samples(self) -> pd.DataFrame:
        """Active requests per backend every ``sample_every`` s: ``t``, ``backend``, ``active``."""
        return pd.DataFrame(list(self._samples), columns=["t", "backend", "active"])

    def events(self) -> pd.DataFrame:
        """Health-check events: ``t``, ``backend``, ``event`` (``down`` / ``up``)."""
        return pd.DataFrame(list(self._events), columns=["t", "backend", "event"])

    async def _sample(self) -> None:
        assert self.sample_every is not None
        while True:
            now = time.perf_counter() - self._t0
            for name, n in self.strategy.active().items():
                self._samples.append((now, name, n))
            await asyncio.sleep(self.sample_every)

    # -- serving ------------------------------------------------------------------------
    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")[0]
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            while True:
                try:
                    request = await read_message(reader)
                except (ProtocolError, ValueError, asyncio.IncompleteReadError):
                    writer.write(render("HTTP/1.1 400 Bad Request", [], b"bad request\n"))
                    break
                if request is None:
                    break
                client = peer
                forwarded = request.header("x-forwarded-for")
                if forwarded and peer in LOOPBACK:
                    client = forwarded.rsplit(",", 1)[-1].strip()
                status, headers, body = await self._forward(request, client)
                writer.write(render(f"HTTP/1.1 {status} X", headers, body))
                await writer.drain()
                if not request.keep_alive:
                    break
        except (ConnectionError, OSError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
            self._handlers.discard(task)

    async def _forward(self, request: Message, client: str) -> tuple[int, list, bytes]:
        method, target = request.start[0], request.start[1]
        start = time.perf_counter()
        tried: list[str] = []
        status, headers, body = 502, [], b"bad gateway\n"
        try:
            key = self.key(client, target, request)
            with self.strategy.acquire(key) as server:
                tried.append(server)
                response = await self._attempt(server, request, client)
            while response is None and self.retry and method in IDEMPOTENT:
                server = self._next_untried(tried)
                if server is None:
                    break
                tried.append(server)
                self.strategy._acquire_server(server)
                try:
                    response = await self._attempt(server, request, client)
                finally:
                    self.strategy.release(server)
            if response is not None:
                status, headers, body = response
        except NoBackendAvailable:
            pass
        except ValueError:  # the key function refused the request (an invalid address)
            status, body = 400, b"bad client address\n"
        elapsed = time.perf_counter() - start
        backend = tried[-1] if tried else ""
        self._records.append(
            (start - self._t0, method, backend, elapsed, status, len(tried), client)
        )
        return status, headers, body

    def _next_untried(self, tried: list[str]) -> str | None:
        """The backend after the last tried one, in list order, that is up and untried."""
        up = self.strategy.up
        order = self.strategy.servers
        last = order.index(tried[-1]) if tried[-1] in order else -1
        for step in range(1, len(order) + 1):
            candidate = order[(last + step) % len(order)]
            if candidate in up and candidate not in tried:
                return candidate
        return None

    async def _attempt(
        self, server: str, request: Message, client: str
    ) -> tuple[int, list, bytes] | None:
        """Send ``request`` to ``server``; ``None`` (and a counted failure) if it fails."""
        upstream = self._upstreams[server]
        headers = [(k, v) for k, v in request.headers if k not in HOP_BY_HOP and k != "host"]
        headers = [(k, v) for k, v in headers if k != "x-forwarded-for"]
        headers += [("host", f"{upstream.host}:{upstream.port}"), ("x-forwarded-for", client)]
        wire = render(f"{request.start[0]} {request.start[1]} HTTP/1.1", headers, request.body)
        # A pooled connection the backend closed while idle fails before any byte comes
        # back: that is not the backend failing, so it is retried once on a new connection.
        for pooled in (True, False):
            if pooled and not upstream.idle:
                continue
            try:
                if pooled:
                    reader, writer = upstream.idle.pop()
                else:
                    reader, writer = await asyncio.wait_for(
                        asyncio.open_connection(upstream.host, upstream.port),
                        self.connect_timeout,
                    )
            except (OSError, TimeoutError):
                break
            try:
                writer.write(wire)
                response = await asyncio.wait_for(read_message(reader), self.read_timeout)
                if response is None:
                    raise ConnectionResetError("upstream closed the connection")
            except (OSError, TimeoutError, asyncio.IncompleteReadError, ProtocolError) as exc:
                writer.close()
                if pooled and not isinstance(exc, TimeoutError):
                    continue
                break
            if response.keep_alive:
                upstream.idle.append((reader, writer))
            else:
                writer.close()
            status = int(response.start[1])
            out = [(k, v) for k, v in response.headers if k not in HOP_BY_HOP]
            return status, out, response.body
        self._failed(server)
        return None

    def _failed(self, server: str) -> None:
        if not self.max_fails:
            return
        now = time.monotonic()
        fails = self._fails[server]
        fails.append(now)
        while fails and now - fails[0] > self.fail_timeout:
            fails.popleft()
        if len(fails) >= self.max_fails and server in self.strategy.up:
            self.strategy.mark_down(server)
            self._events.append((time.perf_counter() - self._t0, server, "down"))
            asyncio.get_running_loop().call_later(self.fail_timeout, self._revive, server)

    def _revive(self, server: str) -> None:
        self._fails[server].clear()
        with contextlib.suppress(ValueError):
            self.strategy.mark_up(server)
            self._events.append((time.perf_counter() - self._t0, server, "up"))
