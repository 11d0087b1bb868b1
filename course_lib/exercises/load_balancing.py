"""Exercises of notebook 02 (load balancing); each checker runs the student's code for real.

- :func:`check_weighted_least_connections`: nginx's ``least_conn`` with weights (fewest
  requests in flight per unit of weight), counting requests until they end (also when they
  raise), exact under 8 threads whose server names and weights give the GIL away.
- :func:`check_ip_hash`: nginx's ``ip_hash`` (first three octets, rehash past down
  servers), compared with :class:`course_lib.load_balancing.IpHash`.
- :func:`check_rendezvous`: rendezvous (highest random weight) hashing, checked by the
  properties that make it useful: stable across processes, even, and moving only the keys
  it must when a server goes or comes.
"""

from __future__ import annotations

import contextlib
import dis
import random
import sys
import sysconfig
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from course_lib.concurrency import fast_switching
from course_lib.load_balancing import IpHash
from course_lib.measure import run_threads

from .result import CheckResult, failed, not_attempted, passed

__all__ = ["check_ip_hash", "check_rendezvous", "check_weighted_least_connections"]

SERVERS = ["server1", "server2", "server3"]
WEIGHTS = {"big": 3, "small1": 1, "small2": 1}


class _YieldingName(str):
    """A server name whose hashing gives the GIL away (``time.sleep(0)``), so every dict
    lookup of a balancer's counts is a place where another thread runs: a read-modify-write
    of a count without a lock loses updates every time, not by luck. Comparing and
    printing it is a str's."""

    def __hash__(self) -> int:
        time.sleep(0)
        return str.__hash__(self)

    def __eq__(self, other: object) -> bool:
        time.sleep(0)
        return str.__eq__(self, other)


class _YieldingWeight(int):
    """A weight whose arithmetic and ``float()`` give the GIL away, like the names."""

    def __float__(self) -> float:
        time.sleep(0)
        return int.__float__(self)


def _yielding_arithmetic(name: str) -> Callable[..., Any]:
    def op(self: int, other: Any) -> Any:
        time.sleep(0)
        return getattr(int, name)(int(self), other)

    return op


for _name in ("__truediv__", "__rtruediv__", "__mul__", "__rmul__", "__floordiv__"):
    setattr(_YieldingWeight, _name, _yielding_arithmetic(_name))


_STDLIB = sysconfig.get_paths()["stdlib"]
# Bytecodes that write shared state or call out: a switch just before one of them lands
# between a read and the write that depends on it (a yield before every bytecode would
# do the same, ten times slower).
_SWITCH_BEFORE = {
    dis.opmap[op]
    for op in (
        *("STORE_SUBSCR", "STORE_ATTR", "STORE_GLOBAL", "STORE_DEREF", "DELETE_SUBSCR"),
        *("CALL", "CALL_FUNCTION", "CALL_METHOD", "CALL_FUNCTION_EX", "CALL_FUNCTION_KW"),
    )
    if op in dis.opmap
}


def _switch_between_opcodes(frame: Any, event: str, arg: Any) -> Any:
    """A trace function that gives the GIL away before each write and each call in the
    student's code (frames outside the standard library and this module), so a read and
    the write that depends on it, ``active[s] += 1`` included, always have a thread switch
    between them. Copies of the names or the weights cannot strip it; a lock makes it
    harmless."""
    if event == "call":
        path = frame.f_code.co_filename
        if path.startswith(_STDLIB) or path == __file__:
            return None
        frame.f_trace_opcodes = True
        return _switch_between_opcodes
    if event == "opcode" and frame.f_code.co_code[frame.f_lasti] in _SWITCH_BEFORE:
        time.sleep(0)
    return _switch_between_opcodes


def _held(balancer: Any, n: int) -> tuple[Counter[str], None] | tuple[None, str]:
    """Acquire ``n`` requests at once, release them all; their servers, or the error."""
    try:
        with contextlib.ExitStack() as stack:
            return Counter(str(stack.enter_context(balancer.acquire())) for _ in range(n)), None
    except NotImplementedError:
        raise
    except Exception as exc:
        return None, f"{type(exc).__name__}: {exc}"


def check_weighted_least_connections(
    make_balancer: Callable[[dict[str, int]], Any],
) -> CheckResult:
    """``make_balancer(weights)`` returns an object whose ``acquire()`` is a context manager
    yielding the server with the fewest requests in flight per unit of weight.

    Checked with weights 3:1:1: 10 requests held at once go 6/2/2; a request that raises
    frees its slot; then, three rounds of 8 threads x 50 requests raise nothing and leave
    the counts exact: 10 new requests go 6/2/2 again. In those threads the 8 requests of
    each step acquire together (each write and each call in the student's code preceded by
    a thread switch, fast switching on, server names and weights that switch threads when
    hashed or divided) and release one at a time, so a balancer that counts without a lock
    loses increments that no lost decrement can cancel: it fails every time."""
    name = "check_weighted_least_connections"
    names = {server: _YieldingName(server) for server in WEIGHTS}
    weights = {names[s]: _YieldingWeight(w) for s, w in WEIGHTS.items()}
    want = {"big": 6, "small1": 2, "small2": 2}
    try:
        balancer = make_balancer(dict(weights))
        first, error = _held(balancer, 10)
    except NotImplementedError:
        return not_attempted(name, "implement make_balancer and acquire")
    if first is None:
        return failed(name, f"acquire() failed: {error}")
    if first != want:
        return failed(
            name, f"10 requests in flight with weights 3:1:1 should go 6/2/2, got {dict(first)}"
        )
    try:
        # One request in flight while a second one raises: both must end at zero.
        with balancer.acquire(), contextlib.suppress(LookupError), balancer.acquire() as failing:
            raise LookupError("the request failed")
    except Exception as exc:
        return failed(name, f"acquire() failed: {type(exc).__name__}: {exc}")
    after, error = _held(balancer, 10)
    if after != want:
        return failed(
            name,
            f"a request on {failing} raised: its slot was not freed (10 new requests went "
            f"{dict(after) if after else error}, not 6/2/2)",
        )

    # Each call: 8 threads acquire at once (racing), hold until all 8 hold, then release
    # one at a time. Serial releases cannot lose a decrement, so a lost increment is never
    # cancelled by a lost decrement: it shows in the counts every time.
    holding = threading.Barrier(8)
    one_at_a_time = threading.Lock()

    def request() -> str:
        entered = balancer.acquire()
        sys.settrace(_switch_between_opcodes)  # this thread only; removed below
        try:
            server = entered.__enter__()
        finally:
            sys.settrace(None)
        try:
            holding.wait(timeout=30)
        finally:
            with one_at_a_time:
                entered.__exit__(None, None, None)
        return str(server)

    for round_ in range(1, 4):
        try:
            with fast_switching():
                calls = run_threads(request, 8, calls=50)
        except TimeoutError:
            return failed(name, "8 threads x 50 requests did not finish in 60 s (a deadlock?)")
        if calls.errors:
            return failed(name, f"acquire raised under 8 threads: {calls.errors[0]}")
        settled, error = _held(balancer, 10)
        if settled != want:
            return failed(
                name,
                f"after round {round_} of 8 threads x 50 requests the counts are off: 10 new "
                f"requests went {dict(settled) if settled else error}, not 6/2/2 (updates "
                "lost between reading a count and writing it back: hold a lock across both)",
            )
    return passed(name, "6/2/2 with 10 in flight, frees on exceptions, exact after 1,200 threaded")


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


class _SaltedKey(str):
    """A key whose Python ``hash()`` is refused: it differs in every process (string hashes
    are salted, ``PYTHONHASHSEED``), so a balancer fleet built on it would disagree."""

    def __hash__(self) -> int:
        raise TypeError(
            "hash() of a str differs in every Python process (PYTHONHASHSEED): use a hash "
            "that is the same everywhere, e.g. zlib.crc32 or hashlib"
        )


def check_rendezvous(pick: Callable[[str, list[str]], str]) -> CheckResult:
    """``pick(key, servers)`` is rendezvous (highest random weight) hashing: each server
    scores the key with a stable hash and the highest score wins.

    Checked on 10 servers: the answer is one of ``servers``, the same for a shuffled list;
    Python's salted ``hash()`` of the key is refused; 10,000 keys spread with the busiest
    server at most 1.15x the mean; removing any of three servers moves exactly that
    server's keys; adding an 11th moves only keys to it, between 5 % and 14 % of them."""
    name = "check_rendezvous"
    servers = [f"cache{i}" for i in range(10)]
    keys = [_SaltedKey(f"user:{i}") for i in range(10_000)]
    try:
        pick(keys[0], list(servers))
    except NotImplementedError:
        return not_attempted(name, "implement pick")
    except TypeError as exc:
        if "PYTHONHASHSEED" in str(exc):
            return failed(name, str(exc))
        raise

    def assign(keys_: list[str], pool: list[str]) -> dict[str, str] | str:
        out = {}
        for key in keys_:
            try:
                server = pick(key, list(pool))
            except Exception as exc:
                return f"pick({key!r}) raised {type(exc).__name__}: {exc}"
            if server not in pool:
                return f"pick({key!r}) returned {server!r}, not one of the servers"
            out[str(key)] = server
        return out

    base = assign(keys, servers)
    if isinstance(base, str):
        return failed(name, base)
    shuffled = list(servers)
    random.Random(5).shuffle(shuffled)
    again = assign(keys[:2000], shuffled)
    if isinstance(again, str):
        return failed(name, again)
    changed = sum(again[k] != base[k] for k in again)
    if changed:
        return failed(name, f"{changed} of 2000 keys changed server when the list was shuffled")
    loads = Counter(base.values())
    busiest = max(loads.get(s, 0) for s in servers) / (len(keys) / len(servers))
    if busiest > 1.15:
        return failed(
            name,
            f"uneven: the busiest server holds {busiest:.2f}x the mean of 10,000 keys "
            f"(loads {dict(sorted(loads.items()))})",
        )
    sample = keys[:3000]
    for gone in ("cache0", "cache4", "cache9"):
        after = assign(sample, [s for s in servers if s != gone])
        if isinstance(after, str):
            return failed(name, after)
        moved = [k for k in after if after[k] != base[k]]
        wrong = [k for k in moved if base[k] != gone]
        if wrong:
            return failed(
                name,
                f"removing {gone} moved {len(wrong)} of 3000 keys whose server stayed "
                f"(e.g. {wrong[0]}: {base[wrong[0]]} -> {after[wrong[0]]})",
            )
    grown = assign(sample, [*servers, "cache10"])
    if isinstance(grown, str):
        return failed(name, grown)
    moved = [k for k in grown if grown[k] != base[k]]
    if any(grown[k] != "cache10" for k in moved):
        return failed(name, "adding cache10 moved keys between the old servers")
    share = len(moved) / len(sample)
    if not 0.05 <= share <= 0.14:
        return failed(name, f"adding an 11th server moved {share:.1%} of keys, not about 1/11")
    return passed(
        name,
        f"stable, busiest {busiest:.2f}x the mean, removal moves only the removed "
        f"server's keys, an 11th server takes {share:.1%}",
    )
