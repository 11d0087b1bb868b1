"""Load-balancing strategies: which backend serves the next request.

Every strategy is thread-safe (one lock per balancer; a pick holds it for O(1) or
O(log n) work, never a scan of the servers) and has the same interface:

- ``pick(key=None) -> server``: the next server (the key is the client IP for
  :class:`IpHash`, any string for :class:`ConsistentHash`, ignored by the others);
- ``acquire(key=None)``: a context manager yielding the picked server and counting it as
  active until the block exits, also when it raises; ``take(key=None)`` picks and counts
  without the block (for callers such as an event loop that release by hand);
- ``acquire_server(server)``: count a request on a server the caller chose (a proxy's
  retry on the next backend), ended with ``release(server)``;
- ``release(server)``: end one active request that was counted by hand;
- ``add(server)`` (``add(server, weight)`` for :class:`WeightedRoundRobin`),
  ``remove(server)``, ``mark_down(server)``, ``mark_up(server)``.

Bad input (an empty server list, a duplicate, a non-positive weight, an invalid IP
address) raises ``ValueError`` or ``TypeError`` naming it. When every server is down or
removed, ``pick`` raises :class:`NoBackendAvailable`.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import math
import random
import socket
import threading
import zlib
from collections.abc import Iterable, Iterator, Mapping

from course_lib.validation import number_at_least, positive_int

__all__ = [
    "ConsistentHash",
    "IpHash",
    "LeastConnections",
    "NoBackendAvailable",
    "PowerOfTwoChoices",
    "RoundRobin",
    "Strategy",
    "WeightedRoundRobin",
]


class NoBackendAvailable(RuntimeError):
    """Every server of the balancer is down (or none is left)."""


def _server_name(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"server must be a str, got {type(value).__name__}")
    if not value:
        raise ValueError("server must be a non-empty string")
    return value


def _server_list(servers: Iterable[str]) -> list[str]:
    if isinstance(servers, str | bytes):
        raise TypeError("servers must be a list of server names, not a single string")
    names = [_server_name(s) for s in servers]
    if not names:
        raise ValueError("servers must not be empty")
    duplicates = sorted({s for s in names if names.count(s) > 1})
    if duplicates:
        raise ValueError(f"servers must be unique, got duplicates {duplicates}")
    return names


class Strategy:
    """What every balancer shares: the server list, down marks and active counts."""

    def __init__(self, servers: Iterable[str]) -> None:
        self._lock = threading.Lock()
        self._servers: list[str] = _server_list(servers)
        self._down: set[str] = set()
        self._active: dict[str, int] = dict.fromkeys(self._servers, 0)
        self._rebuild()

    # -- subclasses implement these two, called with the lock held --------------------
    def _rebuild(self) -> None:
        """Recompute the pick structures after the server list or a down mark changed."""
        raise NotImplementedError

    def _pick(self, key: str | None) -> str:
        raise NotImplementedError

    def _forget(self, server: str) -> None:
        """Drop what a subclass keeps about ``server`` (lock held, in the same critical
        section as the removal, so no other call sees half of it)."""

    # -- counting hooks (least connections keeps its own structure in step) ------------
    def _count(self, server: str, delta: int) -> None:
        self._active[server] = self._active.get(server, 0) + delta

    @property
    def servers(self) -> list[str]:
        """The servers, in the order they were given (down ones included)."""
        with self._lock:
            return list(self._servers)

    @property
    def up(self) -> list[str]:
        """The servers not marked down."""
        with self._lock:
            return [s for s in self._servers if s not in self._down]

    def active(self) -> dict[str, int]:
        """Active (acquired, not yet released) requests per server."""
        with self._lock:
            return {s: n for s, n in self._active.items() if s in self._servers or n}

    def pick(self, key: str | None = None) -> str:
        """The server for the next request; raises :class:`NoBackendAvailable` if none is up."""
        with self._lock:
            return self._pick(key)

    def take(self, key: str | None = None) -> str:
        """Pick a server and count it active, in one critical section; end the request
        with :meth:`release` (what :meth:`acquire` does around a block)."""
        with self._lock:
            server = self._pick(key)
            self._count(server, +1)
            return server

    @contextlib.contextmanager
    def acquire(self, key: str | None = None) -> Iterator[str]:
        """Pick a server and count it active until the block exits (also on an exception)."""
        server = self.take(key)
        try:
            yield server
        finally:
            self.release(server)

    def acquire_server(self, server: str) -> None:
        """Count a request on ``server`` chosen by the caller (a proxy's retry); end it
        with :meth:`release`. Raises ``ValueError`` if ``server`` is not in the balancer."""
        with self._lock:
            if server not in self._servers:
                raise ValueError(f"server {server!r} is not in this balancer")
            self._count(server, +1)

    def release(self, server: str) -> None:
        """End one active request on ``server``."""
        with self._lock:
            if self._active.get(server, 0) <= 0:
                raise ValueError(f"server {server!r} has no active request to release")
            self._count(server, -1)
            if self._active[server] == 0 and server not in self._servers:
                del self._active[server]  # its last request on a removed server

    def add(self, server: str) -> None:
        """Add a server (up)."""
        server = _server_name(server)
        with self._lock:
            if server in self._servers:
                raise ValueError(f"server {server!r} is already in this balancer")
            self._servers.append(server)
            self._active.setdefault(server, 0)
            self._rebuild()

    def remove(self, server: str) -> None:
        """Remove a server; requests already on it still ``release`` normally."""
        with self._lock:
            self._known(server)
            self._forget(server)
            self._servers.remove(server)
            self._down.discard(server)
            if self._active.get(server) == 0:
                del self._active[server]
            self._rebuild()

    def mark_down(self, server: str) -> None:
        """Stop sending new requests to ``server`` until :meth:`mark_up`."""
        with self._lock:
            self._known(server)
            if server not in self._down:
                self._down.add(server)
                self._rebuild()

    def mark_up(self, server: str) -> None:
        """Send requests to ``server`` again."""
        with self._lock:
            self._known(server)
            if server in self._down:
                self._down.discard(server)
                self._rebuild()

    def _known(self, server: str) -> None:
        if server not in self._servers:
            raise ValueError(f"server {server!r} is not in this balancer")

    def _up_list(self) -> list[str]:
        return [s for s in self._servers if s not in self._down]

    def _none_up(self) -> NoBackendAvailable:
        return NoBackendAvailable(
            f"no backend available: all {len(self._servers)} server(s) are down"
            if self._servers
            else "no backend available: every server was removed"
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._servers!r}, down={sorted(self._down)!r})"


class RoundRobin(Strategy):
    """Each up server in turn: a counter modulo the number of up servers, under a lock.

    Guarantee: N picks from any number of threads give each of n up servers N/n picks
    when n divides N (exactly equal shares). The order from a fresh start is the list
    order, as nginx's default balancer with equal weights.
    """

    def _rebuild(self) -> None:
        self._ring = self._up_list()
        self._next = 0

    def _pick(self, key: str | None) -> str:
        if not self._ring:
            raise self._none_up()
        server = self._ring[self._next]
        self._next = (self._next + 1) % len(self._ring)
        return server


def _smooth_schedule(weights: Mapping[str, int]) -> list[str]:
    """One period of nginx's smooth weighted round robin (ngx_http_upstream_get_peer).

    Every pick adds each server's weight to its current weight, takes the largest (the
    first one on a tie) and subtracts the total from it. Dividing the weights by their
    greatest common divisor gives the same choices with a shorter period.
    """
    divisor = math.gcd(*weights.values())
    reduced = {s: w // divisor for s, w in weights.items()}
    total = sum(reduced.values())
    current = dict.fromkeys(reduced, 0)
    schedule = []
    for _ in range(total):
        best = None
        for server, weight in reduced.items():
            current[server] += weight
            if best is None or current[server] > current[best]:
                best = server
        assert best is not None
        current[best] -= total
        schedule.append(best)
    return schedule


def _weight(server: str, weight: object) -> int:
    return positive_int(f"weight of {server!r}", weight)


class WeightedRoundRobin(Strategy):
    """nginx's smooth weighted round robin: weights 5, 1, 1 give ``a a b a c a a``.

    The period (``sum(weights) / gcd(weights)`` picks) is computed once when the servers
    change, so a pick is an index into it: O(1). Guarantee: over every period each server
    gets exactly ``weight / gcd`` picks, spread out rather than in a burst. A change of the
    server list or of a down mark restarts the period (nginx instead carries its current
    weights over; the long-run shares are the same).
    """

    MAX_PERIOD = 1_000_000

    def __init__(self, weights: Mapping[str, int]) -> None:
        if not isinstance(weights, Mapping):
            raise TypeError(f"weights must be a mapping {{server: weight}}, got {weights!r}")
        self._weights = {_server_name(s): _weight(s, w) for s, w in weights.items()}
        self._check_period(self._weights)
        super().__init__(list(self._weights))

    def _check_period(self, weights: Mapping[str, int]) -> None:
        if weights and sum(weights.values()) // math.gcd(*weights.values()) > self.MAX_PERIOD:
            raise ValueError(
                f"weights must have sum/gcd <= {self.MAX_PERIOD} (the precomputed period)"
            )

    def _rebuild(self) -> None:
        up = {s: self._weights[s] for s in self._up_list()}
        self._schedule = _smooth_schedule(up) if up else []
        self._next = 0

    def _pick(self, key: str | None) -> str:
        if not self._schedule:
            raise self._none_up()
        server = self._schedule[self._next]
        self._next = (self._next + 1) % len(self._schedule)
        return server

    @property
    def weights(self) -> dict[str, int]:
        """The weight of every server."""
        with self._lock:
            return dict(self._weights)

    def add(self, server: str, weight: int = 1) -> None:  # type: ignore[override]
        """Add a server with its weight."""
        server = _server_name(server)
        weight = _weight(server, weight)
        with self._lock:
            if server in self._servers:
                raise ValueError(f"server {server!r} is already in this balancer")
            self._check_period({**self._weights, server: weight})
            self._weights[server] = weight
            self._servers.append(server)
            self._active.setdefault(server, 0)
            self._rebuild()

    def _forget(self, server: str) -> None:
        del self._weights[server]


class _Bag:
    """A set with O(1) add, remove and uniform random choice (swap-remove on a list)."""

    __slots__ = ("items", "where")

    def __init__(self) -> None:
        self.items: list[str] = []
        self.where: dict[str, int] = {}

    def add(self, item: str) -> None:
        self.where[item] = len(self.items)
        self.items.append(item)

    def discard(self, item: str) -> None:
        index = self.where.pop(item, None)
        if index is None:
            return
        last = self.items.pop()
        if index < len(self.items):
            self.items[index] = last
            self.where[last] = index


class LeastConnections(Strategy):
    """The up server with the fewest active requests; a random one among equals.

    Servers sit in buckets by active count, with the lowest non-empty count tracked, so
    pick, acquire and release are O(1). The random tie-break keeps idle servers from
    all receiving the burst in list order. ``seed`` makes the tie-break reproducible.
    """

    def __init__(self, servers: Iterable[str], *, seed: int | None = None) -> None:
        self._rng = random.Random(seed)
        super().__init__(servers)

    def _rebuild(self) -> None:
        self._levels: dict[int, _Bag] = {}
        for server in self._up_list():
            self._levels.setdefault(self._active[server], _Bag()).add(server)
        self._min = min(self._levels, default=0)

    def _count(self, server: str, delta: int) -> None:
        before = self._active.get(server, 0)
        super()._count(server, delta)
        old = self._levels.get(before)
        if old is None or server not in old.where:
            return  # down or removed: in no bucket (an up server is in its count's bucket)
        after = before + delta
        old.discard(server)
        if not old.items:
            del self._levels[before]
        self._levels.setdefault(after, _Bag()).add(server)
        if after < self._min:
            self._min = after
        elif before == self._min and before not in self._levels:
            self._min = after  # the only server at the minimum moved one level up

    def _pick(self, key: str | None) -> str:
        if not self._levels:
            raise self._none_up()
        items = self._levels[self._min].items
        return items[self._rng.randrange(len(items))] if len(items) > 1 else items[0]


class PowerOfTwoChoices(Strategy):
    """Two distinct up servers at random; the one with fewer active requests (Envoy's
    ``LEAST_REQUEST``, nginx's ``random two least_conn``). O(1), no global scan, and no
    herd: two random samples rarely agree on one target."""

    def __init__(self, servers: Iterable[str], *, seed: int | None = None) -> None:
        self._rng = random.Random(seed)
        super().__init__(servers)

    def _rebuild(self) -> None:
        self._ring = self._up_list()

    def _pick(self, key: str | None) -> str:
        n = len(self._ring)
        if n == 0:
            raise self._none_up()
        if n == 1:
            return self._ring[0]
        i = self._rng.randrange(n)
        j = self._rng.randrange(n - 1)
        if j >= i:
            j += 1
        a, b = self._ring[i], self._ring[j]
        return b if self._active[b] < self._active[a] else a


def ip_hash_octets(address: str) -> bytes:
    """The bytes nginx's ``ip_hash`` hashes: the first three octets of an IPv4 address,
    all 16 bytes of an IPv6 one (the IPv4 part of an IPv4-mapped IPv6 address)."""
    if not isinstance(address, str):
        raise TypeError(f"key must be a client IP address string, got {type(address).__name__}")
    try:
        return socket.inet_pton(socket.AF_INET, address)[:3]
    except OSError:
        pass
    try:
        packed = socket.inet_pton(socket.AF_INET6, address)
    except OSError:
        raise ValueError(f"key must be a valid IP address, got {address!r}") from None
    if packed[:12] == b"\x00" * 10 + b"\xff\xff":
        return packed[12:15]
    return packed


class IpHash(Strategy):
    """nginx's ``ip_hash``: the same client address (IPv4: the same /24) gets the same server.

    The hash is nginx's (``ngx_http_upstream_ip_hash_module.c``): start at 89, for each of
    the hashed bytes ``hash = (hash * 113 + byte) % 6271``, take server ``hash % n``; if it
    is down, hash the bytes again from the current value (21 hashes in all), then fall back to
    round robin. So for the same server list it picks what nginx picks, and marking a
    server down moves only the clients that server had.
    """

    def _rebuild(self) -> None:
        self._fallback = [s for s in self._servers if s not in self._down]
        self._next = 0

    def _pick(self, key: str | None) -> str:
        if key is None:
            raise ValueError("key must be the client IP address for IpHash")
        octets = ip_hash_octets(key)
        if not self._fallback:
            raise self._none_up()
        servers = self._servers
        h = 89
        for _ in range(21):  # nginx gives up once ++tries > 20, i.e. after 21 hashes
            for byte in octets:
                h = (h * 113 + byte) % 6271
            server = servers[h % len(servers)]
            if server not in self._down:
                return server
        server = self._fallback[self._next % len(self._fallback)]
        self._next += 1
        return server


def _ring_hash(data: bytes) -> int:
    """A point on the 32-bit ring for a server's virtual node (computed once per node)."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=4).digest(), "big")


def _key_hash(key: str) -> int:
    """A key's point on the ring: CRC32 (what nginx's ``hash ... consistent`` uses), then a
    multiply-xorshift finaliser so similar keys ("user1", "user2") land far apart.

    The key's bytes are its UTF-8 with ``surrogatepass``: every ``str`` is a valid key,
    a lone surrogate ("\\ud800", which strict UTF-8 cannot encode) included, and every
    other string hashes exactly as its UTF-8."""
    try:
        data = key.encode()
    except UnicodeEncodeError:  # the rare key strict UTF-8 refuses; "strict" is the fast path
        data = key.encode("utf-8", "surrogatepass")
    h = zlib.crc32(data)
    h = (h * 0x9E3779B1) & 0xFFFFFFFF
    return h ^ (h >> 16)


class ConsistentHash(Strategy):
    """A hash ring with ``vnodes`` virtual nodes per server; optionally bounded load.

    A key goes to the first server clockwise from its hash (binary search, O(log n)).
    Removing one of n servers moves only that server's keys (about 1/n of them), each to
    its clockwise successor; every other key keeps its server.

    With ``load_factor`` (>= 1, e.g. 1.25; Mirrokni, Thorup and Zadimoghaddam, 2018), a
    server is skipped while its active requests are at its bound
    ``ceil(load_factor * (total_active + 1) / n_up)``, so under :meth:`acquire` no server
    ever exceeds it, whatever the key mix.
    """

    def __init__(
        self,
        servers: Iterable[str],
        *,
        vnodes: int = 160,
        load_factor: float | None = None,
    ) -> None:
        self._vnodes = positive_int("vnodes", vnodes)
        self._load_factor = (
            None if load_factor is None else number_at_least("load_factor", load_factor, 1)
        )
        self._total_active = 0
        super().__init__(servers)

    def _rebuild(self) -> None:
        points = sorted(
            (_ring_hash(f"{server}#{i}".encode()), server)
            for server in self._servers
            if server not in self._down
            for i in range(self._vnodes)
        )
        self._points = [p for p, _ in points]
        self._owners = [s for _, s in points]
        self._n_up = len({s for _, s in points})

    def _count(self, server: str, delta: int) -> None:
        super()._count(server, delta)
        self._total_active += delta

    def bound(self) -> int | None:
        """The most active requests a server may hold when the next one is placed."""
        with self._lock:
            return self._bound()

    def _bound(self) -> int | None:
        if self._load_factor is None or not self._n_up:
            return None
        return math.ceil(self._load_factor * (self._total_active + 1) / self._n_up)

    def _pick(self, key: str | None) -> str:
        if key is None:
            raise ValueError("key must be a string for ConsistentHash")
        if not isinstance(key, str):
            raise TypeError(f"key must be a str, got {type(key).__name__}")
        owners = self._owners
        if not owners:
            raise self._none_up()
        # The first point clockwise from the key's; past the last one the ring wraps.
        start = bisect.bisect_left(self._points, _key_hash(key)) % len(owners)
        server = owners[start]
        bound = self._bound()
        if bound is None or self._active[server] < bound:
            return server
        # Walk on clockwise past full servers; some server is under the bound because
        # n_up * ceil(c * (total + 1) / n_up) >= total + 1 when c >= 1.
        seen = {server}
        for step in range(1, len(owners)):
            server = owners[(start + step) % len(owners)]
            if server in seen:
                continue
            if self._active[server] < bound:
                return server
            seen.add(server)
        raise AssertionError("bounded load: no server under its bound")
