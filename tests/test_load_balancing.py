"""The load-balancing strategies: exact shares under threads, nginx's smooth weighted round
robin and ip_hash, least connections' counting, two choices, consistent hashing's remap
and bounded load, and bad input."""

from __future__ import annotations

import contextlib
import math
import threading
from collections import Counter

import pytest

from course_lib.concurrency import fast_switching
from course_lib.load_balancing import (
    ConsistentHash,
    IpHash,
    LeastConnections,
    NoBackendAvailable,
    PowerOfTwoChoices,
    RoundRobin,
    WeightedRoundRobin,
)
from course_lib.load_balancing.lesson import as_written
from course_lib.load_balancing.lesson.demos import get_server_with_log, longest_run, naive_weighted
from course_lib.measure import run_threads
from course_lib.workloads import zipf_keys

# In-memory strategies, no Redis or PostgreSQL: one pass of `make test` covers them.
pytestmark = pytest.mark.one_pass

THREE = ["server1", "server2", "server3"]
TEN = [f"s{i}" for i in range(10)]


def make_all(servers: list[str]) -> list:
    return [
        RoundRobin(servers),
        WeightedRoundRobin(dict.fromkeys(servers, 1)),
        LeastConnections(servers, seed=1),
        PowerOfTwoChoices(servers, seed=1),
        IpHash(servers),
        ConsistentHash(servers, vnodes=50),
        ConsistentHash(servers, vnodes=50, load_factor=1.25),
    ]


def key_for(strategy, i: int) -> str | None:
    if isinstance(strategy, IpHash):
        return f"10.{i % 200}.{i % 7}.1"
    if isinstance(strategy, ConsistentHash):
        return f"user:{i}"
    return None


# -- round robin ---------------------------------------------------------------------------
def test_round_robin_exact_equal_shares_under_8_threads() -> None:
    rr = RoundRobin(THREE)
    with fast_switching():
        calls = run_threads(rr.pick, 8, calls=3000)
    assert not calls.errors
    assert Counter(calls.values) == dict.fromkeys(THREE, 8000)


def test_round_robin_order_and_skips_down_servers() -> None:
    rr = RoundRobin(THREE)
    assert [rr.pick() for _ in range(4)] == ["server1", "server2", "server3", "server1"]
    rr.mark_down("server2")
    assert set(rr.pick() for _ in range(10)) == {"server1", "server3"}
    rr.mark_up("server2")
    assert set(rr.pick() for _ in range(3)) == set(THREE)


def test_module_round_robin_with_a_log_line_hands_one_server_to_several_threads() -> None:
    """The as-written counter plus a log line between its read and its write (a write(2),
    which releases the GIL), over a list long enough never to wrap: positions handed to
    several threads are the race; the rerun write still counts every call."""
    as_written.servers = list(range(10**6))
    as_written.current = 0
    try:
        calls = run_threads(get_server_with_log, 8, calls=500)
        handed = Counter(calls.values)
        assert len(calls.values) == 4000
        assert max(handed.values()) > 1  # one position handed to several threads at once
        assert len(handed) < 4000  # so others were skipped
    finally:
        as_written.servers, as_written.current = ["server1", "server2", "server3"], 0


def test_module_least_connections_sends_everything_to_server1() -> None:
    lb = as_written.LoadBalancer()
    assert {lb.get_server() for _ in range(100)} == {"server1"}


# -- weighted round robin ------------------------------------------------------------------
def test_smooth_weighted_round_robin_sequence() -> None:
    wrr = WeightedRoundRobin({"a": 5, "b": 1, "c": 1})
    assert [wrr.pick() for _ in range(14)] == list("aabacaa" * 2)
    naive = naive_weighted({"a": 5, "b": 1, "c": 1})
    assert [naive() for _ in range(7)] == list("aaaaabc")
    assert longest_run(list("aabacaa" * 2))[1] == 4 < longest_run(list("aaaaabc" * 2))[1]


def test_weighted_shares_per_period_and_gcd() -> None:
    big, small = (
        WeightedRoundRobin({"a": 20, "b": 10, "c": 10}),
        WeightedRoundRobin({"a": 2, "b": 1, "c": 1}),
    )
    assert [big.pick() for _ in range(40)] == [small.pick() for _ in range(40)]
    assert [small.pick() for _ in range(4)] == ["a", "b", "c", "a"]  # nginx: a b c a
    wrr = WeightedRoundRobin({"a": 3, "b": 2})
    with fast_switching():
        calls = run_threads(wrr.pick, 8, calls=500)
    assert Counter(calls.values) == {"a": 2400, "b": 1600}


def test_weighted_add_remove_and_down() -> None:
    wrr = WeightedRoundRobin({"a": 2, "b": 1})
    wrr.add("c", 3)
    assert Counter(wrr.pick() for _ in range(60)) == {"a": 20, "b": 10, "c": 30}
    wrr.mark_down("c")
    assert Counter(wrr.pick() for _ in range(30)) == {"a": 20, "b": 10}
    wrr.remove("a")
    assert {wrr.pick() for _ in range(5)} == {"b"}
    assert wrr.weights == {"b": 1, "c": 3}


# -- least connections ---------------------------------------------------------------------
def test_least_connections_picks_least_loaded_and_frees_on_exit() -> None:
    lc = LeastConnections(THREE, seed=3)
    with contextlib.ExitStack() as stack:
        held = [stack.enter_context(lc.acquire()) for _ in range(9)]
        assert Counter(held) == dict.fromkeys(THREE, 3)
        lc.release(held[0])
        assert lc.pick() == held[0]
        lc.acquire_server(held[0])
    assert lc.active() == dict.fromkeys(THREE, 0)


def test_least_connections_frees_when_the_request_raises() -> None:
    lc = LeastConnections(THREE)
    with pytest.raises(RuntimeError), lc.acquire() as server:
        assert lc.active()[server] == 1
        raise RuntimeError("backend error")
    assert lc.active() == dict.fromkeys(THREE, 0)


def test_least_connections_random_tie_break() -> None:
    firsts = Counter(LeastConnections(THREE, seed=s).pick() for s in range(300))
    assert set(firsts) == set(THREE) and min(firsts.values()) > 50


def test_least_connections_under_threads_balances_and_returns_to_zero() -> None:
    lc = LeastConnections(TEN, seed=1)
    peak: list[int] = []

    def request() -> None:
        with lc.acquire():
            loads = lc.active().values()
            peak.append(max(loads) - min(loads))

    with fast_switching():
        calls = run_threads(request, 8, calls=300)
    assert not calls.errors
    assert lc.active() == dict.fromkeys(TEN, 0)
    # 8 concurrent requests over 10 servers: an idle server always exists, so least
    # connections never puts two requests on one server.
    assert max(peak) == 1


def test_least_connections_down_server_keeps_counting() -> None:
    lc = LeastConnections(THREE, seed=2)
    with lc.acquire() as server:
        lc.mark_down(server)
        assert server not in {lc.pick() for _ in range(20)}
    lc.mark_up(server)
    assert lc.active() == dict.fromkeys(THREE, 0)


# -- power of two choices -----------------------------------------------------------------
def test_two_choices_never_picks_the_more_loaded_of_its_pair() -> None:
    p2c = PowerOfTwoChoices(THREE, seed=7)
    for _ in range(5):
        p2c.acquire_server("server1")
    assert "server1" not in {p2c.pick() for _ in range(500)}
    assert {p2c.pick() for _ in range(500)} == {"server2", "server3"}


def test_two_choices_is_reproducible_with_a_seed() -> None:
    a, b = PowerOfTwoChoices(TEN, seed=5), PowerOfTwoChoices(TEN, seed=5)
    assert [a.pick() for _ in range(50)] == [b.pick() for _ in range(50)]


# -- ip hash -------------------------------------------------------------------------------
def test_ip_hash_is_nginx_hash() -> None:
    # 10.1.2.x: h = 89; (89*113 + 10) % 6271 = 3796; (3796*113 + 1) % 6271 = 2521;
    # (2521*113 + 2) % 6271 = 2680; 2680 % 3 = 1 -> the second server.
    assert IpHash(THREE).pick("10.1.2.3") == "server2"
    # 2680 % 4 = 0 -> the first of four.
    assert IpHash([*THREE, "server4"]).pick("10.1.2.200") == "server1"


def test_ip_hash_maps_a_slash_24_to_one_server() -> None:
    ip = IpHash(THREE)
    assert len({ip.pick(f"192.168.7.{i}") for i in range(256)}) == 1
    assert {ip.pick(f"192.168.{i}.1") for i in range(256)} == set(THREE)


def test_ip_hash_mark_down_moves_only_that_servers_clients() -> None:
    ip = IpHash(TEN)
    clients = [f"10.{i // 256}.{i % 256}.9" for i in range(2000)]
    before = {c: ip.pick(c) for c in clients}
    ip.mark_down("s4")
    after = {c: ip.pick(c) for c in clients}
    moved = {c for c in clients if before[c] != after[c]}
    assert moved == {c for c in clients if before[c] == "s4"}
    assert moved and "s4" not in after.values()
    ip.mark_up("s4")
    assert {c: ip.pick(c) for c in clients} == before


def _nginx_ip_hash_tries(ip: str, servers: list[str]) -> list[str]:
    """The 21 servers nginx's ip_hash tries for ``ip``, in order (the test's oracle)."""
    h, tries = 89, []
    for _ in range(21):
        for byte in map(int, ip.split(".")[:3]):
            h = (h * 113 + byte) % 6271
        tries.append(servers[h % len(servers)])
    return tries


def test_ip_hash_falls_back_to_round_robin_after_21_hashes_on_down_servers() -> None:
    ip = IpHash(TEN)
    for server in TEN[2:]:  # two of ten up: 0.8^21 of the clients hash only onto down ones
        ip.mark_down(server)
    clients = [f"10.{a}.{b}.7" for a in range(8) for b in range(256)]
    stuck = [c for c in clients if set(_nginx_ip_hash_tries(c, TEN)) <= set(TEN[2:])]
    free = [c for c in clients if c not in stuck]
    assert stuck, "no client in the sample exhausts its 21 hashes"
    for client in stuck[:5]:  # round robin over the servers up: it alternates
        first, second, third = (ip.pick(client) for _ in range(3))
        assert {first, second} == set(TEN[:2]) and third == first
    for client in free[:200]:  # the others keep the first up server of their tries
        expected = next(s for s in _nginx_ip_hash_tries(client, TEN) if s in TEN[:2])
        assert ip.pick(client) == ip.pick(client) == expected


def test_ip_hash_ipv6_and_mapped_ipv4() -> None:
    ip = IpHash(THREE)
    assert ip.pick("::ffff:10.1.2.3") == ip.pick("10.1.2.3")
    assert ip.pick("2001:db8::1") in THREE


def test_ip_hash_invalid_address_is_a_value_error() -> None:
    ip = IpHash(THREE)
    for bad in ("10.1.2", "not an ip", "300.1.1.1", ""):
        with pytest.raises(ValueError, match="key"):
            ip.pick(bad)
    with pytest.raises(ValueError, match="key"):
        ip.pick()
    with pytest.raises(TypeError, match="key"):
        ip.pick(1234)  # type: ignore[arg-type]


# -- consistent hashing --------------------------------------------------------------------
def test_consistent_hash_remaps_about_one_nth_and_nothing_else() -> None:
    ring = ConsistentHash(TEN)
    keys = [f"key:{i}" for i in range(10_000)]
    before = {k: ring.pick(k) for k in keys}
    assert min(Counter(before.values()).values()) > 600  # every server holds a fair part
    ring.remove("s3")
    after = {k: ring.pick(k) for k in keys}
    moved = {k for k in keys if before[k] != after[k]}
    assert moved == {k for k in keys if before[k] == "s3"}
    assert 0.05 < len(moved) / len(keys) < 0.15  # ~1/10, against ~9/10 for hash % n
    ring.add("s3")
    assert {k: ring.pick(k) for k in keys} == before


def test_bounded_load_keeps_every_server_under_its_bound() -> None:
    lf = 1.25
    keys = [f"k{k}" for k in zipf_keys(1000, 3000, s=1.2, seed=1)]
    ring = ConsistentHash(TEN, load_factor=lf)
    free = ConsistentHash(TEN)
    with contextlib.ExitStack() as stack:
        for total, key in enumerate(keys, start=1):
            stack.enter_context(ring.acquire(key))
            stack.enter_context(free.acquire(key))
            assert max(ring.active().values()) <= math.ceil(lf * total / 10)
        assert max(free.active().values()) > math.ceil(lf * len(keys) / 10)  # skew wins
    assert sum(ring.active().values()) == 0


def test_bounded_load_under_threads() -> None:
    lf = 1.25
    ring = ConsistentHash(TEN, load_factor=lf)
    worst: list[tuple[int, int]] = []

    def request(worker: int, i: int) -> None:
        with ring.acquire(f"hot{i % 3}"):
            loads = ring.active()
            worst.append((max(loads.values()), sum(loads.values())))

    with fast_switching():
        calls = run_threads(request, 8, calls=300, pass_worker=True)
    assert not calls.errors
    assert all(top <= math.ceil(lf * total / 10) for top, total in worst)
    assert ring.active() == dict.fromkeys(TEN, 0)


# -- every strategy --------------------------------------------------------------------------
@pytest.mark.parametrize("index", range(7))
def test_every_strategy_raises_no_backend_when_all_down(index: int) -> None:
    strategy = make_all(THREE)[index]
    for server in THREE:
        strategy.mark_down(server)
    with pytest.raises(NoBackendAvailable):
        strategy.pick(key_for(strategy, 1))
    strategy.mark_up("server3")
    assert strategy.pick(key_for(strategy, 1)) == "server3"


@pytest.mark.parametrize("index", range(7))
def test_every_strategy_is_thread_safe_and_releases(index: int) -> None:
    strategy = make_all(TEN)[index]

    def request(worker: int, i: int) -> str:
        with strategy.acquire(key_for(strategy, worker * 1000 + i)) as server:
            return server

    with fast_switching():
        calls = run_threads(request, 8, calls=250, pass_worker=True)
    assert not calls.errors and len(calls.values) == 2000
    assert set(calls.values) <= set(TEN)
    assert strategy.active() == dict.fromkeys(TEN, 0)


@pytest.mark.parametrize("index", range(7))
def test_every_strategy_add_and_remove(index: int) -> None:
    strategy = make_all(THREE)[index]
    if isinstance(strategy, WeightedRoundRobin):
        strategy.add("server4", 2)
    else:
        strategy.add("server4")
    strategy.remove("server1")
    picks = {strategy.pick(key_for(strategy, i)) for i in range(400)}
    assert "server1" not in picks and "server4" in picks
    with pytest.raises(ValueError, match="server4"):
        strategy.add("server4", 1) if isinstance(strategy, WeightedRoundRobin) else strategy.add(
            "server4"
        )
    with pytest.raises(ValueError, match="server1"):
        strategy.remove("server1")


def test_release_of_a_removed_server_still_counts_down() -> None:
    lc = LeastConnections(THREE)
    with lc.acquire() as server:
        lc.remove(server)
    assert server not in lc.active()


# -- bad input -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("build", "error", "match"),
    [
        (lambda: RoundRobin([]), ValueError, "servers must not be empty"),
        (lambda: RoundRobin(["a", "a"]), ValueError, "duplicates"),
        (lambda: RoundRobin("abc"), TypeError, "servers"),
        (lambda: RoundRobin([1, 2]), TypeError, "server"),
        (lambda: LeastConnections([""]), ValueError, "server"),
        (lambda: WeightedRoundRobin({}), ValueError, "servers must not be empty"),
        (lambda: WeightedRoundRobin({"a": 0}), ValueError, "weight of 'a'"),
        (lambda: WeightedRoundRobin({"a": -2}), ValueError, "weight of 'a'"),
        (lambda: WeightedRoundRobin({"a": 1.5}), TypeError, "weight of 'a'"),
        (lambda: WeightedRoundRobin({"a": True}), TypeError, "weight of 'a'"),
        (lambda: WeightedRoundRobin(["a"]), TypeError, "weights"),
        (lambda: WeightedRoundRobin({"a": 10**7, "b": 1}), ValueError, "weights"),
        (lambda: ConsistentHash(["a"], vnodes=0), ValueError, "vnodes"),
        (lambda: ConsistentHash(["a"], load_factor=0.5), ValueError, "load_factor"),
        (lambda: ConsistentHash(["a"], load_factor=float("nan")), ValueError, "load_factor"),
        (lambda: ConsistentHash(["a"], load_factor="2"), TypeError, "load_factor"),
        (lambda: IpHash([]), ValueError, "servers must not be empty"),
    ],
)
def test_bad_input_names_the_parameter(build, error, match: str) -> None:
    with pytest.raises(error, match=match):
        build()


def test_bad_calls_name_the_server_or_key() -> None:
    rr = RoundRobin(THREE)
    with pytest.raises(ValueError, match="nope"):
        rr.mark_down("nope")
    with pytest.raises(ValueError, match="no active request"):
        rr.release("server1")
    with pytest.raises(ValueError, match="weight of 'd'"):
        WeightedRoundRobin({"a": 1}).add("d", 0)
    with pytest.raises(ValueError, match="key"):
        ConsistentHash(THREE).pick()


# -- issue 18: a race and a key that broke documented guarantees ------------------------------
class _PausingLock:
    """Wraps a balancer's lock: the first time ``owner`` releases it, ``owner`` waits
    there until another thread has run a whole call, so that call lands exactly between
    two critical sections of ``owner`` (if there are two), never by luck."""

    def __init__(self, lock: threading.Lock) -> None:
        self.lock = lock
        self.owner: threading.Thread | None = None
        self.released = threading.Event()
        self.other_done = threading.Event()

    def __enter__(self) -> None:
        self.lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self.lock.release()
        if threading.current_thread() is self.owner and not self.released.is_set():
            self.released.set()
            assert self.other_done.wait(10)


def test_weighted_remove_and_mark_down_race_deterministically() -> None:
    # Before the fix, remove() deleted the weight, released the lock, then removed the
    # server: a mark_down of another server in that gap rebuilt the schedule from the up
    # servers, the half-removed one included, and raised KeyError.
    wrr = WeightedRoundRobin({"server1": 2, "server2": 1, "server3": 1})
    lock = _PausingLock(wrr._lock)
    wrr._lock = lock  # type: ignore[assignment]
    errors: dict[str, BaseException] = {}

    def remove() -> None:
        try:
            wrr.remove("server1")
        except BaseException as exc:  # recorded for the assertion
            errors["remove"] = exc

    def mark_down() -> None:
        assert lock.released.wait(10)
        try:
            wrr.mark_down("server2")
        except BaseException as exc:
            errors["mark_down"] = exc
        finally:
            lock.other_done.set()

    threads = [threading.Thread(target=remove), threading.Thread(target=mark_down)]
    lock.owner = threads[0]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert errors == {}
    assert wrr.servers == ["server2", "server3"] and wrr.weights == {"server2": 1, "server3": 1}
    assert wrr.up == ["server3"]


def test_consistent_hash_takes_any_str_key() -> None:
    # "\ud800" (a lone surrogate) cannot be strict UTF-8; it hashes by its surrogatepass
    # bytes, deterministically, and apart from its neighbours.
    ring, other = ConsistentHash(TEN), ConsistentHash(TEN)
    lone = ["\ud800", "\udbff", "\udc00", "\udfff", "a\ud800b"]
    assert [ring.pick(k) for k in lone] == [other.pick(k) for k in lone]
    assert all(ring.pick(k) in TEN for k in lone)
    assert len({ring.pick(k) for k in lone * 3}) > 1  # not all sent to one fallback
    with pytest.raises(TypeError, match="key"):
        ring.pick(b"bytes")  # type: ignore[arg-type]
