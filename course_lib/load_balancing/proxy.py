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
import weakref
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


@dataclass(slots=True)
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


@dataclass(slots=True)
class _Reply:
    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]  # hop-by-hop ones included: _head leaves them out
    body: bytes
    # The Content-Length to send; None for none (1xx, 204), the backend's for HEAD and 304.
    length: bytes | None


@dataclass(slots=True)
class _Exchange:
    """One client request on its way through the proxy."""

    conn: ServerConnection
    request: Message
    client: str
    head: bytes  # the request as forwarded up to its Host line, the same for every attempt
    start: float
    tried: list[str] = field(default_factory=list)


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
        self._connecting: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._connections: set[ServerConnection] = set()
        self._upstream_conns: weakref.WeakSet[ClientConnection] = weakref.WeakSet()
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
                lambda: ServerConnection(self, self.read_timeout), sock=sock, backlog=2048
            )
            stop["event"] = asyncio.Event()
            sampler = asyncio.create_task(self._sample()) if self.sample_every else None
            ready.set()
            await stop["event"].wait()
            if sampler:
                sampler.cancel()
            server.close()
            # Connections still open (keep-alive, in flight) would outlive the loop: end them.
            self._stopping = True
            for task in list(self._connecting):
                task.cancel()
            await asyncio.gather(*self._connecting, return_exceptions=True)
            for conn in list(self._connections):
                conn.close()
            for upstream_conn in list(self._upstream_conns):
                upstream_conn.close()
            await asyncio.sleep(0)  # let the closes run their callbacks
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

    # -- serving: callbacks from the connections, no task per request ------------------
    def on_connect(self, conn: ServerConnection) -> None:
        """A client connected (tracked, to be closed when the proxy stops)."""
        self._connections.add(conn)

    def on_disconnect(self, conn: ServerConnection) -> None:
        """A client's connection ended; a request still in flight is answered to no one."""
        self._connections.discard(conn)

    def on_refused(self, conn: ServerConnection, error: ProtocolError) -> None:
        """A request the parser refused: answered with its status (400, 413, 431, 501),
        never forwarded, and the connection closed after a lingering read."""
        reply = _own_reply(error.status, f"{error}\n")
        conn.refuse(self._head(reply, None), reply.body, linger=self.read_timeout)

    def on_request(self, conn: ServerConnection, request: Message) -> None:
        """A request: picked, forwarded, retried as the module says; answered once."""
        client, head = self._forwarded(conn, request)
        exchange = _Exchange(conn, request, client, head, time.perf_counter())
        try:
            server = self.strategy.take(self.key(client, request.target.decode("latin-1"), request))
        except NoBackendAvailable:
            self._finish(exchange, _own_reply(502, "bad gateway\n"))
            return
        except ValueError:  # the key function refused the request (an invalid address)
            self._finish(exchange, _own_reply(400, "bad client address\n"))
            return
        self._try(exchange, server)

    @staticmethod
    def _forwarded(conn: ServerConnection, request: Message) -> tuple[str, bytes]:
        """The client's address, and the request as forwarded up to its Host line (which
        depends on the backend): one pass over the headers."""
        lines = [b"%s %s HTTP/1.1" % (request.method, request.target)]
        forwarded_for = b""
        for header in request.headers:
            if header[0] == b"x-forwarded-for":
                forwarded_for = header[1]
            elif header[0] not in DROPPED_FROM_REQUESTS:
                lines.append(b": ".join(header))
        client = conn.peer
        if client in LOOPBACK and forwarded_for:
            client = forwarded_for.rsplit(b",", 1)[-1].strip().decode("latin-1")
        lines.append(b"x-forwarded-for: " + client.encode("latin-1"))
        if request.body or request.method in BODY_METHODS:
            lines.append(b"content-length: %d" % len(request.body))
        lines.append(b"")  # the head goes on with the Host line: end this one
        return client, b"\r\n".join(lines)

    @staticmethod
    def _head(reply: _Reply, request: Message | None) -> bytes:
        """The reply's status line and headers; ``request`` None for a refused one (closed)."""
        lines = [b"HTTP/1.1 %d %s" % (reply.status, reply.reason)]
        for header in reply.headers:
            if header[0] not in HOP_BY_HOP:
                lines.append(b": ".join(header))
        if reply.length is not None:
            lines.append(b"content-length: " + reply.length)
        if request is None or not request.keep_alive:
            lines.append(b"connection: close")
        elif request.version == "1.0":
            lines.append(b"connection: keep-alive")
        lines += (b"", b"")  # the empty line that ends the head
        return b"\r\n".join(lines)

    def _finish(self, exchange: _Exchange, reply: _Reply) -> None:
        request = exchange.request
        tried = exchange.tried
        self._records.append(
            (
                exchange.start - self._t0,
                request.method.decode("latin-1"),
                tried[-1] if tried else "",
                time.perf_counter() - exchange.start,
                reply.status,
                len(tried),
                exchange.client,
            )
        )
        exchange.conn.reply(self._head(reply, request), reply.body, request.keep_alive)

    def _try(self, exchange: _Exchange, server: str) -> None:
        """One attempt on ``server`` (already counted active by the strategy)."""
        exchange.tried.append(server)
        upstream = self._upstreams[server]
        conn = upstream.take_idle()
        if conn is not None:
            self._send(exchange, server, conn, pooled=True)
        else:
            self._connect(exchange, server)

    def _connect(self, exchange: _Exchange, server: str) -> None:
        if self._stopping:
            self.strategy.release(server)
            self._finish(exchange, _own_reply(502, "bad gateway\n"))
            return
        # The one await on the path, and only for a new connection: a task of its own.
        task = asyncio.get_running_loop().create_task(self._open(exchange, server))
        self._connecting.add(task)
        task.add_done_callback(self._connecting.discard)

    async def _open(self, exchange: _Exchange, server: str) -> None:
        upstream = self._upstreams[server]
        try:
            conn = await asyncio.wait_for(
                open_connection(upstream.host, upstream.port), self.connect_timeout
            )
        except (OSError, TimeoutError):
            self._attempt_failed(exchange, server)
            return
        self._upstream_conns.add(conn)
        self._send(exchange, server, conn, pooled=False)

    def _send(self, exchange: _Exchange, server: str, conn: ClientConnection, pooled: bool) -> None:
        request = exchange.request

        def done(response: Message | None, error: BaseException | None) -> None:
            if response is not None:
                upstream = self._upstreams[server]
                if not conn.closed and len(upstream.idle) < self.keepalive:
                    upstream.idle.append(conn)
                else:
                    conn.close()
                self.strategy.release(server)
                self._finish(exchange, self._reply(response, request))
            elif pooled and isinstance(error, ClosedBeforeReply):
                # A pooled connection the backend closed while idle fails before any
                # byte comes back: not the backend failing, so one new connection.
                self._connect(exchange, server)
            else:
                self._attempt_failed(exchange, server)

        conn.send(
            exchange.head + self._upstreams[server].host_header + b"\r\n",
            request.body,
            head_only=request.method == b"HEAD",
            timeout=self.read_timeout,
            done=done,
        )

    def _attempt_failed(self, exchange: _Exchange, server: str) -> None:
        """Count the failure (nginx's error, timeout, invalid_header), then retry an
        idempotent request on the next backend not yet tried, or answer 502."""
        self._failed(server)
        self.strategy.release(server)
        request = exchange.request
        if self.retry and request.method.decode("latin-1") in IDEMPOTENT:
            following = self._next_untried(exchange.tried)
            if following is not None:
                try:
                    self.strategy.acquire_server(following)
                except ValueError:  # removed from the balancer since _next_untried looked
                    pass
                else:
                    self._try(exchange, following)
                    return
        self._finish(exchange, _own_reply(502, "bad gateway\n"))

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

    @staticmethod
    def _reply(response: Message, request: Message) -> _Reply:
        status = response.status
        if request.method == b"HEAD" or status == 304:
            # No body, but the length the body would have (RFC 9110 8.6).
            sent = response.header("content-length")
            length = sent.encode("latin-1") if sent is not None else None
        elif status == 204:
            length = None
        else:
            length = b"%d" % len(response.body)
        return _Reply(status, response.reason, response.headers, response.body, length)

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
