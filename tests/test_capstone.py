"""The capstone service (notebook 06): every pattern's effect counted exactly, the faults'
guarantees, the fault injector, and that the stack leaves nothing running.

One stack (primary + replica, its own Redis, two app processes) serves the module; each
test sets the switches it needs. Marked ``one_pass``: it uses none of the course's shared
services, so the embedded pass would only repeat it.
"""

from __future__ import annotations

import gc
import itertools
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import httpx
import psutil
import pytest
from ordering import until

from course_lib.capstone.lesson.app import (
    CLIENT_BURST,
    CLIENT_RATE,
    FOLLOWS,
    Config,
    _feed_ids,
    _followers_and_self,
    pool_size,
)
from course_lib.capstone.lesson.faults import Fault, inject, windows_frame
from course_lib.capstone.lesson.load import NOISY, Op, make_trace, play
from course_lib.capstone.lesson.reaper import start_reaper
from course_lib.capstone.lesson.rig import USERS, Stack, stack
from course_lib.load_balancing import LeastConnections
from course_lib.load_balancing.proxy import Proxy
from course_lib.services import EmbeddedRedis

pytestmark = pytest.mark.one_pass

ALL_ON = Config(eager=True, cache=True, replica=True, limit=True)


@pytest.fixture(scope="module")
def service() -> Iterator[Stack]:
    with stack(processes=2) as running:
        yield running


def _feed(url: str, user: int, key: str = "c0", **headers: str) -> httpx.Response:
    return httpx.get(f"{url}/users/{user}/feed", headers={"x-api-key": key, **headers}, timeout=10)


def _costs(response: httpx.Response) -> tuple[int, int, int]:
    return (
        int(response.headers["x-statements"]),
        int(response.headers["x-primary-statements"]),
        int(response.headers["x-redis"]),
    )


def test_config_and_pool_rule() -> None:
    assert Config.from_json({"eager": True}) == Config(eager=True)
    with pytest.raises(ValueError, match="config"):
        Config.from_json({"eagre": True})
    with pytest.raises(TypeError, match="cache"):
        Config.from_json({"cache": "yes"})
    assert pool_size(3, cores=2) == 2  # ceil(2 x 2 / 3)
    assert pool_size(1, cores=2) == 4
    assert pool_size(8, cores=2) == 1


def test_follow_ring_is_consistent() -> None:
    # a write by u must invalidate exactly the feeds that show u's posts
    for writer in (1, 500, USERS):
        readers = {r for r in range(1, USERS + 1) if writer in _feed_ids(r, USERS)}
        assert readers == set(_followers_and_self(writer, USERS))
        assert len(readers) == FOLLOWS + 1


def test_each_switch_changes_the_counts_exactly(service: Stack) -> None:
    url = service.procs[0].url
    service.configure(Config())
    assert _costs(_feed(url, 11)) == (FOLLOWS + 2, FOLLOWS + 2, 0)  # the N+1, on the primary
    service.configure(Config(eager=True))
    assert _costs(_feed(url, 11)) == (2, 2, 0)
    service.configure(Config(eager=True, replica=True))
    service.rs.wait_for_replay()
    assert _costs(_feed(url, 11)) == (2, 0, 0)  # both on the replica
    service.configure(Config(eager=True, cache=True, replica=True))
    _feed(url, 11)  # miss: fills
    assert _costs(_feed(url, 11)) == (0, 0, 1)  # hit: one GET
    service.configure(ALL_ON)
    assert _costs(_feed(url, 11)) == (0, 0, 2)  # + the limiter's script


def test_read_your_writes_across_processes_and_invalidation(service: Stack) -> None:
    service.configure(ALL_ON)
    writer, follower = 20, 20 - FOLLOWS  # 12 follows 13..20
    first, second = service.procs[0].url, service.procs[1].url
    _feed(second, follower)  # cached on every process's shared Redis
    reply = httpx.post(
        f"{first}/posts", json={"user_id": writer, "title": "t"}, headers={"x-api-key": "c1"}
    )
    assert reply.status_code == 201
    post = reply.json()
    assert post["lsn"] and reply.headers["x-write-lsn"] == post["lsn"]
    # another process, the LSN carried by the client: it sees its post
    back = _feed(second, writer, key="c1", **{"x-min-lsn": post["lsn"]})
    assert post["id"] in [p["id"] for p in back.json()["posts"]]
    # the follower's cached feed was invalidated: once the replica replays, it shows the post
    service.rs.wait_for_replay()
    assert post["id"] in [p["id"] for p in _feed(second, follower).json()["posts"]]


def test_rate_limit_refuses_only_the_client_over_its_quota(service: Stack) -> None:
    """GCRA's guarantee, whatever the machine's speed: over ``elapsed`` seconds a key is
    admitted at most ``CLIENT_BURST + CLIENT_RATE * elapsed`` times (+1 for rounding). 16
    threads send 400 requests, far faster than the rate allows, so the bound is below what
    was sent and refusals must show; an app too slow to outpace the rate fails the test
    with its throughput rather than let it pass on nothing."""
    service.configure(ALL_ON)
    url = service.procs[0].url
    statuses: list[int] = []

    def noisy() -> None:
        with httpx.Client(base_url=url) as http:
            for _ in range(25):
                reply = http.get("/users/5/feed", headers={"x-api-key": NOISY})
                statuses.append(reply.status_code)

    threads = [threading.Thread(target=noisy) for _ in range(16)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    bound = CLIENT_BURST + CLIENT_RATE * elapsed + 1
    assert set(statuses) <= {200, 429} and len(statuses) == 400
    assert len(statuses) > bound, f"the app served {400 / elapsed:.0f} requests/s: too few to test"
    assert statuses.count(200) <= bound
    assert httpx.get(f"{url}/users/5/feed", headers={"x-api-key": "c2"}).status_code == 200


def test_redis_down_fails_open_and_comes_back(service: Stack) -> None:
    service.configure(ALL_ON)
    url = service.procs[0].url
    service.stop_redis()
    try:
        reply = _feed(url, 30, key="c3")
        assert reply.status_code == 200
        assert _costs(reply)[0] == 2  # no cache: the database serves it
        write = httpx.post(
            f"{url}/posts", json={"user_id": 30, "title": "t"}, headers={"x-api-key": "c3"}
        )
        assert write.status_code == 201  # committed; the invalidation it could not do is counted
        stats = httpx.get(f"{url}/_stats").json()
        assert stats["missed_invalidations"] >= 1
    finally:
        service.start_redis()
    until(lambda: _costs(_feed(url, 30, key="c3"))[2] > 0, "the app uses Redis again")


def test_replica_down_reads_go_to_the_primary(service: Stack) -> None:
    service.configure(Config(eager=True, replica=True))
    url = service.procs[0].url
    service.rs.stop_replica()
    try:
        for user in range(40, 50):
            reply = _feed(url, user)
            assert reply.status_code == 200
            # answered from the primary; a read the router sent to the replica before its
            # probe saw it stop failed there first and was retried (its failed SELECT counts)
            assert _costs(reply)[1] == 2
    finally:
        service.rs.start_replica()
    service.rs.wait_for_replay()
    until(lambda: _costs(_feed(url, 41))[1] == 0, "reads are back on the replica")


def test_killed_process_loses_no_read_behind_the_proxy(service: Stack) -> None:
    service.configure(ALL_ON)
    trace = [Op(k / 100, f"c{k % 8}", "read", 1 + k % 50) for k in range(200)]
    with Proxy(service.urls, LeastConnections(list(service.urls), seed=1)).serve() as url:
        t0 = time.perf_counter() + 0.1
        with inject([Fault("kill", 0.5, 0.0, begin=lambda: service.kill(1))], t0) as windows:
            rows = play(url, trace, t0=t0)
    assert not service.procs[1].alive
    assert rows.status.eq(200).all(), rows.status.value_counts()
    assert windows_frame(windows).name.tolist() == ["kill"]
    assert service.revive(ALL_ON) == [1]
    assert service.procs[1].alive and _feed(service.procs[1].url, 3).status_code == 200


def test_play_runs_with_the_collector_paused_and_restores_it(service: Stack) -> None:
    service.configure(Config(eager=True))
    seen = []

    def key(client: str, target: str, request: object) -> str:
        seen.append(gc.isenabled())  # the proxy runs in this process: it sees the state
        return client

    trace = [Op(k / 100, "c0", "read", 1 + k) for k in range(5)]
    with Proxy(service.urls, LeastConnections(list(service.urls), seed=1), key=key).serve() as url:
        rows = play(url, trace)
    assert rows.status.eq(200).all() and seen == [False] * 5
    assert gc.isenabled()


def test_make_trace_is_deterministic_and_spaced() -> None:
    one = make_trace(rate=80, seconds=2, users=USERS, noisy_rate=30, seed=3)
    assert one == make_trace(rate=80, seconds=2, users=USERS, noisy_rate=30, seed=3)
    assert len([op for op in one if op.client != NOISY]) == 160
    assert len([op for op in one if op.client == NOISY]) == 60
    assert [op.at for op in one] == sorted(op.at for op in one)
    c0 = [op.at for op in one if op.client == "c0"]
    assert {round(b - a, 6) for a, b in itertools.pairwise(c0)} == {round(8 / 80, 6)}
    with pytest.raises(ValueError, match="rate"):
        make_trace(rate=0, seconds=1, users=10)


def test_injector_runs_the_whole_schedule_and_ends_begun_faults_on_error() -> None:
    calls: list[str] = []
    started = threading.Event()
    acted: dict[str, float] = {}  # when a's begin action returned, when its end action began
    faults = [
        Fault("a", 0.0, 0.05,
              begin=lambda: (calls.append("a+"), started.set(),
                             acted.setdefault("down", time.perf_counter())),
              end=lambda: (acted.setdefault("up", time.perf_counter()), calls.append("a-"))),
        Fault("b", 0.1, 0.05, begin=lambda: calls.append("b+"), end=lambda: calls.append("b-")),
        Fault("trace-carried", 0.0, 0.5),
    ]  # fmt: skip
    # the block ends at once: the schedule still runs to its end, every window complete
    t0 = time.perf_counter()
    with inject(faults, t0) as windows:
        pass
    assert calls == ["a+", "a-", "b+", "b-"]
    frame = windows_frame(windows).set_index("name")
    assert frame.index.tolist() == ["a", "b", "trace-carried"]
    for _, w in frame.iterrows():
        assert w.start_s <= w.in_effect_s <= w.lifted_s <= w.end_s
    # the fault holds for certain between in_effect_s and lifted_s
    assert frame.loc["a", "in_effect_s"] >= acted["down"] - t0
    assert frame.loc["a", "lifted_s"] <= acted["up"] - t0
    assert frame.loc["trace-carried"].tolist() == [0.0, 0.0, 0.5, 0.5]  # planned times
    # a block that raises: no new fault begins, what began is ended
    calls.clear()
    started.clear()
    late = [faults[0], Fault("late", 30.0, 1.0, begin=lambda: calls.append("late+"))]
    with pytest.raises(KeyError), inject(late, time.perf_counter()) as windows:
        until(started.is_set, "fault a began")
        raise KeyError("boom")
    assert calls[0] == "a+" and "late+" not in calls and calls[-1] == "a-"
    assert [w["name"] for w in windows] == ["a"]
    with pytest.raises(ValueError, match="distinct"), inject([faults[0], faults[0]], 0.0):
        pass


def test_stack_leaves_nothing_running() -> None:
    with stack(processes=1) as running:
        pids = [proc.pid for proc in running.procs] + running.rs.pids()
        socket = running.redis.socket
        root = running.rs.root
        assert all(psutil.pid_exists(pid) for pid in pids)
        assert _feed(running.procs[0].url, 1).status_code == 200
        assert asdict(Config()) == {k: False for k in asdict(Config())}
    until(lambda: not any(_alive(pid) for pid in pids), "every process stopped")
    assert not socket.exists() and not root.exists()


def test_reaper_stops_the_redis_of_a_killed_program() -> None:
    root = Path(tempfile.mkdtemp(prefix="pc-cap-t-"))
    redis = EmbeddedRedis(root)
    redis.start()
    pid = int(redis.pidfile.read_text())
    program = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    reaper = start_reaper(redis.pidfile, root, parent=program.pid)
    try:
        program.kill()
        program.wait()
        until(lambda: not _alive(pid) and not root.exists(), "the reaper stopped Redis")
        assert reaper.wait(timeout=10) == 0
    finally:
        program.kill()
        reaper.kill()
        redis.stop()
        shutil.rmtree(root, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
