"""The seed's write-behind on RQ: real ``rq worker`` processes, JSON jobs, and its three flaws
(partial data cached as the row, updates applied out of order, a job lost with its process),
each counted exactly."""

from __future__ import annotations

import json
import time
import zlib
from collections.abc import Iterator

import psutil
import pytest
import redis as redis_lib
import rq
from rq.job import JobStatus
from rq.registry import StartedJobRegistry
from sqlalchemy import Engine

import course_lib.services as services
from course_lib.caching.lesson import as_written
from course_lib.caching.lesson import rq_write_behind as rwb
from course_lib.caching.lesson.users import UserStore, seed_users


@pytest.fixture
def schema() -> Iterator[str]:
    name = services.unique_schema("trq")
    yield name
    services.drop_schema(name)


@pytest.fixture
def engine(schema: str) -> Iterator[Engine]:
    engine = services.schema_engine(schema)
    seed_users(engine, 50, seed=42)
    yield engine
    engine.dispose()


@pytest.fixture
def queue(redis: redis_lib.Redis, ns: str, engine: Engine) -> Iterator[rq.Queue]:
    queue = rwb.json_queue(f"{ns}-q", redis)
    with as_written.bound(redis, engine, prefix=f"{ns}:user", queue=queue):
        yield queue
    rwb.purge(queue, [f"{ns}-a", f"{ns}-b"])


def cached(redis: redis_lib.Redis, ns: str, uid: int) -> dict:
    return json.loads(redis.get(f"{ns}:user:{uid}"))


def test_a_job_is_json_in_redis_not_a_pickle(redis, queue):
    as_written.update_user_write_behind(7, {"plan": "pro"})
    (job_id,) = queue.get_job_ids()
    raw = zlib.decompress(redis.hget(f"rq:job:{job_id}", "data"))  # RQ compresses job data
    assert not raw.startswith(b"\x80")  # every pickle since protocol 2 starts with PROTO
    func, instance, args, kwargs = json.loads(raw)
    assert func == "course_lib.caching.lesson.as_written.update_db"
    assert (instance, args, kwargs) == (None, [7, {"plan": "pro"}], {})


def test_the_cache_holds_the_changed_fields_as_the_row(redis, ns, engine, schema, queue):
    before = UserStore(engine).load(7)
    with rwb.rq_workers(queue, [f"{ns}-a"], schema=schema):
        as_written.update_user_write_behind(7, {"plan": "pro"})
        rwb.wait_drained(queue)
    assert len(rwb.registries(queue)["finished"]) == 1
    row = UserStore(engine).load(7)
    assert cached(redis, ns, 7) == {"plan": "pro"}  # name and email are gone from the cache
    assert row == {**before, "plan": "pro"} and row["name"] and row["email"]


def test_two_workers_apply_two_updates_of_a_user_out_of_order(redis, ns, engine, schema, queue):
    names = [f"{ns}-a", f"{ns}-b"]
    with rwb.rq_workers(queue, names, schema=schema) as workers:
        result = rwb.out_of_order(queue, workers, engine, [1, 2, 3], values=("basic", "pro"))
    assert result.rounds == 3 and result.db_older_than_cache == 3
    assert all(v1 != v2 and {v1, v2} == set(names) for v1, v2 in result.takers)
    store = UserStore(engine)
    for uid in (1, 2, 3):
        assert store.load(uid)["plan"] == "basic" and cached(redis, ns, uid) == {"plan": "pro"}
    assert len(rwb.registries(queue)["finished"]) == 6


def test_a_killed_work_horse_fails_the_job_and_it_is_not_retried(ns, engine, schema, queue):
    old = UserStore(engine).load(9)["plan"]
    with rwb.rq_workers(queue, [f"{ns}-a"], schema=schema) as workers:
        job, result = rwb.kill_mid_job(queue, workers, engine, 9, {"plan": "lost"}, kill="horse")
        assert workers[0].alive  # the worker survives its horse and takes the next job
        after = queue.enqueue(as_written.update_db, 10, {"plan": "next"})
        assert rwb.wait_for(after, JobStatus.FINISHED) == JobStatus.FINISHED
    assert result.killed == "work-horse" and result.status == "failed"
    assert result.registries["failed"] == ["this job"] and result.registries["started"] == []
    assert result.exc_info.startswith("Work-horse terminated unexpectedly")
    assert "signal 9" in result.exc_info and result.retries_left is None
    assert result.in_db == old  # the update never reached the database
    time.sleep(0.5)
    assert job.get_status(refresh=True) == JobStatus.FAILED  # still failed: no retry


def test_retry_runs_again_a_job_whose_work_horse_was_killed(ns, engine, schema, queue):
    with rwb.rq_workers(queue, [f"{ns}-a"], schema=schema) as workers:
        _, result = rwb.kill_mid_job(
            queue, workers, engine, 9, {"plan": "retried"}, kill="horse", retry=3
        )
    assert result.status == "finished" and result.retries_left == 2  # one retry used
    assert result.registries["failed"] == [] and result.registries["finished"] == ["this job"]
    assert result.in_db == "retried"


def test_killing_only_the_worker_leaves_its_work_horse_to_finish(ns, engine, schema, queue):
    with rwb.rq_workers(queue, [f"{ns}-a"], schema=schema) as workers:
        _, result = rwb.kill_mid_job(queue, workers, engine, 9, {"plan": "orphan"}, kill="worker")
        assert not workers[0].alive
    assert result.status == "finished" and result.in_db == "orphan"


def test_worker_and_horse_killed_leave_the_job_started_until_cleanup(redis, ns, engine, schema):
    old = UserStore(engine).load(9)["plan"]
    for retry in (None, 2):
        queue = rwb.json_queue(f"{ns}-q{retry}", redis)
        with rwb.rq_workers(queue, [f"{ns}-a{retry}"], schema=schema) as workers:
            job, result = rwb.kill_mid_job(
                queue, workers, engine, 9, {"plan": "gone"}, kill="both", retry=retry
            )
        assert result.status == "started" and result.registries["started"] == ["this job"]
        assert result.in_db == old
        # Nobody will fail it before its heartbeat expires (60 s or more after it started).
        assert result.started_expires_in is not None and result.started_expires_in > 30
        registry = StartedJobRegistry(queue=queue)
        registry.cleanup()
        assert job.get_status(refresh=True) == JobStatus.STARTED
        registry.cleanup(timestamp=time.time() + result.started_expires_in + 1)
        after = rwb.registries(queue, {job.id: "this job"})
        if retry is None:
            assert after["failed"] == ["this job"] and after["started"] == []
            assert "AbandonedJobError" in rwb.last_error(job)
        else:
            assert after["queued"] == ["this job"] and after["failed"] == []
            job.refresh()
            assert job.retries_left == 1
        rwb.purge(queue, [f"{ns}-a{retry}"])


def test_rq_workers_are_stopped_when_the_block_fails(ns, schema, queue):
    pids: list[int] = []
    names = [f"{ns}-a", f"{ns}-b"]
    with pytest.raises(RuntimeError), rwb.rq_workers(queue, names, schema=schema) as w:
        pids += [worker.pid for worker in w]
        raise RuntimeError("boom")
    assert len(pids) == 2
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"


def test_bad_arguments_are_refused(ns, schema, engine, queue):
    with pytest.raises(ValueError, match="names"), rwb.rq_workers(queue, [], schema=schema):
        pass
    with pytest.raises(ValueError, match="kill"):
        rwb.kill_mid_job(queue, [], engine, 1, {"plan": "x"}, kill="everything")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="two"):
        rwb.out_of_order(queue, [], engine, [1])
