"""The notebook 02 checkers: a reference answer passes, each planted-wrong answer fails
for the property it breaks (the lock-free balancer every time), and a stub is reported as
not attempted."""

from __future__ import annotations

import contextlib
import hashlib
import threading
import zlib

import pytest

from course_lib.exercises.load_balancing import (
    check_ip_hash,
    check_rendezvous,
    check_weighted_least_connections,
)
from course_lib.load_balancing import ConsistentHash, LeastConnections
from course_lib.load_balancing.lesson import as_written

# In-memory checkers, no Redis or PostgreSQL: one pass of `make test` covers them.
pytestmark = pytest.mark.one_pass


def stub(*args: object) -> None:
    raise NotImplementedError


# -- weighted least connections ------------------------------------------------------------
class Weighted:
    """The reference: fewest in flight per unit of weight, picked and counted under a lock,
    freed in ``finally``."""

    def __init__(self, weights: dict[str, int]) -> None:
        self.weights = weights
        self.active = dict.fromkeys(weights, 0)
        self.lock = threading.Lock()

    @contextlib.contextmanager
    def acquire(self):
        with self.lock:
            server = min(self.active, key=lambda s: self.active[s] / self.weights[s])
            self.active[server] += 1
        try:
            yield server
        finally:
            with self.lock:
                self.active[server] -= 1


class LockFree(Weighted):
    """The same arithmetic without the lock: correct alone, loses updates under threads."""

    @contextlib.contextmanager
    def acquire(self):
        server = min(self.active, key=lambda s: self.active[s] / self.weights[s])
        self.active[server] += 1
        try:
            yield server
        finally:
            self.active[server] -= 1


class LockFreeOverFloats(Weighted):
    """Lock-free, with its own plain copies of names and weights (``str()``/``float()``),
    as a student might write to avoid the checker's yielding names."""

    def __init__(self, weights: dict[str, int]) -> None:
        super().__init__({str(s): float(w) for s, w in weights.items()})

    @contextlib.contextmanager
    def acquire(self):
        server = min(self.active, key=lambda s: self.active[s] / self.weights[s])
        count = self.active[server]
        self.active[server] = count + 1
        try:
            yield server
        finally:
            self.active[server] -= 1


class NoFinally(Weighted):
    """Counts under a lock, but the decrement is skipped when the block raises."""

    @contextlib.contextmanager
    def acquire(self):
        with self.lock:
            server = min(self.active, key=lambda s: self.active[s] / self.weights[s])
            self.active[server] += 1
        yield server
        with self.lock:
            self.active[server] -= 1


class Unweighted:
    """course_lib's LeastConnections, which ignores weights: 4/3/3, not 6/2/2."""

    def __init__(self, weights: dict[str, int]) -> None:
        self.inner = LeastConnections(list(weights), seed=1)

    def acquire(self):
        return self.inner.acquire()


class ModuleAsWritten:
    """The module's balancer behind acquire(): it never counts, so all go to one server."""

    def __init__(self, weights: dict[str, int]) -> None:
        self.lb = as_written.LoadBalancer()

    @contextlib.contextmanager
    def acquire(self):
        yield self.lb.get_server()


def test_weighted_least_connections_reference_passes() -> None:
    assert check_weighted_least_connections(Weighted)


def test_weighted_least_connections_not_attempted() -> None:
    result = check_weighted_least_connections(stub)
    assert not result and "not attempted" in result.message


@pytest.mark.parametrize("run", range(5))
def test_weighted_least_connections_without_a_lock_fails_every_time(run: int) -> None:
    result = check_weighted_least_connections(LockFree)
    assert not result and "counts are off" in result.message


@pytest.mark.parametrize("run", range(5))
def test_weighted_least_connections_without_a_lock_over_plain_copies_fails_every_time(
    run: int,
) -> None:
    # Its counts are keyed by plain str copies, so the names' yielding hash is stripped:
    # the checker's switch before each write still lands between the read and the write.
    result = check_weighted_least_connections(LockFreeOverFloats)
    assert not result and "counts are off" in result.message


def test_weighted_least_connections_that_leaks_on_exceptions_fails() -> None:
    result = check_weighted_least_connections(NoFinally)
    assert not result and "not freed" in result.message


def test_weighted_least_connections_that_ignores_weights_fails() -> None:
    result = check_weighted_least_connections(Unweighted)
    assert not result and "should go 6/2/2" in result.message


def test_weighted_least_connections_that_never_counts_fails() -> None:
    result = check_weighted_least_connections(ModuleAsWritten)
    assert not result and "should go 6/2/2" in result.message


# -- rendezvous hashing --------------------------------------------------------------------
def rendezvous(key: str, servers: list[str]) -> str:
    def score(server: str) -> int:
        return int.from_bytes(hashlib.blake2b(f"{server}|{key}".encode(), digest_size=8).digest())

    return max(servers, key=score)


def test_rendezvous_reference_passes() -> None:
    assert check_rendezvous(rendezvous)


def test_rendezvous_not_attempted() -> None:
    result = check_rendezvous(stub)
    assert not result and "not attempted" in result.message


def test_rendezvous_on_pythons_salted_hash_fails() -> None:
    result = check_rendezvous(lambda key, servers: max(servers, key=lambda s: hash((s, key))))
    assert not result and "PYTHONHASHSEED" in result.message


def test_rendezvous_as_hash_mod_n_fails() -> None:
    def modulo(key: str, servers: list[str]) -> str:
        ordered = sorted(servers)
        return ordered[zlib.crc32(key.encode()) % len(ordered)]

    result = check_rendezvous(modulo)
    assert not result and "whose server stayed" in result.message


def test_rendezvous_that_depends_on_list_order_fails() -> None:
    result = check_rendezvous(
        lambda key, servers: servers[zlib.crc32(key.encode()) % 10 % len(servers)]
    )
    assert not result and "shuffled" in result.message


def test_rendezvous_with_a_score_that_ignores_the_pairing_fails() -> None:
    # crc(key) + crc(server): the key adds the same to every score, so one server always wins.
    def additive(key: str, servers: list[str]) -> str:
        return max(servers, key=lambda s: zlib.crc32(key.encode()) + zlib.crc32(s.encode()))

    result = check_rendezvous(additive)
    assert not result and "uneven" in result.message


def test_rendezvous_as_a_ring_of_one_point_per_server_fails() -> None:
    def ring(key: str, servers: list[str]) -> str:
        return ConsistentHash(servers, vnodes=1).pick(str(key))

    result = check_rendezvous(ring)
    assert not result and "uneven" in result.message


def test_rendezvous_that_returns_a_stranger_fails() -> None:
    result = check_rendezvous(lambda key, servers: "elsewhere")
    assert not result and "not one of the servers" in result.message


# -- ip hash -------------------------------------------------------------------------------
def nginx_ip_hash(address: str, servers: list[str], down: set[str]) -> str:
    octets = [int(p) for p in address.split(".")[:3]]
    h = 89
    for _ in range(21):
        for octet in octets:
            h = (h * 113 + octet) % 6271
        if servers[h % len(servers)] not in down:
            return servers[h % len(servers)]
    return next(s for s in servers if s not in down)


def test_ip_hash_reference_passes() -> None:
    assert check_ip_hash(nginx_ip_hash)


def test_ip_hash_not_attempted() -> None:
    result = check_ip_hash(stub)
    assert not result and "not attempted" in result.message


def test_ip_hash_over_four_octets_fails() -> None:
    def four(address: str, servers: list[str], down: set[str]) -> str:
        h = 89
        for octet in map(int, address.split(".")):
            h = (h * 113 + octet) % 6271
        return servers[h % len(servers)]

    result = check_ip_hash(four)
    assert not result and "nginx sends" in result.message


def test_ip_hash_that_ignores_down_servers_fails() -> None:
    def ignores_down(address: str, servers: list[str], down: set[str]) -> str:
        return nginx_ip_hash(address, servers, set())

    result = check_ip_hash(ignores_down)
    assert not result and "down=['s1']" in result.message


def test_ip_hash_that_skips_down_to_the_next_server_fails() -> None:
    def next_one(address: str, servers: list[str], down: set[str]) -> str:
        server = nginx_ip_hash(address, servers, set())
        i = servers.index(server)
        while servers[i] in down:
            i = (i + 1) % len(servers)
        return servers[i]

    result = check_ip_hash(next_one)
    assert not result and "down=['s1']" in result.message


def test_ip_hash_that_raises_fails() -> None:
    def broken(address: str, servers: list[str], down: set[str]) -> str:
        if address.startswith("2"):
            raise KeyError(address)
        return nginx_ip_hash(address, servers, down)

    result = check_ip_hash(broken)
    assert not result and "raised KeyError" in result.message
