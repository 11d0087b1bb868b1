"""Just enough HTTP/1.1 for the proxy and the load generator: heads and Content-Length bodies.

Both sides of the course rig speak keep-alive HTTP/1.1 with a ``Content-Length`` on every
message (the backends, nginx and the proxy all send one), which keeps this parser to a
few lines; a message without one is refused rather than guessed at.
"""

from __future__ import annotations

import asyncio

__all__ = ["Message", "ProtocolError", "read_message", "render"]

MAX_HEAD = 64 * 1024
MAX_BODY = 16 * 1024 * 1024


class ProtocolError(Exception):
    """The peer sent something this parser does not accept."""


class Message:
    """A request (``start`` = method, target) or a response (``start`` = version, status)."""

    __slots__ = ("body", "headers", "start")

    def __init__(self, start: list[str], headers: list[tuple[str, str]], body: bytes) -> None:
        self.start = start
        self.headers = headers
        self.body = body

    def header(self, name: str, default: str | None = None) -> str | None:
        """The last value of header ``name`` (lower case), or ``default``."""
        for key, value in reversed(self.headers):
            if key == name:
                return value
        return default

    @property
    def keep_alive(self) -> bool:
        return (self.header("connection") or "").lower() != "close"


async def read_message(reader: asyncio.StreamReader) -> Message | None:
    """The next message on ``reader``; ``None`` on a clean end of stream before it starts."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise
    except asyncio.LimitOverrunError as exc:
        raise ProtocolError("message head too large") from exc
    lines = head[:-4].decode("latin-1").split("\r\n")
    start = lines[0].split(" ", 2)
    if len(start) < 2:
        raise ProtocolError(f"bad start line {lines[0]!r}")
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            raise ProtocolError(f"bad header line {line!r}")
        headers.append((name.strip().lower(), value.strip()))
    message = Message(start, headers, b"")
    if message.header("transfer-encoding"):
        raise ProtocolError("chunked bodies are not supported by this rig")
    length = int(message.header("content-length") or 0)
    if not 0 <= length <= MAX_BODY:
        raise ProtocolError(f"bad content-length {length}")
    if length:
        message.body = await reader.readexactly(length)
    return message


def render(start: str, headers: list[tuple[str, str]], body: bytes) -> bytes:
    """One message on the wire, with its ``Content-Length``."""
    lines = [start, *(f"{k}: {v}" for k, v in headers), f"content-length: {len(body)}", "", ""]
    return "\r\n".join(lines).encode("latin-1") + body
