"""Bookkeeping for notebook 06: start the whole service, flip its switches, inject faults.

``with stack(processes=2) as s:`` starts, and on exit stops (also when the block raises):

- a real PostgreSQL primary with a streaming replica (:class:`course_lib.db.ReplicaSet`),
  filled with :func:`course_lib.db.populate` and the ``posts.user_id`` index of notebook 04;
- a Redis of its own (:class:`course_lib.services.EmbeddedRedis` in a private folder, on a
  Unix socket), never the shared one, so stopping it hurts nobody else; a reaper process
  (:mod:`.reaper`) stops it if this program is killed outright;
- ``processes`` app processes (:func:`course_lib.http.serve_processes`, killable with a real
  ``SIGKILL``), each serving :func:`.app.make_app`.

The balancing, the load and the faults stay in the notebook's cells; this module only
starts and stops things and talks to the app's admin routes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import psutil

from course_lib.db import add_post_user_index, populate
from course_lib.db.lesson.replicas import ReplicaSet
from course_lib.http import ServerProcess, serve_processes
from course_lib.services import EmbeddedRedis, fail_fast_redis

from .app import Config
from .load import NOISY
from .reaper import start_reaper

__all__ = ["API_KEYS", "FACTORY", "POSTS_PER_USER", "USERS", "Stack", "stack"]

FACTORY = "course_lib.capstone.lesson.app:make_app"
USERS = 1000
POSTS_PER_USER = 5
API_KEYS = [*(f"c{i}" for i in range(16)), NOISY]


def _post(url: str, body: dict, timeout: float = 5.0) -> dict:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


class Stack:
    """The running service: ``rs`` (primary + replica), ``redis`` (its own server),
    ``procs`` (the app processes, in order) and what the cells need to drive them."""

    def __init__(
        self,
        rs: ReplicaSet,
        redis: EmbeddedRedis,
        procs: list[ServerProcess],
        kwargs: dict,
        exits: contextlib.ExitStack,
    ) -> None:
        self.rs = rs
        self.redis = redis
        self.procs = procs
        self.users = kwargs["users"]
        self._kwargs = kwargs
        self._exits = exits

    def warm_up(self, requests: int = 5) -> None:
        """A few feed reads on every live process with every switch on (not measured): each
        opens its database and Redis connections and loads its Lua scripts before a step
        measures it. The switches are left as they were; the cache is emptied again."""
        for proc in self.procs:
            if not proc.alive:
                continue
            _post(
                f"{proc.url}/_config",
                asdict(Config(eager=True, cache=True, replica=True, limit=True)),
            )
            for user in range(1, requests + 1):
                # a 429 warms up as well (the limiter's script is loaded)
                with contextlib.suppress(urllib.error.HTTPError):
                    url = f"{proc.url}/users/{user}/feed"
                    with urllib.request.urlopen(url, timeout=10) as reply:
                        reply.read()
            _post(f"{proc.url}/_config", self._kwargs["config"])
        client = fail_fast_redis(self.redis.url, timeout=2)
        try:
            client.flushdb()  # our own server: nothing else lives in it
        finally:
            client.close()

    def kill(self, index: int) -> None:
        """``SIGKILL`` app process ``index`` (no clean-up of any kind runs in it)."""
        self.procs[index].kill()

    def revive(self, config: Config) -> list[int]:
        """Restart every app process that is not running (see :meth:`restart`); return
        their indexes."""
        dead = [index for index, proc in enumerate(self.procs) if not proc.alive]
        for index in dead:
            self.restart(index, config)
        return dead

    def restart(self, index: int, config: Config) -> None:
        """Start a new process in place of ``index`` (a supervisor's job: systemd, Kubernetes)
        with ``config``; it listens on a new port. Stopped with the stack."""
        kwargs = {**self._kwargs, "config": asdict(config)}
        (proc,) = self._exits.enter_context(serve_processes(FACTORY, [kwargs], startup_timeout=60))
        self.procs[index] = proc

    @property
    def urls(self) -> dict[str, str]:
        """{name: URL} of every app process, ``app0``, ``app1``, ..."""
        return {f"app{i}": proc.url for i, proc in enumerate(self.procs)}

    def configure(self, config: Config) -> None:
        """Set the switches of every live app process."""
        for proc in self.procs:
            if proc.alive:
                _post(f"{proc.url}/_config", asdict(config))

    def stop_redis(self) -> None:
        """``SIGKILL`` the Redis server (a crash: it stops at once, nothing is saved) and wait
        until it is dead: gone, or a zombie, which has closed its sockets already. (Waiting
        for it to be gone would wait for its parent, the init process, to reap it: on a busy
        machine that took 1.9 s, during which Redis was dead all along.)"""
        pid = int(self.redis.pidfile.read_text())
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while not _dead(pid):
            if time.monotonic() > deadline:
                raise TimeoutError(f"Redis (pid {pid}) still running 10 s after SIGKILL")
            time.sleep(0.005)

    def start_redis(self) -> None:
        """A fresh, empty Redis on the same socket (nothing persisted: a cold cache); the
        stale socket and pid file of a killed one are cleared first."""
        self.redis.start()


def _dead(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@contextlib.contextmanager
def stack(
    *, processes: int = 2, users: int = USERS, config: Config | None = None
) -> Iterator[Stack]:
    """Start everything (see the module); stop everything on exit."""
    root = Path(tempfile.mkdtemp(prefix="pc-cap-"))
    redis = EmbeddedRedis(root)
    reaper = start_reaper(redis.pidfile, root)
    try:
        with ReplicaSet.start() as rs:
            engine = rs.engine("primary")
            populate(engine, users=users, posts_per_user=POSTS_PER_USER, seed=6)
            add_post_user_index(engine)
            rs.wait_for_replay()
            url = redis.start()
            kwargs = {
                "primary_url": rs.primary_url,
                "replica_url": rs.replica_url,
                "redis_url": url,
                "users": users,
                "processes": processes,
                "api_keys": API_KEYS,
                "config": asdict(config or Config()),
            }
            with contextlib.ExitStack() as exits:
                procs = exits.enter_context(
                    serve_processes(FACTORY, [kwargs] * processes, startup_timeout=60)
                )
                running = Stack(rs, redis, procs, kwargs, exits)
                running.warm_up()
                yield running
    finally:
        reaper.kill()
        reaper.wait()
        redis.stop()
        shutil.rmtree(root, ignore_errors=True)


def wait_until_idle(url: str, *, timeout: float = 20.0) -> float:
    """Wait until ``url``'s admin route answers within 50 ms (the backlog of a step that
    overloaded the process has drained); return the seconds waited."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        t0 = time.perf_counter()
        with urllib.request.urlopen(f"{url}/_stats", timeout=timeout) as response:
            response.read()
        if time.perf_counter() - t0 < 0.05:
            break
    return time.monotonic() - start
