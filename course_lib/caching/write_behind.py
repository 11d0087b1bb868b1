"""Write-behind: a write updates the cache and is queued; a worker writes the database later.

The queue is a Redis Stream read through a consumer group, not an in-process queue, so a
write survives the death of the process that made it and of the worker applying it.

Guarantees:

- :meth:`WriteBehind.write` sets the cache and appends to the stream in one Lua script
  (``write_behind.lua``): both happen or neither.
- The worker acknowledges entries only after the database committed them (``XACK`` after
  ``save``), then deletes them, so the stream length is the backlog not yet in the database.
- Writes are idempotent and ordered: each entry's stream id becomes the row's ``version`` and
  the store applies it only over an older version (see :mod:`course_lib.caching.store`).
  Replays after a crash change nothing and an old entry never overwrites a newer one.
- Entries a dead worker had read but not acknowledged are reclaimed with ``XAUTOCLAIM`` once
  idle for ``claim_idle`` seconds, by any worker of the group: nothing is lost.
- Several updates of one key in a batch are coalesced into one database write (the last).

Not guaranteed: the database lags the cache (:meth:`WriteBehind.lag`), and a write is lost if
Redis itself loses it (no persistence, failover before replication).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from redis.exceptions import ResponseError

from ._base import _positive
from .scripts import register
from .serialization import dumps, loads
from .store import Store

__all__ = ["BatchResult", "Worker", "WriteBehind", "entry_version"]


def _text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


def entry_version(entry_id: bytes | str) -> int:
    """A stream id ``<ms>-<seq>`` as one increasing integer: ``ms * 2**20 + seq``."""
    ms, seq = _text(entry_id).split("-")
    return (int(ms) << 20) + int(seq)


@dataclass(frozen=True)
class BatchResult:
    """What one call of :meth:`WriteBehind.process` did."""

    entries: int
    reclaimed: int
    db_writes: int
    skipped: int

    @property
    def coalesced(self) -> int:
        return self.entries - self.db_writes - self.skipped


class WriteBehind:
    """``WriteBehind(redis, store, stream="wb:users", group="db-writers")``."""

    def __init__(
        self,
        redis: Any,
        store: Store,
        *,
        stream: str,
        group: str,
        namespace: str | None = None,
        ttl: float = 3600.0,
        batch: int = 100,
        claim_idle: float = 5.0,
    ) -> None:
        for name, value in (("stream", stream), ("group", group)):
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{name} must be a non-empty string, got {value!r}")
        if namespace is not None and (not isinstance(namespace, str) or not namespace.strip()):
            raise ValueError(f"namespace must be a non-empty string or None, got {namespace!r}")
        if not isinstance(store, Store):
            raise TypeError(f"store must have load(key) and save(key, value), got {store!r}")
        if isinstance(batch, bool) or not isinstance(batch, int) or batch <= 0:
            raise ValueError(f"batch must be a positive int, got {batch!r}")
        self.redis = redis
        self.store = store
        self.stream = stream
        self.group = group
        self.namespace = namespace or stream
        self.ttl = _positive("ttl", ttl)
        self.claim_idle = _positive("claim_idle", claim_idle)
        self.batch = batch
        self.stats_key = f"{stream}#stats"
        self._write = register(redis, "write_behind")["write_behind"]
        self.ensure_group()

    def ensure_group(self) -> None:
        """Create the stream and consumer group if missing (from the stream's first entry)."""
        try:
            self.redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def key(self, key: Any) -> str:
        return f"{self.namespace}:{key}"

    def write(self, key: Any, value: Mapping[str, Any]) -> str:
        """Cache ``value`` (the whole record) and queue it for the store; the entry id."""
        if not isinstance(value, Mapping):
            raise TypeError(f"value must be a mapping, got {type(value).__name__}")
        entry = self._write(
            keys=[self.key(key), self.stream],
            args=[str(key), dumps(dict(value)), int(self.ttl * 1000)],
        )
        return _text(entry)

    def read(self, key: Any) -> Any:
        """The cached record, else the stored one (which may lag, see :meth:`lag`)."""
        raw = self.redis.get(self.key(key))
        return loads(raw) if raw is not None else self.store.load(key)

    def backlog(self) -> int:
        """Writes not yet committed to the store (acknowledged entries are deleted)."""
        return int(self.redis.xlen(self.stream))

    def lag(self) -> float:
        """Age in seconds of the oldest write not yet in the store; 0 if none."""
        oldest = self.redis.xrange(self.stream, count=1)
        if not oldest:
            return 0.0
        ms = int(_text(oldest[0][0]).split("-")[0])
        return max(0.0, time.time() - ms / 1000)

    def worker_stats(self) -> dict[str, int]:
        """Totals over every worker of this stream: entries, reclaimed, db_writes, skipped."""
        raw = self.redis.hgetall(self.stats_key)
        totals = dict.fromkeys(("entries", "reclaimed", "db_writes", "skipped"), 0)
        totals.update({_text(k): int(v) for k, v in raw.items()})
        return totals

    def process(self, consumer: str, *, block: float = 0.0) -> BatchResult:
        """One batch: reclaim stale pending entries, read new ones, coalesce, save, ack."""
        claimed = self.redis.xautoclaim(
            self.stream,
            self.group,
            consumer,
            min_idle_time=int(self.claim_idle * 1000),
            start_id="0-0",
            count=self.batch,
        )[1]
        # Redis 6.2 returns entries deleted meanwhile without fields: acknowledge, skip them.
        vanished = [entry_id for entry_id, fields in claimed if not fields]
        claimed = [(entry_id, fields) for entry_id, fields in claimed if fields]
        room = self.batch - len(claimed)
        fresh: list[tuple[bytes, dict[bytes, bytes]]] = []
        if room > 0:
            reply = self.redis.xreadgroup(
                self.group,
                consumer,
                {self.stream: ">"},
                count=room,
                block=int(block * 1000) if block > 0 and not claimed else None,
            )
            fresh = reply[0][1] if reply else []
        entries = claimed + fresh
        if vanished:
            self.redis.xack(self.stream, self.group, *vanished)
        if not entries:
            return BatchResult(0, 0, 0, 0)
        latest: dict[str, tuple[int, dict[str, Any]]] = {}
        for entry_id, fields in entries:
            key = _text(fields[b"key"])
            version = entry_version(entry_id)
            if key not in latest or latest[key][0] < version:
                latest[key] = (version, loads(fields[b"value"]))
        written = skipped = 0
        for key, (version, value) in latest.items():
            if self.store.save(key, {**value, "version": version}) is None:
                skipped += 1
            else:
                written += 1
        ids = [entry_id for entry_id, _ in entries]
        pipe = self.redis.pipeline(transaction=True)
        pipe.xack(self.stream, self.group, *ids)
        pipe.xdel(self.stream, *ids)
        pipe.hincrby(self.stats_key, "entries", len(entries))
        pipe.hincrby(self.stats_key, "reclaimed", len(claimed))
        pipe.hincrby(self.stats_key, "db_writes", written)
        pipe.hincrby(self.stats_key, "skipped", skipped)
        pipe.execute()
        return BatchResult(len(entries), len(claimed), written, skipped)

    def run(self, consumer: str, stop: threading.Event, *, block: float = 0.1) -> None:
        """Process batches until ``stop`` is set; the batch in hand is always finished."""
        while not stop.is_set():
            self.process(consumer, block=block)

    def drain(self, consumer: str, *, timeout: float = 30.0) -> int:
        """Process in this thread until the backlog is empty; entries processed."""
        deadline = time.monotonic() + timeout
        total = 0
        while self.backlog():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.backlog()} writes still queued after {timeout} s")
            result = self.process(consumer)
            total += result.entries
            if not result.entries:
                time.sleep(0.05)  # only entries pending on another consumer remain
        return total

    def start_worker(self, consumer: str = "worker-1", *, block: float = 0.1) -> Worker:
        """Start a worker in a child process (forked); stop it, or kill it to simulate a crash."""
        return Worker(self, consumer, block=block).start()


def _worker_main(wb: WriteBehind, consumer: str, block: float) -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    wb.run(consumer, stop, block=block)


class Worker:
    """A write-behind worker in its own OS process (forked, so it inherits the settings)."""

    def __init__(self, wb: WriteBehind, consumer: str, *, block: float = 0.1) -> None:
        self.wb = wb
        self.consumer = consumer
        self.block = block
        self.process: multiprocessing.process.BaseProcess | None = None

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def is_alive(self) -> bool:
        return self.process is not None and self.process.is_alive()

    def start(self) -> Worker:
        if self.is_alive():
            raise RuntimeError(f"worker {self.consumer!r} is already running")
        ctx = multiprocessing.get_context("fork")
        self.process = ctx.Process(
            target=_worker_main, args=(self.wb, self.consumer, self.block), daemon=True
        )
        self.process.start()
        return self

    def stop(self, timeout: float = 10.0) -> int | None:
        """Ask the worker to finish its batch and exit (SIGTERM); its exit code."""
        if self.process is None:
            return None
        if self.process.is_alive():
            os.kill(self.process.pid, signal.SIGTERM)  # type: ignore[arg-type]
            self.process.join(timeout)
            if self.process.is_alive():
                self.process.kill()
                self.process.join()
        return self.process.exitcode

    def kill(self) -> int | None:
        """Crash the worker: SIGKILL, no cleanup, batch in hand left unacknowledged."""
        if self.process is None:
            return None
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.process.pid, signal.SIGKILL)  # type: ignore[arg-type]
        self.process.join()
        return self.process.exitcode

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
