"""Write-behind: a write updates the cache and is queued; a worker writes the database later.

The queue is a Redis Stream read through a consumer group, not an in-process queue, so a
write survives the death of the process that made it and of the worker applying it.

One class per job, as RQ splits its ``Queue`` from its ``Worker``:

- :class:`WriteBehindProducer` (``write``, ``read``): in the web process; its asyncio twin
  is :class:`course_lib.caching.aio.AsyncWriteBehindProducer`.
- :class:`WriteBehindConsumer` (``process`` one batch, ``run`` batches until stopped,
  ``drain``): in the worker.
- :class:`WriteBehindMonitor` (``backlog``, ``lag``, ``worker_stats``): anywhere.
- :class:`WorkerProcess`: a consumer in a child process of its own, to start, stop or kill.
- :class:`WriteBehind`: all of them on one stream, for a script or a notebook that plays
  every part.

What they share without I/O (key names, the entry format, a batch's bookkeeping) is in
:mod:`course_lib.caching.core.write_behind`. No constructor does I/O.

Guarantees:

- ``write`` takes the changed columns, checked against the store at once (the store's
  ``validate``; :class:`~course_lib.caching.store.UserStore` checks names, types,
  ``NOT NULL`` and integer ranges): a value the database would refuse raises ``ValueError``
  there, before it is merged into the record, so it cannot poison the valid writes merged
  after it. One Lua script (``write_behind.lua``) merges them into the cached record, which
  always holds the whole row, and appends that whole record to the stream: both happen or
  neither, and two writers of different columns of one row both keep their change.
- The consumer acknowledges entries only after the database committed them (``XACK`` after
  ``save``), then deletes them, so the stream length is the backlog not yet in the database.
- Writes are idempotent and ordered: each entry's stream id becomes the row's ``version`` and
  the store applies it only over an older version (see :mod:`course_lib.caching.store`).
  Replays after a crash change nothing and an old entry never overwrites a newer one.
- Entries a dead worker had read but not acknowledged are reclaimed with ``XAUTOCLAIM`` once
  idle for ``claim_idle`` seconds, by any consumer of the group: nothing is lost.
- Several updates of one key in a batch are coalesced into one database write (the last
  entry carries the whole record).
- Errors never end :meth:`WriteBehindConsumer.run`: while the database or Redis is
  unavailable it logs and backs off, leaving the entries pending; an entry the store keeps
  refusing is moved to the dead-letter stream on its ``max_deliveries``-th delivery (with the
  error), and its cached record is dropped so reads fall back to the database.
- A cached record keeps no TTL while a write of it is queued, so it cannot expire and be
  rebuilt from a database that lacks that write; it gets ``ttl`` once its latest write landed.

Not guaranteed: the database lags the cache (:meth:`WriteBehindMonitor.lag`), and a write is
lost if Redis itself loses it (no persistence, failover before replication, or eviction
under an ``allkeys-*`` policy).

Redis Cluster: ``redis`` may be a ``redis.cluster.RedisCluster``. All of one stream's keys
carry the stream's name as hash tag and live in one slot, so on one primary (see
:class:`~course_lib.caching.core.write_behind.StreamKeys`): to spread write-behind over a
cluster, run one stream per slot.

Failover: replication is asynchronous. ``write`` returns once the primary ran the script;
if that primary dies before its replica received it (on loopback the replica trails by a
write or two), the promoted replica has neither the entry nor the merged
record, and the write is lost although acknowledged: at most the writes of the last
moments before the crash (the replica's lag). ``replicas=N`` closes that window for a
primary that dies after acknowledging: ``write`` then sends ``WAIT N`` on the same
connection and raises :class:`NotReplicated` (the write may or may not survive a failover)
unless ``N`` replicas have it within ``replica_timeout`` (keep it below the client's
``socket_timeout``, or the client gives up on the reply first). So a primary left without
replicas (after its replica was promoted) refuses to confirm: ``write`` raises until a
replica is attached again. Redis is still not a consensus store: a replica that had the
write and is not the one promoted can still lose it.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Mapping
from typing import Any

from redis.exceptions import ResponseError

from course_lib import lua
from course_lib.orphans import watch_parent
from course_lib.validation import (
    instance_of,
    positive_int,
    positive_number,
    text,
    whole_milliseconds,
)

from ._base import describe
from .core.write_behind import (
    Batch,
    BatchResult,
    Entry,
    NotReplicated,
    ProducerCore,
    RawEntry,
    StreamKeys,
    check_replicas,
    database_unavailable,
    decode_record,
    entry_version,
    group_exists,
    lag_seconds,
    missing_group,
    reply_text,
    split_claimed,
    stored_record,
    totals,
    write_args,
)
from .store import Store

__all__ = [
    "BatchResult",
    "NotReplicated",
    "WorkerProcess",
    "WriteBehind",
    "WriteBehindConsumer",
    "WriteBehindMonitor",
    "WriteBehindProducer",
    "declare_group",
]

log = logging.getLogger("course_lib.caching")


def declare_group(redis: Any, stream: str, group: str) -> None:
    """Create ``stream`` and its consumer ``group`` if missing; the group starts at the
    stream's first entry, so it is handed every entry written before it existed."""
    try:
        redis.xgroup_create(stream, group, id="0", mkstream=True)
    except ResponseError as exc:
        if not group_exists(exc):
            raise


class WriteBehindProducer(ProducerCore):
    """``WriteBehindProducer(redis, store, stream="wb:users", group="db-writers")``: queues
    writes and reads the cached records; see the module docstring for the guarantees."""

    def write(self, key: Any, value: Mapping[str, Any]) -> str:
        """Merge the changed columns ``value`` into the cached record and queue the whole
        record for the store; the entry id. Unknown columns raise ``ValueError`` here.

        A row not cached yet is read from the store first (so that the record is whole):
        that one read needs the database, and raises if it is unavailable. With
        ``replicas``, raises :class:`NotReplicated` if fewer confirmed it in time.
        """
        keys, fields = self.prepare(key, value)
        if not self.declared:
            declare_group(self.redis, self.keys.stream, self.group)
            self.declared = True
        entry = self._queue(keys, write_args(key, fields))
        if entry is None:  # not cached: start the record from the stored row
            entry = self._queue(keys, write_args(key, fields, self.store.load(key) or {}))
        return reply_text(entry)

    def _queue(self, keys: list[str], args: list[Any]) -> Any:
        """Run the write script; with ``replicas``, ``WAIT`` for them on the same connection."""
        if not self.replicas:
            return self.script(self.redis, keys, args)
        pipe = self.redis.pipeline(transaction=False)
        self.queue_replicated(pipe, keys, args)
        return check_replicas(*pipe.execute(), self.replicas)

    def read(self, key: Any) -> dict[str, Any] | None:
        """The cached record, else the stored one without its ``version`` (which may lag the
        cache, see :meth:`WriteBehindMonitor.lag`); ``None`` if neither has it."""
        raw = self.redis.hgetall(self.keys.record(key))
        return decode_record(raw) if raw else stored_record(self.store.load(key))


class WriteBehindConsumer:
    """``WriteBehindConsumer(redis, store, stream="wb:users", group="db-writers")``: applies
    queued writes to the store, a batch at a time. ``name`` in its methods is the consumer's
    name in the group: what it reads stays pending on that name until acknowledged."""

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
        max_deliveries: int = 5,
    ) -> None:
        self.redis = redis
        self.store: Store = instance_of("store", store, Store, "a Store (load and save)")
        self.keys = StreamKeys(stream, namespace)
        self.group = text("group", group)
        self.ttl_ms = whole_milliseconds("ttl", ttl)
        self.batch = positive_int("batch", batch)
        self.claim_idle = positive_number("claim_idle", claim_idle)
        self.max_deliveries = positive_int("max_deliveries", max_deliveries)
        self._settle = lua.load(__package__, "settle")

    def process(self, name: str, *, block: float = 0.0) -> BatchResult:
        """One batch: reclaim stale pending entries, read new ones, coalesce, save, ack.

        Raises if the database or Redis is unavailable (nothing of the batch is acked; the
        entries are retried); an entry the store refuses is kept pending, or dead-lettered
        on its ``max_deliveries``-th delivery.
        """
        claimed = self._reclaim(name)
        fresh = self._read_new(name, self.batch - len(claimed), block=0.0 if claimed else block)
        batch = Batch(claimed, fresh)
        if not batch.entries:
            return batch.result()
        for key, entries in batch.by_key.items():
            batch.saved(key, self._save(key, entries))
        if batch.refused:
            self._dead_letter(name, batch)
        self._finish(batch)
        return batch.result()

    def _reclaim(self, name: str) -> list[RawEntry]:
        """Entries idle for ``claim_idle`` on any consumer, now ours. Ids whose entries were
        deleted from the stream meanwhile are acknowledged: nothing is left to apply."""
        try:
            reply = self.redis.xautoclaim(
                self.keys.stream,
                self.group,
                name,
                min_idle_time=int(self.claim_idle * 1000),
                start_id="0-0",
                count=self.batch,
            )[1]
        except ResponseError as exc:
            if not missing_group(exc):
                raise
            declare_group(self.redis, self.keys.stream, self.group)
            return []  # a group just created has nothing pending
        claimed, vanished, unnamed = split_claimed(reply)
        if unnamed:
            vanished += self._vanished(name, {entry_id for entry_id, _ in claimed})
        if vanished:
            self.redis.xack(self.keys.stream, self.group, *vanished)
        return claimed

    def _vanished(self, name: str, known: set[bytes]) -> list[bytes]:
        """Ids pending on ``name`` whose entries were deleted from the stream (Redis 6.2's
        ``XAUTOCLAIM`` returns them without their ids)."""
        pending = self.redis.xpending_range(
            self.keys.stream, self.group, min="-", max="+", count=10 * self.batch, consumername=name
        )
        ids = [p["message_id"] for p in pending if p["message_id"] not in known]
        pipe = self.redis.pipeline(transaction=False)
        for entry_id in ids:
            pipe.xrange(self.keys.stream, min=entry_id, max=entry_id, count=1)
        return [entry_id for entry_id, found in zip(ids, pipe.execute(), strict=True) if not found]

    def _read_new(self, name: str, room: int, *, block: float) -> list[RawEntry]:
        """Up to ``room`` entries never delivered, waiting up to ``block`` s for the first."""
        if room <= 0:
            return []
        reply = self.redis.xreadgroup(
            self.group,
            name,
            {self.keys.stream: ">"},
            count=room,
            block=int(block * 1000) if block > 0 else None,
        )
        return reply[0][1] if reply else []

    def _save(self, key: str, entries: list[Entry]) -> dict[bytes, bool | str]:
        """Save ``key``'s last entry, which carries the whole record (the others are
        coalesced into it); if the store refuses it, save them one by one to find which it
        refuses and keep the others. What became of each entry tried (see
        :meth:`~course_lib.caching.core.write_behind.Batch.saved`)."""
        last = entries[-1]
        outcome = self._save_entry(key, last)
        if isinstance(outcome, str):
            return {entry.id: self._save_entry(key, entry) for entry in entries}
        return {last.id: outcome}

    def _save_entry(self, key: str, entry: Entry) -> bool | str:
        """Whether the store changed the row (``False``: it has this version or newer), or
        why it refused the entry. Raises if the database itself is unavailable."""
        try:
            return self.store.save(key, entry.row()) is not None
        except Exception as exc:
            if database_unavailable(exc):
                raise
            return describe(exc)

    def _dead_letter(self, name: str, batch: Batch) -> None:
        """Move refused entries delivered ``max_deliveries`` times to the dead-letter stream."""
        ids = sorted(batch.refused, key=entry_version)
        pending = self.redis.xpending_range(
            self.keys.stream,
            self.group,
            min=ids[0],
            max=ids[-1],
            count=10 * self.batch,
            consumername=name,
        )
        deliveries = {p["message_id"]: p["times_delivered"] for p in pending}
        for entry_id in batch.due_for_dead_letter(deliveries, self.max_deliveries):
            fields = batch.dead_letter_entry(entry_id, deliveries[entry_id])
            self.redis.xadd(self.keys.dead_letter, fields)
            batch.dead_lettered(entry_id)
            log.error(
                "write-behind entry %s of %r dead-lettered to %r after %d deliveries: %s",
                reply_text(entry_id),
                batch.dead[entry_id],
                self.keys.dead_letter,
                deliveries[entry_id],
                batch.refused[entry_id],
            )

    def _finish(self, batch: Batch) -> None:
        """In one transaction: acknowledge and delete what is done, settle the records,
        add to the counters."""
        pipe = self.redis.pipeline(transaction=True)
        done = batch.acknowledged()
        if done:
            pipe.xack(self.keys.stream, self.group, *done)
            pipe.xdel(self.keys.stream, *done)
        for keys, args in batch.settle_calls(self.keys, self.ttl_ms):
            self._settle.queue(pipe, keys, args)
        for name, value in batch.counts().items():
            pipe.hincrby(self.keys.stats, name, value)
        pipe.execute()

    def run(
        self, name: str, stop: threading.Event, *, block: float = 0.1, max_pause: float = 2.0
    ) -> None:
        """Process batches until ``stop`` is set; the batch in hand is always finished.

        No error ends it: it logs the first error of a streak, then retries with a pause
        doubling from 50 ms to ``max_pause`` (the database or Redis is away; their entries
        stay pending and are reclaimed), and logs when a batch succeeds again.
        """
        pause = 0.0
        while not stop.is_set():
            try:
                self.process(name, block=block)
            except Exception as exc:
                if not pause:
                    log.warning("write-behind worker %r: %s; retrying", name, describe(exc))
                pause = min(max(pause * 2, 0.05), max_pause)
                stop.wait(pause)
                continue
            if pause:
                log.warning("write-behind worker %r: writing again", name)
                pause = 0.0

    def drain(self, name: str, *, timeout: float = 30.0) -> int:
        """Process in this thread until the backlog is empty; entries processed."""
        deadline = time.monotonic() + timeout
        total = 0
        while backlog := self.redis.xlen(self.keys.stream):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{backlog} writes still queued after {timeout} s")
            result = self.process(name)
            total += result.entries
            if not result.entries:
                time.sleep(0.05)  # only entries pending on another consumer remain
        return total


class WriteBehindMonitor:
    """``WriteBehindMonitor(redis, stream="wb:users")``: how far the database lags."""

    def __init__(self, redis: Any, *, stream: str, namespace: str | None = None) -> None:
        self.redis = redis
        self.keys = StreamKeys(stream, namespace)

    def backlog(self) -> int:
        """Writes not yet committed to the store (acknowledged entries are deleted)."""
        return int(self.redis.xlen(self.keys.stream))

    def lag(self) -> float:
        """Age in seconds of the oldest write not yet in the store; 0 if none."""
        return lag_seconds(self.redis.xrange(self.keys.stream, count=1))

    def worker_stats(self) -> dict[str, int]:
        """Totals over every consumer of this stream: entries, reclaimed, db_writes, skipped,
        failed, dead_lettered."""
        return totals(self.redis.hgetall(self.keys.stats))


def _worker_main(consumer: WriteBehindConsumer, name: str, block: float, parent: int) -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    # A parent killed outright leaves no one to stop this worker (``parent`` is its pid from
    # before the fork, so a parent that died while this process started counts too).
    watch_parent(stop.set, parent=parent)
    consumer.run(name, stop, block=block)


class WorkerProcess:
    """A consumer running as ``name`` in its own OS process (forked, so it inherits the
    consumer's settings and opens its own connections)."""

    def __init__(self, consumer: WriteBehindConsumer, name: str, *, block: float = 0.1) -> None:
        self.consumer = consumer
        self.name = text("name", name)
        self.block = positive_number("block", block)
        self._child: multiprocessing.process.BaseProcess | None = None

    @property
    def pid(self) -> int | None:
        return None if self._child is None else self._child.pid

    def is_alive(self) -> bool:
        return self._child is not None and self._child.is_alive()

    def start(self) -> WorkerProcess:
        if self.is_alive():
            raise RuntimeError(f"worker {self.name!r} is already running")
        ctx = multiprocessing.get_context("fork")
        args = (self.consumer, self.name, self.block, os.getpid())
        self._child = ctx.Process(target=_worker_main, args=args, daemon=True)
        self._child.start()
        return self

    def stop(self, timeout: float = 10.0) -> int | None:
        """Ask the worker to finish its batch and exit (SIGTERM); its exit code."""
        if self._child is None:
            return None
        if self._child.is_alive():
            os.kill(self._child.pid, signal.SIGTERM)  # type: ignore[arg-type]
            self._child.join(timeout)
            if self._child.is_alive():
                self._child.kill()
                self._child.join()
        return self._child.exitcode

    def kill(self) -> int | None:
        """Crash the worker: SIGKILL, no cleanup, batch in hand left unacknowledged."""
        if self._child is None:
            return None
        with contextlib.suppress(ProcessLookupError):
            os.kill(self._child.pid, signal.SIGKILL)  # type: ignore[arg-type]
        self._child.join()
        return self._child.exitcode

    def __enter__(self) -> WorkerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class WriteBehind:
    """``WriteBehind(redis, store, stream="wb:users", group="db-writers")``: a producer, a
    consumer and a monitor of one stream, for code that plays every part (a notebook, a
    test, a script). Each method is its part's; a service builds the part it needs.

    Arguments are those of :class:`WriteBehindProducer` and :class:`WriteBehindConsumer`.
    """

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
        max_deliveries: int = 5,
        replicas: int = 0,
        replica_timeout: float = 1.0,
    ) -> None:
        where = {"stream": stream, "group": group, "namespace": namespace}
        self.producer = WriteBehindProducer(
            redis, store, **where, replicas=replicas, replica_timeout=replica_timeout
        )
        self.consumer = WriteBehindConsumer(
            redis,
            store,
            **where,
            ttl=ttl,
            batch=batch,
            claim_idle=claim_idle,
            max_deliveries=max_deliveries,
        )
        self.monitor = WriteBehindMonitor(redis, stream=stream, namespace=namespace)
        self.redis = redis
        self.keys = self.producer.keys

    # The names the notebook and the lessons use.
    @property
    def stream(self) -> str:
        return self.keys.stream

    @property
    def group(self) -> str:
        return self.producer.group

    @property
    def dead_letter(self) -> str:
        return self.keys.dead_letter

    @property
    def stats_key(self) -> str:
        return self.keys.stats

    @property
    def claim_idle(self) -> float:
        return self.consumer.claim_idle

    def key(self, key: Any) -> str:
        """The Redis key of ``key``'s cached record."""
        return self.keys.record(key)

    def write(self, key: Any, value: Mapping[str, Any]) -> str:
        """:meth:`WriteBehindProducer.write`."""
        return self.producer.write(key, value)

    def read(self, key: Any) -> dict[str, Any] | None:
        """:meth:`WriteBehindProducer.read`."""
        return self.producer.read(key)

    def process(self, name: str, *, block: float = 0.0) -> BatchResult:
        """:meth:`WriteBehindConsumer.process`."""
        return self.consumer.process(name, block=block)

    def run(self, name: str, stop: threading.Event, *, block: float = 0.1) -> None:
        """:meth:`WriteBehindConsumer.run`."""
        self.consumer.run(name, stop, block=block)

    def drain(self, name: str, *, timeout: float = 30.0) -> int:
        """:meth:`WriteBehindConsumer.drain`."""
        return self.consumer.drain(name, timeout=timeout)

    def start_worker(self, name: str = "worker-1", *, block: float = 0.1) -> WorkerProcess:
        """A :class:`WorkerProcess` of this consumer, started; stop it, or kill it to
        simulate a crash."""
        return WorkerProcess(self.consumer, name, block=block).start()

    def backlog(self) -> int:
        """:meth:`WriteBehindMonitor.backlog`."""
        return self.monitor.backlog()

    def lag(self) -> float:
        """:meth:`WriteBehindMonitor.lag`."""
        return self.monitor.lag()

    def worker_stats(self) -> dict[str, int]:
        """:meth:`WriteBehindMonitor.worker_stats`."""
        return self.monitor.worker_stats()
