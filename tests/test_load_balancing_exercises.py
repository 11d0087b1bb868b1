"""The notebook 02 checkers: a reference answer passes, each planted-wrong answer fails
for the property it breaks, and a stub is reported as not attempted."""

from __future__ import annotations

import contextlib
import threading

from course_lib.exercises.load_balancing import check_ip_hash, check_least_connections
from course_lib.load_balancing import LeastConnections
from course_lib.load_balancing.lesson import as_written


def stub(*args: object) -> None:
    raise NotImplementedError


# -- least connections ---------------------------------------------------------------------
def test_least_connections_reference_passes() -> None:
    assert check_least_connections(lambda servers: LeastConnections(servers, seed=1))


def test_least_connections_not_attempted() -> None:
    result = check_least_connections(stub)
    assert not result and "not attempted" in result.message


class ModuleAsWritten:
    """The module's balancer behind acquire(): it never counts, so all go to server1."""

    def __init__(self, servers: list[str]) -> None:
        self.lb = as_written.LoadBalancer()

    @contextlib.contextmanager
    def acquire(self):
        yield self.lb.get_server()


class NoFinally:
    """Counts, but the decrement is skipped when the block raises."""

    def __init__(self, servers: list[str]) -> None:
        self.active = dict.fromkeys(servers, 0)
        self.lock = threading.Lock()

    @contextlib.contextmanager
    def acquire(self):
        with self.lock:
            server = min(self.active, key=self.active.get)
            self.active[server] += 1
        yield server
        with self.lock:
            self.active[server] -= 1


class TryLock:
    """Refuses to wait for its lock: fine alone, raises as soon as two threads meet."""

    def __init__(self, servers: list[str]) -> None:
        self.inner = LeastConnections(servers, seed=1)
        self.lock = threading.Lock()

    @contextlib.contextmanager
    def acquire(self):
        if not self.lock.acquire(blocking=False):
            raise RuntimeError("balancer busy")
        try:
            with self.inner.acquire() as server:
                threading.Event().wait(0.0001)  # hold the lock across a thread switch
                self.lock.release()
                yield server
        finally:
            if self.lock.locked():
                with contextlib.suppress(RuntimeError):
                    self.lock.release()


def test_least_connections_that_never_counts_fails() -> None:
    result = check_least_connections(ModuleAsWritten)
    assert not result and "3/3/3" in result.message and "'server1': 9" in result.message


def test_least_connections_that_leaks_on_exceptions_fails() -> None:
    result = check_least_connections(NoFinally)
    assert not result and "did not free its slot" in result.message


def test_least_connections_that_fails_under_threads_fails() -> None:
    result = check_least_connections(TryLock)
    assert not result and "under 8 threads" in result.message


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
