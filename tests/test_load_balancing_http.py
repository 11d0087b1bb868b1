"""The proxy's HTTP/1.1 (issue 18): message length by RFC 9112 (HEAD, 1xx/204/304,
close-delimited and chunked bodies), refused requests (bare LF, obs-fold, ``1_0``,
conflicting lengths, size limits), request smuggling against a real h11 backend, a bad
reply counted as a backend failure, nginx's lone-peer rule, and the load generator's HEAD.

Scripted backends are raw TCP servers in threads that answer each request head with
given bytes, so each framing case is exactly what a misbehaving server would send."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator

import pytest

from course_lib.http import free_socket, serve_processes
from course_lib.load_balancing import RoundRobin
from course_lib.load_balancing._http1 import open_connection
from course_lib.load_balancing.backends import backend_app
from course_lib.load_balancing.loadgen import run_load
from course_lib.load_balancing.proxy import Proxy

# The proxy and its backends only, no Redis or PostgreSQL: one pass of `make test` covers them.
pytestmark = pytest.mark.one_pass

FACTORY = "course_lib.load_balancing.backends:backend_app"
RESET = None  # a script step: reset the connection instead of replying

Step = tuple[bytes, bool] | None  # (bytes to send, close after) or RESET


class Scripted:
    """A TCP server that answers request ``i`` (counted over all connections) with
    ``script(i)``; ``heads`` holds every request head it received."""

    def __init__(self, script: Callable[[int], Step]) -> None:
        self.script = script
        self.heads: list[bytes] = []
        self._lock = threading.Lock()
        self.sock = free_socket()
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self._stop = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buffer = b""
        with conn:
            while True:
                while b"\r\n\r\n" not in buffer:
                    try:
                        data = conn.recv(65536)
                    except OSError:
                        return
                    if not data:
                        return
                    buffer += data
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                with self._lock:
                    self.heads.append(head)
                    step = self.script(len(self.heads) - 1)
                if step is RESET:
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    return
                data, close = step
                try:
                    conn.sendall(data)
                except OSError:
                    return
                if close:
                    return

    def close(self) -> None:
        self._stop = True
        self.sock.close()


@contextlib.contextmanager
def scripted(*scripts: Callable[[int], Step]) -> Iterator[list[Scripted]]:
    servers = [Scripted(s) for s in scripts]
    try:
        yield servers
    finally:
        for server in servers:
            server.close()


def always(data: bytes, close: bool = False) -> Callable[[int], Step]:
    return lambda i: (data, close)


OK = b"HTTP/1.1 200 OK\r\nx-backend: good\r\ncontent-length: 5\r\n\r\nfine\n"


def exchange(url: str, *raw: bytes, timeout: float = 10.0) -> list[bytes]:
    """Send each raw request on one connection, read one reply after each."""
    port = int(url.rsplit(":", 1)[1])
    replies = []
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        reader = Replies(s)
        for request in raw:
            s.sendall(request)
            replies.append(reader.next(head_only=request.startswith(b"HEAD")))
    return replies


class Replies:
    """Replies read off one socket in order (several may arrive in one recv): each up to
    the end of its Content-Length body, or to the server's close."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def _more(self) -> bool:
        chunk = self.sock.recv(65536)
        self.buffer += chunk
        return bool(chunk)

    def next(self, head_only: bool = False) -> bytes:
        while b"\r\n\r\n" not in self.buffer:
            if not self._more():
                data, self.buffer = self.buffer, b""
                return data
        head, _, rest = self.buffer.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if head_only or head.split(b" ")[1] in (b"204", b"304"):
            length = 0
        while len(rest) < length:
            if not self._more():
                break
            rest = self.buffer.partition(b"\r\n\r\n")[2]
        self.buffer = rest[length:]
        return head + b"\r\n\r\n" + rest[:length]


def status_of(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1])


def header_of(reply: bytes, name: bytes) -> bytes | None:
    head = reply.partition(b"\r\n\r\n")[0]
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip()
    return None


def body_of(reply: bytes) -> bytes:
    return reply.partition(b"\r\n\r\n")[2]


# -- finding 1: HEAD, and the other replies without a body ----------------------------------
def test_head_requests_do_not_take_backends_out() -> None:
    names = ["server1", "server2"]
    with serve_processes(FACTORY, [{"name": n, "latency_ms": 0} for n in names]) as procs:
        urls = {p.kwargs["name"]: p.url for p in procs}
        proxy = Proxy(urls, RoundRobin(names), max_fails=1, read_timeout=1.0)
        with proxy.serve() as url:
            head, get = exchange(
                url, b"HEAD / HTTP/1.1\r\nhost: x\r\n\r\n", b"GET / HTTP/1.1\r\n\r\n"
            )
            heads = run_load(url, requests=6, concurrency=2, method="HEAD", progress=False)
            gets = run_load(url, requests=6, concurrency=1, progress=False)
    assert status_of(head) == 200 and body_of(head) == b""
    # the length the body would have: "server1\n"
    assert header_of(head, b"content-length") == b"8"
    assert status_of(get) == 200 and body_of(get) == b"server2\n"
    assert set(heads.status) == {200} and (heads.latency_ms < 1000).all()
    assert set(gets.status) == {200} and set(gets.backend) == set(names)
    assert proxy.events().empty
    assert (proxy.records().attempts == 1).all()


def test_204_304_and_interim_replies_have_no_body() -> None:
    replies = {
        0: b"HTTP/1.1 204 No Content\r\ncontent-length: 7\r\n\r\n",
        1: b"HTTP/1.1 304 Not Modified\r\ncontent-length: 7\r\n\r\n",
        2: b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfinal",
    }
    with scripted(lambda i: (replies[i % 3], False)) as (backend,):
        proxy = Proxy({"s": backend.url}, RoundRobin(["s"]), read_timeout=2.0)
        with proxy.serve() as url:
            start = time.monotonic()
            no_content, not_modified, final = exchange(url, *[b"GET / HTTP/1.1\r\n\r\n"] * 3)
            elapsed = time.monotonic() - start
    assert status_of(no_content) == 204 and header_of(no_content, b"content-length") is None
    assert status_of(not_modified) == 304 and header_of(not_modified, b"content-length") == b"7"
    assert status_of(final) == 200 and body_of(final) == b"final"
    assert elapsed < 2.0  # no reply waited for a body it never gets
    assert len(backend.heads) == 3 and proxy.events().empty


# -- finding 11, and chunked replies --------------------------------------------------------
def test_close_delimited_and_chunked_replies_are_forwarded_whole() -> None:
    close_delimited = b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nthe whole body"
    chunked = (
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n4\r\nthe \r\n5\r\nwhole\r\n0\r\n\r\n"
    )
    with scripted(always(close_delimited, close=True), always(chunked)) as servers:
        urls = {"closing": servers[0].url, "chunked": servers[1].url}
        proxy = Proxy(urls, RoundRobin(list(urls)))
        with proxy.serve() as url:
            first, second = exchange(url, *[b"GET / HTTP/1.1\r\n\r\n"] * 2)
    assert status_of(first) == 200 and body_of(first) == b"the whole body"
    assert header_of(first, b"content-length") == b"14"
    assert body_of(second) == b"the whole" and header_of(second, b"content-length") == b"9"
    assert header_of(second, b"transfer-encoding") is None


# -- finding 12: a bad reply is the backend's failure ---------------------------------------
@pytest.mark.parametrize(
    "bad",
    [
        b"HTTP/1.1 abc OK\r\ncontent-length: 2\r\n\r\nno",
        b"HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\nno",
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ntransfer-encoding: chunked\r\n\r\nno",
        b"HTTP/1.1 200 OK\r\nx: a\nhidden: 1\r\ncontent-length: 2\r\n\r\nno",
        b"HTTP/1.1 200 OK\r\ncontent-length: 1_0\r\n\r\nnononono!!",
    ],
    ids=["status-abc", "length-x", "length-and-chunked", "bare-lf", "length-1_0"],
)
def test_a_reply_the_parser_refuses_is_retried_on_a_healthy_backend(bad: bytes) -> None:
    with scripted(always(bad), always(OK)) as (broken, good):
        urls = {"broken": broken.url, "good": good.url}
        proxy = Proxy(urls, RoundRobin(list(urls)), max_fails=1, fail_timeout=30)
        with proxy.serve() as url:
            replies = exchange(url, *[b"GET / HTTP/1.1\r\n\r\n"] * 3)
        records = proxy.records()
    assert [status_of(r) for r in replies] == [200, 200, 200]
    assert all(body_of(r) == b"fine\n" for r in replies)
    assert records.attempts.tolist() == [2, 1, 1]
    assert proxy.events()[["backend", "event"]].values.tolist() == [["broken", "down"]]


def test_a_backend_that_never_replies_is_bounded_by_read_timeout() -> None:
    with scripted(always(b"")) as (silent,):
        proxy = Proxy({"silent": silent.url}, RoundRobin(["silent"]), read_timeout=0.3)
        with proxy.serve() as url:
            start = time.monotonic()
            (reply,) = exchange(url, b"GET / HTTP/1.1\r\n\r\n")
            elapsed = time.monotonic() - start
    assert status_of(reply) == 502
    assert 0.3 <= elapsed < 5


def test_each_request_on_a_pooled_connection_gets_its_own_read_timeout() -> None:
    # One deadline timer per upstream connection, armed by the first request: the second
    # request on that connection, sent later, must get its full read_timeout, not what is
    # left of the first one's.
    def first_answered_then_silent(i: int) -> Step:
        return (OK, False) if i == 0 else (b"", False)

    with scripted(first_answered_then_silent) as (backend,):
        proxy = Proxy({"b": backend.url}, RoundRobin(["b"]), read_timeout=0.6)
        with proxy.serve() as url:
            (first,) = exchange(url, b"GET / HTTP/1.1\r\n\r\n")
            time.sleep(0.3)  # the gap that separates the two deadlines (any length will do)
            start = time.monotonic()
            (second,) = exchange(url, b"GET / HTTP/1.1\r\n\r\n")
            elapsed = time.monotonic() - start
    assert status_of(first) == 200 and status_of(second) == 502
    assert len(backend.heads) == 2  # the second went out on the pooled connection
    assert 0.59 <= elapsed < 5  # uvloop keeps time in whole milliseconds


def test_a_shorter_timeout_on_a_connection_is_not_delayed_by_a_longer_one() -> None:
    async def two_requests(url: str) -> float:
        host, port = url.removeprefix("http://").split(":")
        conn = await open_connection(host, int(port))
        head = b"GET / HTTP/1.1\r\nhost: b\r\n\r\n"
        reply = await conn.request(head, b"", head_only=False, timeout=30.0)
        assert reply.status == 200
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            await conn.request(head, b"", head_only=False, timeout=0.3)
        return time.monotonic() - start

    def first_answered_then_silent(i: int) -> Step:
        return (OK, False) if i == 0 else (b"", False)

    with scripted(first_answered_then_silent) as (backend,):
        elapsed = asyncio.run(two_requests(backend.url))
    assert 0.29 <= elapsed < 5  # not the 30 s the first request armed the timer for


def test_a_second_reply_is_never_given_to_the_next_request() -> None:
    # A backend out of step sends two replies for one request: the pooled connection
    # must not hand the stray one to whoever comes next.
    twice = OK + b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nstray\n"
    with scripted(always(twice)) as (backend,):
        proxy = Proxy({"b": backend.url}, RoundRobin(["b"]))
        with proxy.serve() as url:
            replies = [exchange(url, b"GET / HTTP/1.1\r\n\r\n")[0] for _ in range(5)]
    assert [body_of(r) for r in replies] == [b"fine\n"] * 5


# -- finding 2 and 17: requests the proxy refuses -------------------------------------------
BAD_REQUESTS = {
    "bare-lf-in-value": b"GET / HTTP/1.1\r\nx: a\ntransfer-encoding: chunked\r\n\r\n",
    "obs-fold": b"GET / HTTP/1.1\r\nx: a\r\n folded\r\n\r\n",
    "length-1_0": b"POST / HTTP/1.1\r\ncontent-length: 1_0\r\n\r\n0123456789",
    "length-and-chunked": (
        b"POST / HTTP/1.1\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n"
    ),
    "two-lengths": b"POST / HTTP/1.1\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nab",
    "bare-lf-line-ends": b"GET / HTTP/1.1\nhost: x\n\n",
    "head-over-64k": b"GET / HTTP/1.1\r\nx: " + b"a" * 70_000 + b"\r\n\r\n",
    "over-100-headers": b"GET / HTTP/1.1\r\n" + b"x: 1\r\n" * 101 + b"\r\n",
    # a header line that never ends: refused while it streams, not buffered to the end
    "head-over-64k-unfinished": b"GET / HTTP/1.1\r\nx: " + b"a" * 600_000,
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_requests_are_refused_and_never_forwarded(name: str) -> None:
    with scripted(always(OK)) as (backend,):
        proxy = Proxy({"b": backend.url}, RoundRobin(["b"]))
        with proxy.serve() as url:
            (reply,) = exchange(url, BAD_REQUESTS[name])
    expected = 431 if name.startswith(("head-over", "over-100")) else 400
    assert status_of(reply) == expected
    assert header_of(reply, b"connection") == b"close"
    assert backend.heads == []


def test_a_chunked_request_is_forwarded_with_its_length() -> None:
    with scripted(always(OK)) as (backend,):
        proxy = Proxy({"b": backend.url}, RoundRobin(["b"]))
        with proxy.serve() as url:
            (reply,) = exchange(
                url, b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
            )
    assert status_of(reply) == 200
    (head,) = backend.heads
    assert b"content-length: 3" in head.split(b"\r\n")
    assert b"transfer-encoding" not in head.lower()


@contextlib.contextmanager
def h11_backend(name: str) -> Iterator[str]:
    """``backend_app(name)`` under uvicorn with h11 (which reads a bare LF as a line end)."""
    import uvicorn

    sock = free_socket()
    config = uvicorn.Config(
        backend_app(name, latency_ms=0), http="h11", log_level="warning", lifespan="off"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline and thread.is_alive():
        time.sleep(0.01)
    assert server.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def test_request_smuggling_through_a_bare_lf_is_refused() -> None:
    # A bare LF hides "transfer-encoding: chunked" inside a header value for a parser that
    # only splits on CRLF; h11 behind it splits on LF, so the "body" would end the request
    # at "0" and leave "GET /smuggled" on the pooled connection for the next client.
    smuggled = b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nhost: x\r\n\r\n"
    attack = (
        b"GET / HTTP/1.1\r\nhost: x\r\nx: a\ntransfer-encoding: chunked\r\n"
        b"content-length: %d\r\n\r\n" % len(smuggled) + smuggled
    )
    with h11_backend("victim") as backend:
        proxy = Proxy({"victim": backend}, RoundRobin(["victim"]))
        with proxy.serve() as url:
            (refused,) = exchange(url, attack)
            (victim,) = exchange(url, b"GET /victim HTTP/1.1\r\nhost: x\r\n\r\n")
        with urllib.request.urlopen(f"{backend}/stats", timeout=10) as response:
            served = json.load(response)["served"]
    assert status_of(refused) == 400
    assert status_of(victim) == 200
    assert served == 1 == len(proxy.records())  # only the victim's request reached it


# -- finding 13: a lone backend is never marked down ----------------------------------------
def test_a_lone_backend_is_never_marked_down() -> None:
    # nginx's ngx_http_upstream_free_round_robin_peer returns before counting a failure
    # when the upstream has a single peer: marking it down would only turn a blip into
    # fail_timeout seconds of 502s.
    with scripted(lambda i: RESET if i == 0 else (OK, False)) as (backend,):
        proxy = Proxy({"only": backend.url}, RoundRobin(["only"]), max_fails=1, fail_timeout=30)
        with proxy.serve() as url:
            first = exchange(url, b"GET / HTTP/1.1\r\n\r\n")[0]
            after = run_load(url, requests=30, concurrency=1, progress=False)
    assert status_of(first) == 502
    assert set(after.status) == {200}
    assert proxy.events().empty


def test_run_load_refuses_what_would_change_the_request() -> None:
    for kwargs, match in (
        ({"method": "GET / HTTP/1.1\r\nx:"}, "method"),
        ({"path": "/a b"}, "path"),
        ({"path": "/a\r\nx: y"}, "path"),
        ({"clients": ["1.2.3.4\r\nx: y"]}, "clients"),
    ):
        with pytest.raises(ValueError, match=match):
            run_load("http://127.0.0.1:1", requests=1, progress=False, **kwargs)


# -- the other sentences of the docstrings --------------------------------------------------
def test_upgrades_are_refused_both_ways() -> None:
    switching = (
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n"
    )
    with scripted(always(switching), always(OK)) as (upgrading, good):
        urls = {"upgrading": upgrading.url, "good": good.url}
        proxy = Proxy(urls, RoundRobin(list(urls)))
        with proxy.serve() as url:
            (retried,) = exchange(url, b"GET / HTTP/1.1\r\n\r\n")
            (refused,) = exchange(
                url, b"GET / HTTP/1.1\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n"
            )
    assert status_of(retried) == 200 and proxy.records().attempts.tolist()[0] == 2
    assert status_of(refused) == 501 and len(good.heads) == 1


def test_pipelined_requests_are_answered_in_order() -> None:
    def numbered(i: int) -> Step:
        return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%d" % (len(str(i)), i), False

    with scripted(numbered) as (backend,):
        proxy = Proxy({"b": backend.url}, RoundRobin(["b"]))
        with proxy.serve() as url:
            port = int(url.rsplit(":", 1)[1])
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(b"GET / HTTP/1.1\r\n\r\n" * 40)  # more than PIPELINE_LIMIT at once
                reader = Replies(s)
                replies = [reader.next() for _ in range(40)]
    assert [body_of(r) for r in replies] == [str(i).encode() for i in range(40)]


def test_idle_upstream_connections_are_capped_at_keepalive() -> None:
    names = ["server1", "server2"]
    with serve_processes(FACTORY, [{"name": n, "latency_ms": 5} for n in names]) as procs:
        urls = {p.kwargs["name"]: p.url for p in procs}
        proxy = Proxy(urls, RoundRobin(names), keepalive=2)
        with proxy.serve() as url:
            df = run_load(url, requests=64, concurrency=16, progress=False)
            idle = {name: len(up.idle) for name, up in proxy._upstreams.items()}
    assert set(df.status) == {200}
    assert all(0 < n <= 2 for n in idle.values()), idle


def test_a_client_that_does_not_read_is_dropped_after_read_timeout() -> None:
    size = 12 << 20  # under MAX_BODY, far over what the socket buffers hold
    big = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % size + b"x" * size
    with scripted(always(big)) as (backend,):
        proxy = Proxy({"b": backend.url}, RoundRobin(["b"]), read_timeout=0.5)
        with proxy.serve() as url:
            port = int(url.rsplit(":", 1)[1])
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                s.sendall(b"GET / HTTP/1.1\r\n\r\n")
                deadline = time.monotonic() + 20
                while len(proxy.records()) == 0 and time.monotonic() < deadline:
                    time.sleep(0.05)  # polling for a state: the reply was forwarded
                while proxy._connections and time.monotonic() < deadline:
                    time.sleep(0.05)  # polling for a state: the connection was dropped
                dropped = not proxy._connections
    assert dropped


def test_a_client_that_half_closes_gets_its_replies_then_the_close() -> None:
    # Two pipelined requests, then the client's FIN: both are answered, then the proxy
    # closes (the connection does not linger half-open).
    with scripted(always(OK)) as (backend,):
        proxy = Proxy({"b": backend.url}, RoundRobin(["b"]))
        with proxy.serve() as url:
            port = int(url.rsplit(":", 1)[1])
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(b"GET / HTTP/1.1\r\n\r\n" * 2)
                s.shutdown(socket.SHUT_WR)
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
    assert data.count(b"HTTP/1.1 200 OK") == 2 and data.endswith(b"fine\n")
