"""The seed's write-behind on the queue its API names: RQ, with real ``rq worker`` processes.

``task_queue.enqueue(update_db, user_id, data)`` is RQ's API. Here it runs on a real
``rq.Queue`` in the course's Redis, with RQ's JSON serializer on the queue and on the workers
(a job is JSON in Redis, never a pickle), and each worker is a real ``rq worker`` process in a
process group of its own, started from Python and stopped also when the calling code fails.

RQ's ``Worker`` forks a *work-horse* per job: the horse imports ``update_db`` by its dotted
path and runs it, the worker waits for it. The horse calls ``setpgrp()``, so it is in its own
process group: a signal to the worker's group does not reach it.

What the helpers stage, with real processes and nothing simulated:

- :func:`out_of_order`: two workers blocked on the queue are frozen (``SIGSTOP``); Redis still
  hands v1 to one and v2 to the other (it serves blocked clients server-side). The holder of
  v2 is resumed first, then the holder of v1: the database ends with v1 while the cache holds
  v2, because the seed's jobs carry no version.
- :func:`kill_mid_job`: a job's ``UPDATE`` waits on a row lock held here, so it is mid-job for
  as long as needed; then the work-horse, or the worker, or both are ``SIGKILL``-ed, and the
  queue's registries are read.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import psutil
import redis
import rq
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry, FinishedJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer
from sqlalchemy import Engine, select, text

import course_lib.services as services
from course_lib.orphans import watch_parent
from course_lib.validation import positive_number

from . import as_written
from .users import users_table

__all__ = [
    "ORPHAN_GRACE",
    "SERIALIZER",
    "KillResult",
    "OutOfOrder",
    "RqWorker",
    "Worker",
    "json_queue",
    "kill_mid_job",
    "last_error",
    "out_of_order",
    "purge",
    "registries",
    "row_locked",
    "rq_workers",
    "wait_drained",
    "wait_for",
    "wait_until",
]


#: Seconds an orphaned worker gets for its warm shutdown before it kills itself.
ORPHAN_GRACE = 5.0


class Worker(rq.Worker):
    """The worker class ``rq worker`` runs (see :class:`RqWorker`): RQ's forking ``Worker``,
    which also asks itself for a warm shutdown (``SIGTERM``) if the process that started it
    dies without stopping it, and kills itself :data:`ORPHAN_GRACE` seconds later if it is
    still running. Its work-horses are not watched: a forked child does not
    inherit the watching thread."""

    def work(self, *args: Any, **kwargs: Any) -> bool:
        main = threading.main_thread().ident

        def orphaned() -> None:
            # To the main thread itself: a signal sent to the process may be taken by the
            # watching thread, leaving the main thread blocked in its BLMOVE. A warm
            # shutdown first; if the worker is still here after ORPHAN_GRACE seconds (seen
            # once on a busy machine), it is killed: an orphan must never outlive that.
            signal.pthread_kill(main, signal.SIGTERM)
            time.sleep(ORPHAN_GRACE)
            os.kill(os.getpid(), signal.SIGKILL)

        watch_parent(orphaned)
        return super().work(*args, **kwargs)


#: The serializer of the queue and of every worker: JSON, never pickle.
SERIALIZER = "rq.serializers.JSONSerializer"


def json_queue(name: str, connection: redis.Redis) -> rq.Queue:
    """An ``rq.Queue`` whose jobs are serialised as JSON (function path, args, kwargs)."""
    return rq.Queue(name, connection=connection, serializer=JSONSerializer)


def wait_until(predicate: Callable[[], object], what: str, timeout: float = 20.0) -> None:
    """Poll ``predicate`` every 5 ms until it is true; ``TimeoutError`` naming ``what``."""
    deadline = time.monotonic() + positive_number("timeout", timeout)
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout} s")
        time.sleep(0.005)


def wait_for(job: Job, *statuses: JobStatus, timeout: float = 20.0) -> JobStatus:
    """Wait until ``job``'s status is one of ``statuses``; return it."""
    status: list[JobStatus] = []

    def reached() -> bool:
        status[:] = [job.get_status(refresh=True)]
        return status[0] in statuses

    wait_until(reached, f"job {job.id} to become {'/'.join(statuses)}", timeout)
    return status[0]


class RqWorker:
    """One ``rq worker`` process (``python -m rq.cli worker``) in its own process group.

    Its environment names the schema ``update_db`` writes to (``as_written.SCHEMA_ENV``).
    """

    def __init__(self, queue: rq.Queue, name: str, schema: str) -> None:
        self.name = name
        self.connection: redis.Redis = queue.connection
        # A file, not a pipe (a full pipe would block the worker); closed by stop().
        self._log = tempfile.TemporaryFile()  # noqa: SIM115
        # Every connection of the worker carries its name, so CLIENT LIST tells whether *its*
        # dequeue call is blocked (RQ itself names only one of them).
        url = services.redis_url()
        url += f"{'&' if '?' in url else '?'}client_name={name}"
        command = [sys.executable, "-m", "rq.cli", "worker", "--url", url]
        command += ["--serializer", SERIALIZER, "--name", name, "--logging_level", "WARNING"]
        # RQ's own Worker, named through this module: importing it imports `update_db` in the
        # worker before it forks, so each work-horse starts with it loaded (RQ's docs advise
        # preloading for the same reason) instead of importing SQLAlchemy once per job.
        command += ["--worker-class", f"{__name__}.Worker"]
        self._proc = subprocess.Popen(
            [*command, queue.name],
            env={**os.environ, as_written.SCHEMA_ENV: schema},
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stopped as a whole
        )
        self.pid = self._proc.pid
        self._horses: set[int] = set()

    @property
    def alive(self) -> bool:
        return self._proc.poll() is None

    def log(self) -> str:
        """What the worker printed (warnings and errors)."""
        self._log.seek(0)
        return self._log.read().decode(errors="replace")

    def blocked(self) -> bool:
        """Whether the worker waits on the queue (its connection is blocked in Redis)."""
        return any(
            c.get("name") == self.name and "b" in c.get("flags", "")
            for c in self.connection.client_list()
        )

    def wait_idle(self, timeout: float = 30.0) -> None:
        """Wait until the worker is blocked on the queue, waiting for a job."""

        def idle() -> bool:
            if not self.alive:
                raise RuntimeError(f"rq worker {self.name} exited: {self.log()[-2000:]}")
            return self.blocked()

        wait_until(idle, f"rq worker {self.name} to wait for jobs", timeout)

    def horse_pid(self) -> int | None:
        """The pid of the work-horse (the child forked for the current job), if any."""
        with contextlib.suppress(psutil.NoSuchProcess):
            for child in psutil.Process(self.pid).children():
                self._horses.add(child.pid)
                return child.pid
        return None

    def pause(self) -> None:
        """``SIGSTOP``: the process stops where it is; Redis still serves its blocked call."""
        os.killpg(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.killpg(self.pid, signal.SIGCONT)

    def kill(self) -> None:
        """``SIGKILL`` the worker's process group; its work-horse has its own and lives on."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        self._proc.wait(timeout=10)

    def stop(self, timeout: float = 5.0) -> None:
        """Resume, ``SIGTERM`` (RQ's warm shutdown), then ``SIGKILL``; work-horses too."""
        self.horse_pid()
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGCONT)
                os.killpg(self.pid, signal.SIGTERM)
            try:
                self._proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        for pid in (self.pid, *self._horses):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        self._log.close()


@contextlib.contextmanager
def rq_workers(queue: rq.Queue, names: Sequence[str], *, schema: str) -> Iterator[list[RqWorker]]:
    """Start one ``rq worker`` per name on ``queue``; yield them once each waits for jobs.

    They are stopped when the block ends, also on error.
    """
    if not names or len(set(names)) != len(names):
        raise ValueError(f"names must be distinct and not empty, got {names!r}")
    workers: list[RqWorker] = []
    try:
        for name in names:
            workers.append(RqWorker(queue, name, schema))
        for worker in workers:
            worker.wait_idle()
        yield workers
    finally:
        for worker in workers:
            worker.stop()


def purge(queue: rq.Queue, workers: Sequence[str] = ()) -> int:
    """Delete every key of ``queue``, of its jobs and of the named workers; the number deleted."""
    conn = queue.connection
    registries_ = (StartedJobRegistry, FinishedJobRegistry, FailedJobRegistry)
    ids = set(queue.get_job_ids())
    for registry in registries_:
        ids |= {m.decode().split(":")[0] for m in conn.zrange(registry(queue=queue).key, 0, -1)}
    marks = ids | {queue.name, *workers}
    keys = conn.scan_iter(match="rq:*", count=1000)
    doomed = [k for k in keys if any(m in k.decode() for m in marks)]
    conn.srem("rq:queues", queue.key)
    if workers:
        conn.srem("rq:workers", *(f"rq:worker:{w}" for w in workers))
    return conn.delete(*doomed) if doomed else 0


def registries(queue: rq.Queue, labels: dict[str, str] | None = None) -> dict[str, list[str]]:
    """Job ids in the queue and in its started, finished and failed registries; each id is
    replaced by its label in ``labels`` if it has one (job ids are random: labels print the
    same on every run)."""
    labels = labels or {}
    found = {
        "queued": queue.get_job_ids(),
        "started": StartedJobRegistry(queue=queue).get_job_ids(),
        "finished": FinishedJobRegistry(queue=queue).get_job_ids(),
        "failed": FailedJobRegistry(queue=queue).get_job_ids(),
    }
    return {name: sorted(labels.get(i, i) for i in ids) for name, ids in found.items()}


@contextlib.contextmanager
def row_locked(engine: Engine, user_id: int) -> Iterator[Callable[[], int]]:
    """Hold ``SELECT ... FOR UPDATE`` on one user's row for the block.

    Yields a function counting the backends blocked by this lock (a job's ``UPDATE`` waits on
    it: the job is mid-run, in the database, for as long as the block lasts).
    """
    with engine.connect() as conn, conn.begin():
        holder = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
        conn.execute(select(users_table.c.id).where(users_table.c.id == user_id).with_for_update())

        def waiting() -> int:
            with engine.connect() as probe:
                return probe.execute(
                    text(
                        "SELECT count(*) FROM pg_stat_activity"
                        " WHERE CAST(:holder AS integer) = ANY(pg_blocking_pids(pid))"
                    ),
                    {"holder": holder},
                ).scalar_one()

        yield waiting


@dataclass(frozen=True)
class OutOfOrder:
    """Staged rounds of two updates of one user (v1 then v2) run by two workers."""

    rounds: int
    db_older_than_cache: int
    takers: list[tuple[str, str]]  # per round: the worker that took v1, the one that took v2


def _served(workers: Sequence[RqWorker], before: set[str]) -> str:
    """The name of the one worker of ``before`` that Redis just handed a job."""
    found: list[str] = []

    def one_unblocked() -> bool:
        blocked = {w.name for w in workers if w.blocked()}
        found[:] = sorted(before - blocked)
        return len(found) == 1

    wait_until(one_unblocked, "Redis to hand the job to one frozen worker")
    return found[0]


def out_of_order(
    queue: rq.Queue,
    workers: Sequence[RqWorker],
    engine: Engine,
    user_ids: Sequence[int],
    *,
    field: str = "plan",
    values: tuple[str, str] = ("basic", "pro"),
) -> OutOfOrder:
    """For each user: ``update_user_write_behind`` v1 then v2, run by two different workers,
    the one holding v2 first. ``as_written`` must be bound to ``queue``."""
    if len(workers) != 2:
        raise ValueError(f"workers must be two, got {len(workers)}")
    by_name = {w.name: w for w in workers}
    takers: list[tuple[str, str]] = []
    older = 0
    for uid in user_ids:
        for worker in workers:
            worker.wait_idle()
            worker.pause()  # both frozen while blocked: Redis still serves them, in turn
        try:
            first, second = ({field: f"{values[0]}"}, {field: f"{values[1]}"})
            as_written.update_user_write_behind(uid, first)
            v1_taker = _served(workers, set(by_name))
            as_written.update_user_write_behind(uid, second)
            v2_taker = _served(workers, set(by_name) - {v1_taker})
            jobs = {j.args[1][field]: j for j in _started_or_moved(queue)}
            by_name[v2_taker].resume()
            wait_for(jobs[values[1]], JobStatus.FINISHED)
            by_name[v1_taker].resume()
            wait_for(jobs[values[0]], JobStatus.FINISHED)
        finally:
            for worker in workers:
                worker.resume()
        takers.append((v1_taker, v2_taker))
        with engine.connect() as conn:
            in_db = conn.execute(
                select(users_table.c[field]).where(users_table.c.id == uid)
            ).scalar_one()
        cached = json.loads(as_written.cache.get(f"{as_written.PREFIX}:{uid}"))
        older += in_db == values[0] and cached[field] == values[1]
    return OutOfOrder(len(user_ids), older, takers)


def _started_or_moved(queue: rq.Queue) -> list[Job]:
    """Jobs a worker took from the queue (moved to RQ's intermediate list) or started."""
    conn = queue.connection
    ids = [i.decode() for i in conn.lrange(f"{queue.key}:intermediate", 0, -1)]
    ids += StartedJobRegistry(queue=queue).get_job_ids()
    return [j for j in Job.fetch_many(ids, connection=conn, serializer=JSONSerializer) if j]


def last_error(job: Job) -> str:
    """The error RQ recorded for ``job``'s latest run, ``""`` if none."""
    result = job.latest_result()
    return (result.exc_string or "").strip() if result is not None else ""


def wait_drained(queue: rq.Queue, timeout: float = 20.0) -> None:
    """Wait until no job of ``queue`` is queued, taken or running."""

    def drained() -> bool:
        taken = queue.connection.llen(f"{queue.key}:intermediate")
        return queue.count == 0 and taken == 0 and StartedJobRegistry(queue=queue).count == 0

    wait_until(drained, f"queue {queue.name} to drain", timeout)


def _retries_left(job: Job) -> int | None:
    job.refresh()
    return job.retries_left


@dataclass(frozen=True)
class KillResult:
    """What RQ did with a job whose process was ``SIGKILL``-ed mid-job."""

    killed: str  # "work-horse", "worker", or "worker and work-horse"
    status: str
    registries: dict[str, list[str]]
    exc_info: str  # the last line RQ recorded, "" if none
    retries_left: int | None
    in_db: Any
    started_expires_in: float | None  # s until the started registry's entry expires


def kill_mid_job(
    queue: rq.Queue,
    workers: Sequence[RqWorker],
    engine: Engine,
    user_id: int,
    data: dict[str, Any],
    *,
    kill: Literal["horse", "worker", "both"],
    retry: int | None = None,
) -> tuple[Job, KillResult]:
    """Enqueue ``update_db(user_id, data)``, hold it mid-job on a row lock, ``SIGKILL``
    ``kill`` (the work-horse, the worker of ``workers`` that took the job, or both), release
    the lock, and report what RQ did with the job."""
    if kill not in ("horse", "worker", "both"):
        raise ValueError(f"kill must be 'horse', 'worker' or 'both', got {kill!r}")
    options = {"retry": rq.Retry(max=retry)} if retry else {}
    with row_locked(engine, user_id) as waiting:
        job = queue.enqueue(as_written.update_db, user_id, data, **options)
        wait_until(lambda: waiting() == 1, "the job's UPDATE to wait on the row lock")
        job.refresh()
        worker = next(w for w in workers if w.name == job.worker_name)
        horse = worker.horse_pid()
        if horse is None:
            raise RuntimeError(f"worker {worker.name} runs the job but has no work-horse")
        if kill in ("worker", "both"):
            worker.kill()
        if kill in ("horse", "both"):
            # Its backend keeps waiting on the lock; once released, it finds the client gone
            # and rolls back: the update never commits.
            os.kill(horse, signal.SIGKILL)
        if kill == "horse" and retry:
            wait_until(lambda: _retries_left(job) == retry - 1, "RQ to requeue the job")
        elif kill == "horse":
            wait_for(job, JobStatus.FAILED)
    if kill == "worker" or (kill == "horse" and retry):
        wait_for(job, JobStatus.FINISHED, JobStatus.FAILED)
    status = job.get_status(refresh=True)
    job.refresh()
    exc = last_error(job).splitlines()
    started = StartedJobRegistry(queue=queue)
    expiry = [score for _, score in queue.connection.zrange(started.key, 0, -1, withscores=True)]
    with engine.connect() as conn:
        col = next(iter(data))
        in_db = conn.execute(
            select(users_table.c[col]).where(users_table.c.id == user_id)
        ).scalar_one()
    names = {"horse": "work-horse", "worker": "worker", "both": "worker and work-horse"}
    return job, KillResult(
        names[kill],
        status.value,
        registries(queue, {job.id: "this job"}),
        exc[-1] if exc else "",
        job.retries_left,
        in_db,
        max(expiry) - time.time() if expiry else None,
    )
