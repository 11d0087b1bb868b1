"""Run HTTP servers from a notebook or a test: in threads, or in processes you can kill.

- :func:`serve`: one ASGI app with uvicorn on a free port of ``127.0.0.1``, in a thread of
  this process; yields its base URL.
- :func:`serve_many`: several apps at once, each in a thread; yields their URLs in order.
- :func:`serve_processes`: one server process per keyword set, each built by an importable
  app factory (``"package.module:function"``), so they share no GIL with the caller and a
  :meth:`ServerProcess.kill` is a real ``SIGKILL``. Each process leads its own process
  group, so stopping it also stops anything it started.

Every server listens on loopback only. Each function is a context manager that stops all
of its servers on exit, also when the block raises; :func:`serve_processes` also stops them
if the interpreter exits first, and a server process whose parent was killed outright
(``kill -9``, a restarted Jupyter kernel) stops itself within a second or so. A server that
does not start in ``startup_timeout`` seconds raises ``TimeoutError`` (with the child's
error output for a process), after stopping the ones that did start. The socket is bound
before the server starts, so no other program can take the port in between.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from course_lib.orphans import watch_parent
from course_lib.validation import positive_number

__all__ = [
    "ServerProcess",
    "echo_app",
    "free_socket",
    "serve",
    "serve_many",
    "serve_processes",
]

LOOPBACK = "127.0.0.1"


def free_socket() -> socket.socket:
    """A TCP socket bound to a free port of 127.0.0.1 (not listening yet)."""
    # IPPROTO_TCP, not the default 0: asyncio sets TCP_NODELAY only on sockets whose proto
    # says TCP, and without it every small response waits ~40 ms (Nagle + delayed ACK).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((LOOPBACK, 0))
    return sock


def _uvicorn_server(app: Callable[..., Any]) -> Any:
    import uvicorn

    config = uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False)
    return uvicorn.Server(config)


class _ThreadServer:
    def __init__(self, app: Callable[..., Any]) -> None:
        self.sock = free_socket()
        self.url = f"http://{LOOPBACK}:{self.sock.getsockname()[1]}"
        self.server = _uvicorn_server(app)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, name="http-server", daemon=True
        )
        self.thread.start()

    def wait_started(self, deadline: float, timeout: float) -> None:
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise TimeoutError(f"HTTP server did not start within {timeout} s")
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


@contextlib.contextmanager
def serve_many(
    apps: Sequence[Callable[..., Any]], *, startup_timeout: float = 10.0
) -> Iterator[list[str]]:
    """Serve each ASGI app of ``apps`` in a thread; yield their base URLs, in order."""
    startup_timeout = positive_number("startup_timeout", startup_timeout)
    if not apps:
        raise ValueError("apps must not be empty")
    servers: list[_ThreadServer] = []
    try:
        for app in apps:
            servers.append(_ThreadServer(app))
        deadline = time.monotonic() + startup_timeout
        for server in servers:
            server.wait_started(deadline, startup_timeout)
        yield [server.url for server in servers]
    finally:
        for server in servers:
            server.stop()


@contextlib.contextmanager
def serve(app: Callable[..., Any], *, startup_timeout: float = 10.0) -> Iterator[str]:
    """Serve one ASGI app in a thread; yield its base URL (see :func:`serve_many`)."""
    with serve_many([app], startup_timeout=startup_timeout) as urls:
        yield urls[0]


class ServerProcess:
    """One server started by :func:`serve_processes`: its ``url``, ``pid`` and ``kwargs``."""

    def __init__(self, factory: str, kwargs: Mapping[str, Any]) -> None:
        self.factory = factory
        self.kwargs = dict(kwargs)
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "course_lib.http", factory, json.dumps(self.kwargs)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: killpg reaches its children too
        )
        self.pid = self._proc.pid
        self.url = ""
        _LIVE.add(self)

    def _wait_ready(self, deadline: float, timeout: float) -> None:
        assert self._proc.stdout is not None
        selector = selectors.DefaultSelector()
        selector.register(self._proc.stdout, selectors.EVENT_READ)
        line = b""
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not selector.select(left):
                break
            chunk = self._proc.stdout.readline()
            if not chunk:
                break
            line += chunk
        selector.close()
        if not line.startswith(b"LISTENING "):
            self.kill()
            error = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
            self.stop()
            raise TimeoutError(
                f"server process {self.factory}({self.kwargs}) did not start within "
                f"{timeout} s{': ' + error.strip().splitlines()[-1] if error.strip() else ''}"
            )
        self.url = line.split()[1].decode()

    @property
    def alive(self) -> bool:
        """Whether the process is still running."""
        return self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        """Exit status once it ended (negative: killed by that signal), else ``None``."""
        return self._proc.poll()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` (default ``SIGKILL``) to the server's process group and reap it."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, sig)
        if sig in (signal.SIGKILL, signal.SIGTERM):
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=10)

    def stop(self, timeout: float = 5.0) -> None:
        """``SIGTERM`` the process group, then ``SIGKILL`` after ``timeout`` seconds."""
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGTERM)
            try:
                self._proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        # Children of a server that exited on its own are still in its group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        for stream in (self._proc.stdout, self._proc.stderr):
            if stream is not None:
                stream.close()
        _LIVE.discard(self)

    def __repr__(self) -> str:
        state = "alive" if self.alive else f"exited {self.returncode}"
        return f"ServerProcess({self.factory}, {self.url or 'starting'}, pid={self.pid}, {state})"


_LIVE: weakref.WeakSet[ServerProcess] = weakref.WeakSet()


@atexit.register
def _stop_leftovers() -> None:
    for server in list(_LIVE):
        server.stop(timeout=1.0)


@contextlib.contextmanager
def serve_processes(
    factory: str, kwargs_list: Sequence[Mapping[str, Any]], *, startup_timeout: float = 20.0
) -> Iterator[list[ServerProcess]]:
    """One server process per item of ``kwargs_list``, each serving ``factory(**kwargs)``.

    ``factory`` is ``"package.module:function"``, importable by a fresh interpreter, and
    returns an ASGI app; ``kwargs`` must be JSON. The processes start in parallel; the
    block gets them in order, each with its ``url``.
    """
    startup_timeout = positive_number("startup_timeout", startup_timeout)
    if not isinstance(factory, str) or factory.count(":") != 1:
        raise ValueError(f"factory must be 'package.module:function', got {factory!r}")
    if not kwargs_list:
        raise ValueError("kwargs_list must not be empty")
    for kwargs in kwargs_list:
        try:
            json.dumps(dict(kwargs))
        except (TypeError, ValueError) as exc:
            raise TypeError(f"kwargs_list items must be JSON objects: {exc}") from None
    servers: list[ServerProcess] = []
    try:
        for kwargs in kwargs_list:
            servers.append(ServerProcess(factory, kwargs))
        deadline = time.monotonic() + startup_timeout
        for server in servers:
            server._wait_ready(deadline, startup_timeout)
        yield servers
    finally:
        for server in servers:
            server.stop()


def echo_app(name: str = "") -> Callable[..., Any]:
    """A minimal ASGI app answering ``{"name": name, "pid": <its process id>}`` to any
    request: the smallest server for checking a rig works."""
    body = json.dumps({"name": name, "pid": os.getpid()}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


def _child(factory: str, kwargs_json: str) -> None:
    """Body of a server process: build the app, bind, announce the URL, serve until TERM."""
    module_name, function = factory.split(":")
    app = getattr(importlib.import_module(module_name), function)(**json.loads(kwargs_json))
    sock = free_socket()
    sock.listen(2048)  # connections made right after the announcement wait in the backlog
    server = _uvicorn_server(app)
    watch_parent(_stop_own_group)
    # uvicorn installs its own SIGTERM handler (graceful stop) once it runs.
    print(f"LISTENING http://{LOOPBACK}:{sock.getsockname()[1]}", flush=True)
    server.run(sockets=[sock])


def _stop_own_group() -> None:
    """A parent killed outright (a kernel restarted, ``kill -9``) cannot stop its servers:
    each server stops its own process group once orphaned."""
    os.killpg(0, signal.SIGTERM)  # graceful first (uvicorn handles TERM)
    time.sleep(5)
    os.killpg(0, signal.SIGKILL)


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2])
