"""The rig's upstreams as an nginx config, and nginx run on a free loopback port.

:func:`nginx_config` writes one ``upstream`` block for the same backends the course
proxy uses, with one of nginx's balancing methods (:data:`METHODS`), and:

- ``worker_processes 1``: each nginx worker keeps its own balancer state (round-robin
  position, connection counts), so one worker is what is comparable with one proxy;
- ``set_real_ip_from 127.0.0.1`` + ``real_ip_header X-Forwarded-For``: the client address
  comes from ``X-Forwarded-For`` only when the peer is loopback, as the course proxy does;
- keep-alive upstream connections (``keepalive``, HTTP/1.1, empty ``Connection``);
- passive health checks ``max_fails`` / ``fail_timeout`` on every server, and the next
  server tried after an error, a timeout or an invalid reply (``proxy_next_upstream``), as
  the course proxy does.

:func:`run_nginx` starts nginx on such a config (its own prefix folder, no daemon) and
stops it on exit, also when the block raises. :func:`nginx_binary` says whether nginx is
installed (``None`` if not; :data:`INSTALL_HINT` says how to get it).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from urllib.parse import urlsplit

from course_lib.http import free_socket
from course_lib.validation import non_negative_int, positive_int, positive_number

__all__ = ["INSTALL_HINT", "METHODS", "nginx_binary", "nginx_config", "run_nginx"]

METHODS = {
    "round_robin": "",
    "weighted": "",
    "least_conn": "least_conn;",
    "ip_hash": "ip_hash;",
    "hash": "hash $request_uri consistent;",
    "random_two": "random two least_conn;",
}

INSTALL_HINT = (
    "nginx is not installed: `sudo apt-get install nginx` (Debian/Ubuntu), "
    "`brew install nginx` (macOS) or `conda install -c conda-forge nginx`"
)


def nginx_binary() -> str | None:
    """Path of the nginx executable, or ``None``."""
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
    )


# What may go into the config unquoted: nginx ends a token at whitespace, ';', '{', '}'
# and starts a comment at '#', and reads quotes and '$' (variables) specially. Names go
# into a comment, hosts and the prefix into directives: anything else is refused.
_NAME = re.compile(r"[A-Za-z0-9._:@-]+")
_HOST = re.compile(r"[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\]")
_PATH = re.compile(r"[A-Za-z0-9._/+,=@%:-]+")


def _safe(parameter: str, value: object, pattern: re.Pattern[str]) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{parameter} must be a str, got {type(value).__name__}")
    if not pattern.fullmatch(value):
        raise ValueError(
            f"{parameter} {value!r} holds characters nginx would read as config syntax "
            f"(allowed: {pattern.pattern})"
        )
    return value


def nginx_config(
    backends: Mapping[str, str],
    *,
    port: int,
    prefix: str,
    method: str = "round_robin",
    weights: Mapping[str, int] | None = None,
    max_fails: int = 1,
    fail_timeout: float = 10.0,
    keepalive: int = 64,
) -> str:
    """An nginx.conf balancing ``backends`` ({name: URL}, in order) with ``method``.

    Backend names, URL hosts and ``prefix`` are refused (``ValueError`` naming them) when
    they hold anything nginx reads as syntax (whitespace, ``;``, braces, ``#``, quotes,
    ``$``), so no value can add a directive to the config."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
    if not backends:
        raise ValueError("backends must not be empty")
    port = positive_int("port", port)
    prefix = _safe("prefix", prefix, _PATH)
    max_fails = non_negative_int("max_fails", max_fails)
    fail_timeout = positive_number("fail_timeout", fail_timeout)
    keepalive = positive_int("keepalive", keepalive)
    if method == "weighted":
        if weights is None or set(weights) != set(backends):
            raise ValueError("weights must give a weight for every backend with method='weighted'")
    elif weights is not None:
        raise ValueError("weights are only used with method='weighted'")
    servers = []
    for name, url in backends.items():
        _safe("backend name", name, _NAME)
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname or not parts.port:
            raise ValueError(f"backend {name!r} must be an http://host:port URL, got {url!r}")
        host = _safe(f"host of backend {name!r}", parts.netloc.rsplit(":", 1)[0], _HOST)
        weight = ""
        if weights is not None:
            weight = f" weight={positive_int(f'weight of {name!r}', weights[name])}"
        servers.append(
            f"        server {host}:{parts.port}{weight}"
            f" max_fails={max_fails} fail_timeout={fail_timeout:g}s;  # {name}"
        )
    method_line = f"        {METHODS[method]}\n" if METHODS[method] else ""
    temp = "\n".join(
        f"    {kind}_temp_path {prefix}/{kind}_temp;"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""\
worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{
    worker_connections 4096;
}}
http {{
    access_log off;
{temp}
    upstream backend {{
{method_line}{chr(10).join(servers)}
        keepalive {keepalive};
    }}
    server {{
        listen 127.0.0.1:{port};
        set_real_ip_from 127.0.0.1;
        real_ip_header X-Forwarded-For;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_next_upstream error timeout invalid_header;
        }}
    }}
}}
"""


def _wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.02)
    raise TimeoutError(f"nginx did not start listening on port {port} within {timeout} s")


@contextlib.contextmanager
def run_nginx(
    backends: Mapping[str, str],
    *,
    method: str = "round_robin",
    weights: Mapping[str, int] | None = None,
    max_fails: int = 1,
    fail_timeout: float = 10.0,
    startup_timeout: float = 10.0,
) -> Iterator[str]:
    """Run nginx balancing ``backends`` with ``method``; yield its URL. Raises
    ``FileNotFoundError`` (with :data:`INSTALL_HINT`) when nginx is not installed."""
    binary = nginx_binary()
    if binary is None:
        raise FileNotFoundError(INSTALL_HINT)
    with tempfile.TemporaryDirectory(prefix="course-nginx-") as prefix:
        os.chmod(prefix, 0o755)  # workers run as an unprivileged user when started by root
        sock = free_socket()
        port = sock.getsockname()[1]
        sock.close()  # nginx binds the port itself
        conf = Path(prefix) / "nginx.conf"
        conf.write_text(
            nginx_config(
                backends,
                port=port,
                prefix=prefix,
                method=method,
                weights=weights,
                max_fails=max_fails,
                fail_timeout=fail_timeout,
            )
        )
        proc = subprocess.Popen(
            [binary, "-p", prefix, "-c", str(conf), "-e", f"{prefix}/error.log"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            try:
                _wait_listening(port, proc, startup_timeout)
            except TimeoutError as exc:
                log = Path(prefix, "error.log")
                detail = log.read_text()[-2000:] if log.exists() else ""
                raise TimeoutError(f"{exc}\n{detail}") from None
            yield f"http://127.0.0.1:{port}"
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stderr is not None:
                proc.stderr.close()
