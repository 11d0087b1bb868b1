"""An asyncio reverse proxy that balances across backends with any strategy.

- Active requests per backend are counted by the strategy (``take``/``release``), so least
  connections and two choices see the real load; ``sample_every`` records them over time.
- HTTP/1.1 parsed by httptools (llhttp) with RFC 9112's message-length rules
  (:mod:`._http1`): a request with a bare LF, an obs-fold, a bad or conflicting length,
  or a head over 64 KiB is refused (``400``/``431``) and never forwarded, so nothing a
  client sends can be read as a second request by the backend (request smuggling).
  Replies: HEAD, 1xx, 204 and 304 without a body, chunked and close-delimited bodies read
  whole; every reply goes to the client with its own ``Content-Length``.
- Keep-alive upstream connections: at most ``keepalive`` idle ones per backend (nginx's
  ``keepalive``); one that receives bytes while idle is closed, so a stray reply is never
  taken for the next request's.
- Every wait is bounded: ``connect_timeout`` for a new upstream connection,
  ``read_timeout`` for a backend's reply and for a client that does not read its own.
- Passive health checks with nginx's semantics: a backend that fails ``max_fails`` times
  within ``fail_timeout`` seconds is marked down for ``fail_timeout`` seconds
  (``max_fails=0`` disables it); a lone backend is never marked down (nginx's single
  peer: there is nowhere else to send its requests). A failure is what nginx counts
  with ``proxy_next_upstream error timeout invalid_header`` (the config
  :func:`.nginx.nginx_config` writes): no connection, a reset, a timeout, and a reply
  the parser refuses; an HTTP error status is passed to the client, not retried.
- A failed request is retried on the next backend not yet tried, for idempotent methods
  only (a ``POST`` may have been processed before the connection broke, so it gets a
  ``502``), as nginx does since 1.9.13.
- The client address is the peer's, or the last ``X-Forwarded-For`` entry when the peer is
  loopback (the only proxy trusted, as nginx's ``set_real_ip_from 127.0.0.1``).
- One record per request: backend, latency, status, attempts (:meth:`Proxy.records`).

Use it as a context manager: ``with Proxy(backends, RoundRobin(...)).serve() as url``; it
runs its own event loop (uvloop where installed) in a thread and stops (closing every
connection) on exit, also when the block raises.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import pandas as pd

from course_lib.http import free_socket
from course_lib.validation import (
    non_negative_int,
    optional_positive_number,
    positive_int,
    positive_number,
)

from ._http1 import (
    ClientConnection,
    ClosedBeforeReply,
    Message,
    ProtocolError,
    ServerConnection,
    open_connection,
    reason,
)
from .strategies import NoBackendAvailable, Strategy

try:  # uvloop where installed: the same asyncio API with a loop written in C
    import uvloop
except ImportError:  # pragma: no cover - the default loop then
    uvloop = None

__all__ = ["IDEMPOTENT", "Proxy", "client_key"]

IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS", "TRACE"})
# Headers about one connection (RFC 9110 7.6.1), replaced by each hop, and the ones the
# proxy writes itself.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
        b"date",
        b"server",
    }
)
DROPPED_FROM_REQUESTS = HOP_BY_HOP | {b"host", b"x-forwarded-for"}
BODY_METHODS = frozenset({b"POST", b"PUT", b"PATCH"})
LOOPBACK = ("127.0.0.1", "::1")

KeyFunction = Callable[[str, str, Message], str | None]


def client_key(client: str, target: str, request: Message) -> str:
    """The default balancing key: the client address (what ``IpHash`` needs)."""
    return client


@dataclass
class _Upstream:
    host: str
    port: int
    host_header: bytes = b""
    idle: deque[ClientConnection] = field(default_factory=deque)

    def take_idle(self) -> ClientConnection | None:
        """The most recently used idle connection still open, or ``None``."""
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed:
                return conn
        return None


@dataclass
class _Reply:
    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    # The Content-Length to send; None for none (1xx, 204), the backend's for HEAD and 304.
    length: bytes | None


def _own_reply(status: int, text: str) -> _Reply:
    body = text.encode()
    return _Reply(
        status, reason(status), [(b"content-type", b"text/plain")], body, b"%d" % len(body)
    )


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
        keepalive: int = 64,
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
        self.keepalive = positive_int("keepalive", keepalive)
        self.sample_every = optional_positive_number("sample_every", sample_every)
        self.key = key
        self._upstreams = {}
        for name, url in self.backends.items():
            parts = urlsplit(url)
            if parts.scheme != "http" or not parts.hostname or not parts.port:
                raise ValueError(f"backend {name!r} must be an http://host:port URL, got {url!r}")
            host_header = f"host: {parts.hostname}:{parts.port}\r\n".encode()
            self._upstreams[name] = _Upstream(parts.hostname, parts.port, host_header)
        self._fails: dict[str, deque[float]] = {name: deque() for name in self.backends}
        self._records: list[tuple[float, str, str, float, int, int, str]] = []
        self._samples: list[tuple[float, str, int]] = []
        self._events: list[tuple[float, str, str]] = []
        self._t0 = time.perf_counter()
        self._handlers: set[asyncio.Task[None]] = set()
        self._connections: set[ServerConnection] = set()
        self.url = ""

    # -- lifecycle ----------------------------------------------------------------------
    @contextlib.contextmanager
    def serve(self) -> Iterator[str]:
        """Run the proxy on a free loopback port in a thread; yield its URL."""
        loop = uvloop.new_event_loop() if uvloop is not None else asyncio.new_event_loop()
        sock = free_socket()
        ready = threading.Event()
        stop: dict[str, asyncio.Event] = {}
        errors: list[BaseException] = []

        async def main() -> None:
            running = asyncio.get_running_loop()
            server = await running.create_server(
                lambda: ServerConnection(self._connected), sock=sock, backlog=2048
            )
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
            for conn in list(self._connections):
                conn.close()
            for upstream in self._upstreams.values():
                while upstream.idle:
                    upstream.idle.pop().close()
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
    def _connected(self, conn: ServerConnection) -> None:
        task = asyncio.get_running_loop().create_task(self._client(conn))
        self._handlers.add(task)
        self._connections.add(conn)
        task.add_done_callback(self._handlers.discard)

    async def _client(self, conn: ServerConnection) -> None:
        try:
            while True:
                try:
                    request = await conn.next_request()
                except ProtocolError as exc:
                    reply = _own_reply(exc.status, f"{exc}\n")
                    await conn.send(self._head(reply, None), reply.body, self.read_timeout)
                    await conn.linger(self.read_timeout)
                    break
                if request is None:
                    break
                client = conn.peer
                if client in LOOPBACK:
                    forwarded = request.header("x-forwarded-for")
                    if forwarded:
                        client = forwarded.rsplit(",", 1)[-1].strip()
                reply = await self._forward(request, client)
                await conn.send(self._head(reply, request), reply.body, self.read_timeout)
                if not request.keep_alive:
                    break
        except (ConnectionError, OSError, TimeoutError, asyncio.CancelledError):
            pass
        finally:
            conn.close()
            self._connections.discard(conn)

    @staticmethod
    def _head(reply: _Reply, request: Message | None) -> bytes:
        """The reply's status line and headers; ``request`` None for a refused one (closed)."""
        lines = [b"HTTP/1.1 %d %s\r\n" % (reply.status, reply.reason)]
        lines += [b"%s: %s\r\n" % header for header in reply.headers]
        if reply.length is not None:
            lines.append(b"content-length: %s\r\n" % reply.length)
        if request is None or not request.keep_alive:
            lines.append(b"connection: close\r\n")
        elif request.version == "1.0":
            lines.append(b"connection: keep-alive\r\n")
        lines.append(b"\r\n")
        return b"".join(lines)

    async def _forward(self, request: Message, client: str) -> _Reply:
        method = request.method.decode("latin-1")
        start = time.perf_counter()
        tried: list[str] = []
        reply = None
        try:
            server = self.strategy.take(self.key(client, request.target.decode("latin-1"), request))
        except NoBackendAvailable:
            server = None
        except ValueError:  # the key function refused the request (an invalid address)
            reply = _own_reply(400, "bad client address\n")
            server = None
        if server is not None:
            tried.append(server)
            try:
                reply = await self._attempt(server, request, client)
            finally:
                self.strategy.release(server)
        while reply is None and tried and self.retry and method in IDEMPOTENT:
            server = self._next_untried(tried)
            if server is None:
                break
            tried.append(server)
            try:
                self.strategy.acquire_server(server)
            except ValueError:  # removed from the balancer since _next_untried looked
                break
            try:
                reply = await self._attempt(server, request, client)
            finally:
                self.strategy.release(server)
        if reply is None:
            reply = _own_reply(502, "bad gateway\n")
        elapsed = time.perf_counter() - start
        backend = tried[-1] if tried else ""
        self._records.append(
            (start - self._t0, method, backend, elapsed, reply.status, len(tried), client)
        )
        return reply

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

    def _request_head(self, request: Message, upstream: _Upstream, client: str) -> bytes:
        lines = [b"%s %s HTTP/1.1\r\n" % (request.method, request.target)]
        lines += [
            b"%s: %s\r\n" % header
            for header in request.headers
            if header[0] not in DROPPED_FROM_REQUESTS
        ]
        lines.append(upstream.host_header)
        lines.append(b"x-forwarded-for: %s\r\n" % client.encode("latin-1"))
        if request.body or request.method in BODY_METHODS:
            lines.append(b"content-length: %d\r\n" % len(request.body))
        lines.append(b"\r\n")
        return b"".join(lines)

    async def _attempt(self, server: str, request: Message, client: str) -> _Reply | None:
        """Send ``request`` to ``server``; ``None`` (and a counted failure) if it fails.

        A failure is no connection, a reset, a timeout, or a reply the parser refuses
        (a status that is not three digits, a bad ``Content-Length``, a bare LF): nginx
        counts that last one as ``invalid_header``, an error of the backend.
        """
        upstream = self._upstreams[server]
        head = self._request_head(request, upstream, client)
        head_only = request.method == b"HEAD"
        # A pooled connection the backend closed while idle fails before any byte comes
        # back: that is not the backend failing, so it is retried once on a new connection.
        for pooled in (True, False):
            if pooled:
                conn = upstream.take_idle()
                if conn is None:
                    continue
            else:
                try:
                    conn = await asyncio.wait_for(
                        open_connection(upstream.host, upstream.port), self.connect_timeout
                    )
                except (OSError, TimeoutError):
                    break
            try:
                response = await conn.request(
                    head, request.body, head_only=head_only, timeout=self.read_timeout
                )
            except ClosedBeforeReply:
                conn.close()
                if pooled:
                    continue
                break
            except (OSError, TimeoutError, ProtocolError):
                conn.close()
                break
            if response.keep_alive and len(upstream.idle) < self.keepalive:
                upstream.idle.append(conn)
            else:
                conn.close()
            return self._reply(response, request)
        self._failed(server)
        return None

    @staticmethod
    def _reply(response: Message, request: Message) -> _Reply:
        headers = [h for h in response.headers if h[0] not in HOP_BY_HOP]
        status = response.status
        if request.method == b"HEAD" or status == 304:
            # No body, but the length the body would have (RFC 9110 8.6).
            sent = response.header("content-length")
            length = sent.encode("latin-1") if sent is not None else None
        elif status == 204:
            length = None
        else:
            length = b"%d" % len(response.body)
        return _Reply(status, response.reason, headers, response.body, length)

    def _failed(self, server: str) -> None:
        # nginx never marks a lone server down (ngx_http_upstream_free_round_robin_peer
        # returns early when peers->single): there is nothing to send its requests to.
        if not self.max_fails or len(self.strategy.servers) == 1:
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
