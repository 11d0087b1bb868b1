"""Exercises of notebook 02 (load balancing); each checker runs the student's code for real.

- :func:`check_least_connections`: a least-connections balancer that counts requests in
  flight, frees them on exit (also when the request raises), and stays consistent under
  8 threads.
- :func:`check_ip_hash`: nginx's ``ip_hash`` (first three octets, rehash past down
  servers), compared with :class:`course_lib.load_balancing.IpHash`.
"""

from __future__ import annotations

import contextlib
import random
from collections import Counter
from collections.abc import Callable
from typing import Any

from course_lib.concurrency import fast_switching
from course_lib.load_balancing import IpHash
from course_lib.measure import run_threads

from .result import CheckResult, failed, not_attempted, passed

__all__ = ["check_ip_hash", "check_least_connections"]

SERVERS = ["server1", "server2", "server3"]


def _held(balancer: Any, n: int) -> tuple[Counter[str], None] | tuple[None, str]:
    """Acquire ``n`` requests at once, release them all; their servers, or the error."""
    try:
        with contextlib.ExitStack() as stack:
            return Counter(stack.enter_context(balancer.acquire()) for _ in range(n)), None
    except NotImplementedError:
        raise
    except Exception as exc:
        return None, f"{type(exc).__name__}: {exc}"


def check_least_connections(make_balancer: Callable[[list[str]], Any]) -> CheckResult:
    """``make_balancer(servers)`` returns an object whose ``acquire()`` is a context manager
    yielding a server. Checked: 9 requests held at once on 3 servers go 3/3/3; a request
    that raises frees its slot (with the two others busy, the next request goes to it);
    8 threads x 200 requests (with fast thread switching) raise nothing, and afterwards
    9 held requests still go 3/3/3."""
    name = "check_least_connections"
    try:
        balancer = make_balancer(list(SERVERS))
        first, error = _held(balancer, 9)
    except NotImplementedError:
        return not_attempted(name, "implement make_balancer and acquire")
    if first is None:
        return failed(name, f"acquire() failed: {error}")
    if first != dict.fromkeys(SERVERS, 3):
        return failed(
            name, f"9 requests in flight on 3 idle servers should go 3/3/3, got {dict(first)}"
        )
    # Two requests in flight, a third (on the idle server) raises: that server must be
    # idle again, so the next request goes there. A leaked count would make it look busy.
    for _ in range(2):
        try:
            with balancer.acquire() as first, balancer.acquire() as second:
                try:
                    with balancer.acquire() as failing:
                        raise LookupError("the request failed")
                except LookupError:
                    pass
                with balancer.acquire() as after:
                    pass
        except Exception as exc:
            return failed(name, f"acquire() failed: {type(exc).__name__}: {exc}")
        if after != failing:
            return failed(
                name,
                f"a request on {failing} raised and did not free its slot: with {first} and "
                f"{second} busy the next request went to {after}, not the idle {failing}",
            )

    def request() -> str:
        with balancer.acquire() as server:
            return server

    with fast_switching():
        calls = run_threads(request, 8, calls=200)
    if calls.errors:
        return failed(name, f"acquire raised under 8 threads: {calls.errors[0]}")
    settled, error = _held(balancer, 9)
    if settled != dict.fromkeys(SERVERS, 3):
        return failed(
            name,
            "after 8 threads x 200 requests the counts are off: 9 new requests went "
            f"{dict(settled) if settled else error} (a lost update under threads?)",
        )
    return passed(
        name, "3/3/3 with 9 in flight, frees on exceptions, consistent after 1600 threaded"
    )


def check_ip_hash(ip_hash: Callable[[str, list[str], set[str]], str]) -> CheckResult:
    """``ip_hash(address, servers, down)`` is nginx's pick for an IPv4 ``address``.
    Compared with :class:`IpHash` on 5000 random addresses for 3 and 7 servers, with no
    server down and with one down; every address of one /24 must map to one server."""
    name = "check_ip_hash"
    rng = random.Random(2)
    addresses = [".".join(str(rng.randrange(256)) for _ in range(4)) for _ in range(5000)]
    try:
        ip_hash("10.0.0.1", list(SERVERS), set())
    except NotImplementedError:
        return not_attempted(name, "implement ip_hash")
    for n in (3, 7):
        servers = [f"s{i}" for i in range(n)]
        for down in (set(), {"s1"}):
            reference = IpHash(servers)
            for server in down:
                reference.mark_down(server)
            for address in addresses:
                want = reference.pick(address)
                try:
                    got = ip_hash(address, list(servers), set(down))
                except Exception as exc:
                    return failed(name, f"ip_hash({address!r}) raised {type(exc).__name__}: {exc}")
                if got != want:
                    return failed(
                        name,
                        f"{n} servers, down={sorted(down)}: nginx sends {address} to {want}, "
                        f"yours to {got}",
                    )
    office = {ip_hash(f"203.0.113.{host}", list(SERVERS), set()) for host in range(256)}
    if len(office) != 1:
        return failed(name, f"one /24 went to {len(office)} servers: hash only 3 octets")
    return passed(name, "same server as nginx for 5000 addresses x 4 setups; a /24 sticks")
