"""HTTP/1.1 for the proxy and the load generator, parsed by httptools (llhttp, the parser
of uvicorn and Node.js).

llhttp applies RFC 9112's framing in strict mode: a bare LF or a bare CR, an obs-fold
line, a ``Content-Length`` that is not digits (``1_0``), two ``Content-Length`` headers,
``Content-Length`` together with ``Transfer-Encoding``, a ``Transfer-Encoding`` that does
not end in ``chunked`` on a request, and a status that is not three digits are all
refused (:class:`ProtocolError`). This module adds what llhttp leaves to its caller:

- size limits: a head over :data:`MAX_HEAD` bytes or :data:`MAX_HEADERS` header lines
  (answered ``431``), a body over :data:`MAX_BODY` bytes (``413``);
- message length from the request: the reply to ``HEAD`` ends with its head (llhttp cannot
  be told so: the connection is not reused after it); replies 1xx, 204 and 304 have no
  body; a reply with neither ``Content-Length`` nor ``Transfer-Encoding`` runs until the
  server closes the connection, and is complete only then;
- interim 1xx replies (``100 Continue``) are skipped; ``101`` (an upgrade) is refused;
- keep-alive from the version and the ``Connection`` header (llhttp's verdict).

:class:`ServerConnection` reads requests (pipelined ones in order) and writes replies;
:class:`ClientConnection` writes a request and reads its reply. Both are asyncio
protocols driven by callbacks: bytes go from the socket straight into the parser, each
message goes out in one ``writelines`` (head and body, the body not copied), and no task
or coroutine is created per request.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from http import HTTPStatus
from typing import Protocol

import httptools

__all__ = [
    "MAX_BODY",
    "MAX_HEAD",
    "MAX_HEADERS",
    "ClientConnection",
    "ClosedBeforeReply",
    "Message",
    "ProtocolError",
    "RequestHandler",
    "ServerConnection",
    "open_connection",
    "reason",
]

MAX_HEAD = 64 * 1024
MAX_HEADERS = 100
MAX_BODY = 16 * 1024 * 1024

NO_BODY_STATUS = frozenset({204, 304})


class ClosedBeforeReply(ConnectionResetError):
    """The server closed the connection before any byte of its reply."""


class ProtocolError(Exception):
    """The peer sent something this module refuses; ``status`` is the reply it deserves."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class Message:
    """A request (``method``, ``target``) or a response (``status``, ``reason``).

    ``headers`` are ``(name, value)`` byte pairs, names in lower case, in arrival order.
    """

    __slots__ = (
        "body",
        "headers",
        "keep_alive",
        "method",
        "reason",
        "status",
        "target",
        "version",
    )

    def __init__(self) -> None:
        self.method = b""
        self.target = b""
        self.status = 0
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = b""
        self.keep_alive = True
        self.version = "1.1"

    def header(self, name: str, default: str | None = None) -> str | None:
        """The last value of header ``name`` (lower case) as text, or ``default``."""
        key = name.encode("latin-1")
        for k, v in reversed(self.headers):
            if k == key:
                return v.decode("latin-1")
        return default


def reason(status: int) -> bytes:
    """The standard reason phrase of ``status`` (``b""`` for an unknown one)."""
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


class _Builder:
    """httptools callbacks that assemble one message at a time, within the size limits."""

    def __init__(self, is_response: bool, on_message: Callable[[Message], None]) -> None:
        self._on_message = on_message
        self.parser = (
            httptools.HttpResponseParser(self) if is_response else httptools.HttpRequestParser(self)
        )
        self.is_response = is_response
        self.head_only = False  # the reply to a HEAD: complete with its head
        self.error: Exception | None = None
        self.message: Message | None = None
        self.headers_done = False
        self._began_now = False
        self._spill = 0

    def feed(self, data: bytes) -> None:
        self._began_now = False
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            # An exception raised in a callback reaches us wrapped, without its cause.
            if self.error is not None:
                raise self.error from None
            raise ProtocolError(str(exc) or type(exc).__name__) from None
        if self.message is not None and not self.headers_done and not self._began_now:
            # httptools holds a header line until it ends: a head still open after a
            # whole further read is bounded here (to MAX_HEAD plus the read it began in).
            self._spill += len(data)
            if self._spill > MAX_HEAD:
                raise ProtocolError(f"message head over {MAX_HEAD} bytes", 431)

    def _fail(self, error: Exception) -> None:
        self.error = error
        raise error

    # -- the callbacks --------------------------------------------------------------
    def on_message_begin(self) -> None:
        self.message = Message()
        self._head = 0
        self._body: list[bytes] = []
        self._body_size = 0
        self.headers_done = False
        self._began_now = True
        self._spill = 0

    def on_url(self, url: bytes) -> None:
        self._head += len(url)
        self.message.target += url  # type: ignore[union-attr]

    def on_status(self, status: bytes) -> None:
        self.message.reason += status  # type: ignore[union-attr]

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head += len(name) + len(value) + 4
        if self._head > MAX_HEAD:
            self._fail(ProtocolError(f"message head over {MAX_HEAD} bytes", 431))
        self.message.headers.append((name.lower(), value))  # type: ignore[union-attr]

    def on_headers_complete(self) -> None:
        message = self.message
        assert message is not None
        # Counted once the head is complete: MAX_HEAD already bounds what is held until then.
        if len(message.headers) > MAX_HEADERS:
            self._fail(ProtocolError(f"more than {MAX_HEADERS} header lines", 431))
        parser = self.parser
        self.headers_done = True
        message.version = parser.get_http_version()
        # llhttp's verdict: the version, the Connection header, and (for a response)
        # whether the body runs to the connection's close.
        message.keep_alive = parser.should_keep_alive()
        if self.is_response:
            status = message.status = parser.get_status_code()
            if status == 101:
                self._fail(ProtocolError("protocol upgrades are not supported", 502))
            if self.head_only:
                # llhttp would wait for the Content-Length bytes a HEAD reply never sends,
                # and has no way to be told: stop here, and drop the connection after.
                message.keep_alive = False
                self._complete()
                self._fail(_HeadComplete())
        else:
            message.method = parser.get_method()
            if parser.should_upgrade():
                self._fail(ProtocolError("protocol upgrades are not supported", 501))

    def on_body(self, chunk: bytes) -> None:
        self._body_size += len(chunk)
        if self._body_size > MAX_BODY:
            self._fail(ProtocolError(f"body over {MAX_BODY} bytes", 413))
        self._body.append(chunk)

    def on_message_complete(self) -> None:
        message = self.message
        assert message is not None
        if self.is_response and 100 <= message.status < 200:
            self.message = None  # an interim reply: the final one follows
            return
        self._complete()

    def _complete(self) -> None:
        message = self.message
        assert message is not None
        message.body = b"".join(self._body)
        self.message = None
        self._on_message(message)

    def finish(self) -> bool:
        """At end of stream: complete a close-delimited response; ``False`` if a message
        was cut short (or nothing had started)."""
        message = self.message
        if message is None or not self.headers_done or not self.is_response:
            return False
        framed = any(k in (b"content-length", b"transfer-encoding") for k, _ in message.headers)
        if framed or message.status < 200 or message.status in NO_BODY_STATUS:
            return False  # a length that was not reached: cut short
        message.keep_alive = False
        self._complete()
        return True


class _HeadComplete(Exception):
    """Raised from the callbacks to stop llhttp after the head of a HEAD reply."""


class ServerConnection(asyncio.Protocol):
    """One client's connection to a server, driven by callbacks (no task per request).

    ``handler.on_request(conn, message)`` gets each request, one at a time in arrival
    order; the handler answers with :meth:`reply`, after which the next queued request
    goes out. ``handler.on_refused(conn, error)`` gets a request the parser refused
    (answer it with :meth:`refuse`). Reading pauses while :data:`PIPELINE_LIMIT`
    requests wait, so a client cannot queue unbounded work; a client that does not read
    its replies for ``send_timeout`` s is dropped.
    """

    PIPELINE_LIMIT = 16

    def __init__(self, handler: RequestHandler, send_timeout: float) -> None:
        self._handler = handler
        self._send_timeout = send_timeout
        self._requests: collections.deque[Message | ProtocolError] = collections.deque()
        self._builder = _Builder(False, self._requests.append)
        self._busy = False  # a request is with the handler
        self._dispatching = False
        self._write_paused = False
        self._write_timer: asyncio.TimerHandle | None = None
        self._read_paused = False
        self._lingering = False
        self._eof = False  # the client has sent all it will send
        self.closed = False
        self.transport: asyncio.Transport | None = None
        self.peer = ""

    # -- asyncio callbacks ----------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if peer else ""
        self._handler.on_connect(self)

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return  # the rest of a refused request, read only to be dropped
        try:
            self._builder.feed(data)
        except ProtocolError as exc:
            self._requests.append(exc)
            self._pause_reading()  # nothing after a bad message is read
        if len(self._requests) >= self.PIPELINE_LIMIT:
            self._pause_reading()
        self._dispatch()

    def eof_received(self) -> bool:
        self._eof = True
        if self._lingering or (not self._busy and not self._requests):
            self.close()
        return True  # keep our side open for the replies still to come

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._requests.clear()
        if self._write_timer is not None:
            self._write_timer.cancel()
        self._handler.on_disconnect(self)

    def pause_writing(self) -> None:
        self._write_paused = True
        loop = asyncio.get_running_loop()
        self._write_timer = loop.call_later(self._send_timeout, self._abort)

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None
        self._dispatch()

    # -- flow -----------------------------------------------------------------------
    def _pause_reading(self) -> None:
        if not self._read_paused and not self.transport.is_closing():
            self._read_paused = True
            self.transport.pause_reading()

    def _dispatch(self) -> None:
        # A loop rather than recursion: a reply given synchronously dispatches the next.
        if self._dispatching:
            return
        self._dispatching = True
        try:
            while not self._busy and not self._write_paused and self._requests:
                if self.closed:
                    return
                item = self._requests.popleft()
                self._busy = True
                if isinstance(item, ProtocolError):
                    self._handler.on_refused(self, item)
                else:
                    self._handler.on_request(self, item)
            if self._eof and not self._busy and not self._requests and not self._lingering:
                self.close()  # every request the client sent before its end is answered
                return
            if (
                self._read_paused
                and len(self._requests) < self.PIPELINE_LIMIT // 2
                and not self._lingering
                and not self.transport.is_closing()
            ):
                self._read_paused = False
                self.transport.resume_reading()
        finally:
            self._dispatching = False

    def reply(self, head: bytes, body: bytes, keep_alive: bool) -> None:
        """Send the reply to the current request (one ``writelines``, the body not
        copied); close after it unless ``keep_alive``."""
        self._busy = False
        if self.closed or self.transport.is_closing():
            return
        self.transport.writelines((head, body) if body else (head,))
        if not keep_alive:
            self.close()
            return
        if self._requests or self._eof or self._read_paused:
            self._dispatch()  # a request waits, the client has ended, or reading resumes

    def refuse(self, head: bytes, body: bytes, linger: float) -> None:
        """Send the reply to a refused request, end our side, then read and drop what
        the client still sends until it closes or ``linger`` s: closing at once with its
        bytes unread would send a reset, which can destroy the reply before the client
        reads it (nginx's ``lingering_close``)."""
        self._busy = False
        self._lingering = True
        self._requests.clear()
        if self.closed or self.transport.is_closing():
            return
        self.transport.writelines((head, body))
        if self.transport.can_write_eof():
            self.transport.write_eof()
        if self._read_paused:
            self._read_paused = False
            self.transport.resume_reading()
        asyncio.get_running_loop().call_later(linger, self.close)

    def _abort(self) -> None:
        self.closed = True
        self.transport.abort()  # close() would wait for the unread bytes to go

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class RequestHandler(Protocol):
    """What a :class:`ServerConnection` calls."""

    def on_connect(self, conn: ServerConnection) -> None: ...
    def on_request(self, conn: ServerConnection, request: Message) -> None: ...
    def on_refused(self, conn: ServerConnection, error: ProtocolError) -> None: ...
    def on_disconnect(self, conn: ServerConnection) -> None: ...


class ClientConnection(asyncio.Protocol):
    """A keep-alive connection to a server: one request at a time with :meth:`send`
    (a callback) or :meth:`request` (a coroutine).

    Bytes that arrive while no request is outstanding, or after the reply, mean the
    server is out of step (or closing): the connection is closed then, as nginx does
    with its idle upstreams, so a stray reply can never be taken for the answer to the
    next request.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # One parser for the connection's life: after a HEAD (which stops it mid-message)
        # or any error the connection is closed, so it never parses from a bad state.
        # The replies parsed from the current read: more than one is a server out of step.
        self._replies: list[Message] = []
        self._builder = _Builder(True, self._replies.append)
        self._done: Callable[[Message | None, BaseException | None], None] | None = None
        # The outstanding request's deadline (loop time), watched by one timer per
        # connection that re-arms itself rather than one timer per request: on a busy
        # keep-alive connection it fires once per timeout, not twice per request.
        self._deadline = 0.0
        self._timeout = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        # Kept: asyncio.get_running_loop() costs a getpid() system call on Python 3.11.
        self._loop = asyncio.get_running_loop()

    def data_received(self, data: bytes) -> None:
        if self._done is None:
            self.close()  # unsolicited bytes
            return
        try:
            self._builder.feed(data)
        except _HeadComplete:
            pass
        except ProtocolError as exc:
            self.close()
            self._resolve(None, exc)
            return
        if self._replies:
            # The reply goes out only once this read is parsed to its end, so that bytes
            # after it (a second message) close the connection before anyone reuses it.
            result, *extra = self._replies
            self._replies.clear()
            if extra or self._builder.message is not None or not result.keep_alive:
                self.close()
            self._resolve(result, None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._done is None:
            return
        if self._builder.finish():  # a close-delimited body ends here
            result = self._replies.pop()
            self._resolve(result, None)
        elif self._builder.message is None:
            self._resolve(None, ClosedBeforeReply("the server closed the connection"))
        else:
            self._resolve(None, ConnectionResetError("the server closed the connection mid-reply"))

    def _resolve(self, reply: Message | None, error: BaseException | None) -> None:
        done, self._done = self._done, None
        if done is not None:
            done(reply, error)

    def _check_deadline(self) -> None:
        """The timer fired: time the request out if its deadline has passed, else wait
        for the deadline of the request now outstanding (or stop, if none is)."""
        self._timer = None
        if self._done is None or self.closed:
            return
        left = self._deadline - self._loop.time()
        if left > 0:
            self._timer = self._loop.call_later(left, self._check_deadline)
            return
        self.close()
        self._resolve(None, TimeoutError(f"no reply within {self._timeout} s"))

    def send(
        self,
        head: bytes,
        body: bytes,
        *,
        head_only: bool,
        timeout: float,
        done: Callable[[Message | None, BaseException | None], None],
    ) -> None:
        """Send one request (``head`` ends with the blank line); ``done(reply, None)``
        or ``done(None, error)`` is called once: ``TimeoutError`` when the reply is not
        complete within ``timeout`` s, :class:`ProtocolError` for a reply the parser
        refuses, ``ConnectionResetError`` (:class:`ClosedBeforeReply` when no byte came
        back) if the connection ends first; the connection is closed after any of these.
        ``head_only`` for a ``HEAD`` request."""
        loop = self._loop
        if self.closed or self.transport.is_closing() or self._done is not None:
            loop.call_soon(done, None, ClosedBeforeReply("the connection is not usable"))
            return
        self._done = done
        self._builder.head_only = head_only
        self._timeout = timeout
        self._deadline = loop.time() + timeout
        if self._timer is not None and self._timer.when() > self._deadline:
            self._timer.cancel()  # armed for a later deadline than this request's
            self._timer = None
        if self._timer is None:
            self._timer = loop.call_at(self._deadline, self._check_deadline)
        self.transport.writelines((head, body) if body else (head,))

    async def request(
        self, head: bytes, body: bytes, *, head_only: bool, timeout: float
    ) -> Message:
        """:meth:`send` as a coroutine: the reply, or the error raised."""
        future: asyncio.Future[Message] = self._loop.create_future()

        def done(reply: Message | None, error: BaseException | None) -> None:
            if future.done():
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(reply)  # type: ignore[arg-type]

        self.send(head, body, head_only=head_only, timeout=timeout, done=done)
        try:
            return await future
        except asyncio.CancelledError:
            self.close()  # the caller gave up mid-request: the reply would come unasked
            raise

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


async def open_connection(host: str, port: int) -> ClientConnection:
    """A :class:`ClientConnection` to ``host:port``."""
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_connection(ClientConnection, host, port)
    return protocol
