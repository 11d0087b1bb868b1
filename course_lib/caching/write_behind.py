"""Write-behind: a write updates the cache and is queued; a worker writes the database later.

The queue is a Redis Stream read through a consumer group, not an in-process queue, so a
write survives the death of the process that made it and of the worker applying it.

Guarantees:

- :meth:`WriteBehind.write` takes the changed columns, checked against the store at once
  (the store's ``validate``; :class:`~course_lib.caching.store.UserStore` checks names,
  types, ``NOT NULL`` and integer ranges): a value the database would refuse raises
  ``ValueError`` there, before it is merged into the record, so it cannot poison the valid
  writes merged after it. One Lua script
  (``write_behind.lua``) merges them into the cached record, which always holds the whole
  row, and appends that whole record to the stream: both happen or neither, and two writers
  of different columns of one row both keep their change.
- The worker acknowledges entries only after the database committed them (``XACK`` after
  ``save``), then deletes them, so the stream length is the backlog not yet in the database.
- Writes are idempotent and ordered: each entry's stream id becomes the row's ``version`` and
  the store applies it only over an older version (see :mod:`course_lib.caching.store`).
  Replays after a crash change nothing and an old entry never overwrites a newer one.
- Entries a dead worker had read but not acknowledged are reclaimed with ``XAUTOCLAIM`` once
  idle for ``claim_idle`` seconds, by any worker of the group: nothing is lost.
- Several updates of one key in a batch are coalesced into one database write (the last
  entry carries the whole record).
- Errors never end :meth:`WriteBehind.run`: while the database or Redis is unavailable it
  logs and backs off, leaving the entries pending; an entry the store keeps refusing is moved
  to the dead-letter stream ``<stream>:dead`` on its ``max_deliveries``-th delivery (with the
  error), and its cached record is dropped so reads fall back to the database.
- A cached record keeps no TTL while a write of it is queued, so it cannot expire and be
  rebuilt from a database that lacks that write; it gets ``ttl`` once its latest write landed.

Not guaranteed: the database lags the cache (:meth:`WriteBehind.lag`), and a write is lost if
Redis itself loses it (no persistence, failover before replication, or eviction under an
``allkeys-*`` policy).

Redis Cluster: ``redis`` may be a ``redis.cluster.RedisCluster``. The write script touches
the record and the stream at once, and the worker's batch touches the stream, the records
it settles, the dead-letter stream and the counters in one transaction, so all of one
``WriteBehind``'s keys carry the stream's name as hash tag and live in one slot (so on one
primary: to spread write-behind over a cluster, run one ``WriteBehind`` per stream). Keys:
the stream ``<stream>``, the dead letters ``{<stream>}:dead``, the counters
``{<stream>}#stats``, the records ``<namespace>:{<stream>}:<key>`` (no braces in the stream
name or namespace).

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
from dataclasses import dataclass
from typing import Any

from redis.cluster import RedisCluster
from redis.exceptions import RedisError, ResponseError
from sqlalchemy.exc import DBAPIError, DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from course_lib import lua
from course_lib.orphans import watch_parent
from course_lib.validation import positive_number

from ._base import _milliseconds, check_namespace, describe
from .serialization import dumps, loads
from .store import Store

__all__ = ["BatchResult", "NotReplicated", "Worker", "WriteBehind", "entry_version"]

log = logging.getLogger("course_lib.caching")

_ENTRY = b"__entry"
_COLUMN = b"c:"
# The database itself is unavailable (not this entry's fault): retry the batch later.
_UNAVAILABLE = (OperationalError, InterfaceError, DisconnectionError, PoolTimeout, OSError)


def _text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


def _unavailable(exc: BaseException) -> bool:
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, _UNAVAILABLE)


def entry_version(entry_id: bytes | str) -> int:
    """A stream id ``<ms>-<seq>`` as one increasing integer: ``ms * 2**20 + seq``.

    It exceeds 2^53: compare it as an integer (Python, PostgreSQL ``bigint``), never as a
    double (Lua numbers, JavaScript).
    """
    ms, seq = _text(entry_id).split("-")
    return (int(ms) << 20) + int(seq)


class NotReplicated(RuntimeError):
    """A write the primary queued but fewer than ``replicas`` replicas confirmed in time:
    a failover now may lose it. ``entry`` is its stream id."""

    def __init__(self, entry: str, acked: int, wanted: int) -> None:
        super().__init__(f"write {entry} reached {acked} of {wanted} replicas in time")
        self.entry = entry


@dataclass(frozen=True)
class BatchResult:
    """What one call of :meth:`WriteBehind.process` did.

    ``failed`` entries were refused by the store and stay pending for another try;
    ``dead_lettered`` ones were refused ``max_deliveries`` times and moved aside.
    """

    entries: int
    reclaimed: int
    db_writes: int
    skipped: int
    failed: int = 0
    dead_lettered: int = 0

    @property
    def coalesced(self) -> int:
        return self.entries - self.db_writes - self.skipped - self.failed - self.dead_lettered


@dataclass(frozen=True)
class _Entry:
    id: bytes
    version: int
    key: str
    record: dict[str, Any]


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
        max_deliveries: int = 5,
        replicas: int = 0,
        replica_timeout: float = 1.0,
    ) -> None:
        for name, value in (("stream", stream), ("group", group)):
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{name} must be a non-empty string, got {value!r}")
        check_namespace("stream", stream)
        if namespace is not None and (not isinstance(namespace, str) or not namespace.strip()):
            raise ValueError(f"namespace must be a non-empty string or None, got {namespace!r}")
        if namespace is not None:
            check_namespace("namespace", namespace)
        if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 0:
            raise ValueError(f"replicas must be an int >= 0, got {replicas!r}")
        if not isinstance(store, Store):
            raise TypeError(f"store must have load(key) and save(key, value), got {store!r}")
        for name, count in (("batch", batch), ("max_deliveries", max_deliveries)):
            if isinstance(count, bool) or not isinstance(count, int) or count <= 0:
                raise ValueError(f"{name} must be a positive int, got {count!r}")
        self.redis = redis
        self.store = store
        self.stream = stream
        self.group = group
        self.namespace = namespace or stream
        self.ttl = _milliseconds("ttl", ttl)
        self.claim_idle = positive_number("claim_idle", claim_idle)
        self.batch = batch
        self.max_deliveries = max_deliveries
        self.replicas = replicas
        self.replica_timeout = positive_number("replica_timeout", replica_timeout)
        # The stream's name is the hash tag of every key: one slot (see the module docstring).
        self.dead_letter = f"{{{stream}}}:dead"
        self.stats_key = f"{{{stream}}}#stats"
        self._script = lua.load(__package__, "write_behind")
        self._write = self._script.bind(redis)
        self._settle = lua.load(__package__, "settle")
        self.ensure_group()

    def ensure_group(self) -> None:
        """Create the stream and consumer group if missing (from the stream's first entry)."""
        try:
            self.redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def key(self, key: Any) -> str:
        """The Redis key of ``key``'s cached record (in the stream's slot)."""
        return f"{self.namespace}:{{{self.stream}}}:{key}"

    def _queue(self, keys: list[str], args: list[Any]) -> Any:
        """Run the write script; with ``replicas``, ``WAIT`` for them on the same connection."""
        if not self.replicas:
            return self._write(keys=keys, args=args)
        client = self.redis
        cluster = isinstance(client, RedisCluster)
        if cluster:
            # WAIT counts the writes of its own connection, and redis-py's cluster client
            # sends WAIT to every primary: so both go to the slot's node on one connection.
            client = client.get_redis_connection(client.get_node_from_key(self.stream))
        pipe = client.pipeline(transaction=False)
        self._script.queue(pipe, keys, args)
        pipe.execute_command("WAIT", self.replicas, int(self.replica_timeout * 1000))
        try:
            entry, acked = pipe.execute()
        except RedisError:
            if cluster:  # the node died or lost the slot: refresh the map this path bypassed
                with contextlib.suppress(RedisError):
                    self.redis.nodes_manager.initialize()
            raise
        if entry is not None and int(acked) < self.replicas:
            raise NotReplicated(_text(entry), int(acked), self.replicas)
        return entry

    def _columns(self, value: Any) -> dict[str, Any]:
        validate = getattr(self.store, "validate", None)
        if validate is not None:
            fields = validate(value)
        elif isinstance(value, Mapping):
            fields = dict(value)
        else:
            raise TypeError(f"value must be a mapping, got {type(value).__name__}")
        if not fields:
            raise ValueError("value must change at least one column")
        if any(not isinstance(name, str) or name == _ENTRY.decode() for name in fields):
            raise ValueError(f"value has an invalid column name: {sorted(map(str, fields))}")
        return fields

    def write(self, key: Any, value: Mapping[str, Any]) -> str:
        """Merge the changed columns ``value`` into the cached record and queue the whole
        record for the store; the entry id. Unknown columns raise ``ValueError`` here.

        A row not cached yet is read from the store first (so that the record is whole):
        that one read needs the database, and raises if it is unavailable. With
        ``replicas``, raises :class:`NotReplicated` if fewer confirmed it in time.
        """
        fields = self._columns(value)
        changed = [part for name, v in fields.items() for part in (name, dumps(v))]
        keys = [self.key(key), self.stream]
        entry = self._queue(keys, [str(key), len(fields), "0", *changed])
        if entry is None:  # not cached: start the record from the stored row
            row = self.store.load(key) or {}
            loaded = [
                part for name, v in row.items() if name != "version" for part in (name, dumps(v))
            ]
            entry = self._queue(keys, [str(key), len(fields), "1", *changed, *loaded])
        return _text(entry)

    def read(self, key: Any) -> dict[str, Any] | None:
        """The cached record, else the stored one without its ``version`` (which may lag,
        see :meth:`lag`); ``None`` if neither has it."""
        raw = self.redis.hgetall(self.key(key))
        if raw:
            return {_text(k): loads(v) for k, v in raw.items() if k != _ENTRY}
        row = self.store.load(key)
        return None if row is None else {k: v for k, v in row.items() if k != "version"}

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
        """Totals over every worker of this stream: entries, reclaimed, db_writes, skipped,
        failed, dead_lettered."""
        raw = self.redis.hgetall(self.stats_key)
        totals = dict.fromkeys(
            ("entries", "reclaimed", "db_writes", "skipped", "failed", "dead_lettered"), 0
        )
        totals.update({_text(k): int(v) for k, v in raw.items()})
        return totals

    def _vanished(self, consumer: str, known: set[bytes]) -> list[bytes]:
        """Ids pending on ``consumer`` whose entries were deleted from the stream.

        Redis 6.2's ``XAUTOCLAIM`` claims such entries but returns them as nil, without
        their ids (7.0 drops them itself), so they are found in the pending list instead.
        """
        pending = self.redis.xpending_range(
            self.stream, self.group, min="-", max="+", count=10 * self.batch, consumername=consumer
        )
        ids = [p["message_id"] for p in pending if p["message_id"] not in known]
        pipe = self.redis.pipeline(transaction=False)
        for entry_id in ids:
            pipe.xrange(self.stream, min=entry_id, max=entry_id, count=1)
        return [entry_id for entry_id, found in zip(ids, pipe.execute(), strict=True) if not found]

    def _reclaim(self, consumer: str) -> tuple[list[tuple[bytes, dict[bytes, bytes]]], list[bytes]]:
        """Entries idle for ``claim_idle`` on any consumer, now ours; and vanished ids."""
        reply = self.redis.xautoclaim(
            self.stream,
            self.group,
            consumer,
            min_idle_time=int(self.claim_idle * 1000),
            start_id="0-0",
            count=self.batch,
        )[1]
        claimed = [(entry_id, fields) for entry_id, fields in reply if entry_id is not None]
        vanished = [entry_id for entry_id, fields in claimed if not fields]
        claimed = [(entry_id, fields) for entry_id, fields in claimed if fields]
        if len(claimed) + len(vanished) < len(reply):
            vanished += self._vanished(consumer, {entry_id for entry_id, _ in claimed})
        return claimed, vanished

    def process(self, consumer: str, *, block: float = 0.0) -> BatchResult:
        """One batch: reclaim stale pending entries, read new ones, coalesce, save, ack.

        Raises if the database or Redis is unavailable (nothing of the batch is acked; the
        entries are retried); an entry the store refuses is kept pending, or dead-lettered
        on its ``max_deliveries``-th delivery.
        """
        claimed, vanished = self._reclaim(consumer)
        if vanished:
            self.redis.xack(self.stream, self.group, *vanished)
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
        raw_entries = claimed + fresh
        if not raw_entries:
            return BatchResult(0, 0, 0, 0)
        refused: dict[bytes, str] = {}
        by_key: dict[str, list[_Entry]] = {}
        for entry_id, fields in sorted(raw_entries, key=lambda e: entry_version(e[0])):
            try:
                entry = _Entry(
                    entry_id,
                    entry_version(entry_id),
                    _text(fields[b"key"]),
                    {
                        _text(k[len(_COLUMN) :]): loads(v)
                        for k, v in fields.items()
                        if k.startswith(_COLUMN)
                    },
                )
            except (KeyError, ValueError) as exc:
                refused[entry_id] = f"malformed entry: {describe(exc)}"
                continue
            by_key.setdefault(entry.key, []).append(entry)
        written = skipped = 0
        done: dict[str, bytes] = {}  # key -> its latest entry now in the database
        for key, entries in by_key.items():
            w, s, errors = self._apply(key, entries)
            written, skipped = written + w, skipped + s
            refused.update(errors)
            landed = [e.id for e in entries if e.id not in errors]
            if landed:
                done[key] = landed[-1]
        dead = self._dead_letters(consumer, refused, dict(raw_entries)) if refused else {}
        acked = [entry_id for entry_id, _ in raw_entries if entry_id not in refused]
        acked += list(dead)
        pipe = self.redis.pipeline(transaction=True)
        if acked:
            pipe.xack(self.stream, self.group, *acked)
            pipe.xdel(self.stream, *acked)
        if done:
            self._settle_records(pipe, "expire", done)
        if dead:
            self._settle_records(
                pipe, "drop", {key: entry_id for entry_id, key in dead.items() if key}
            )
        counts = {
            "entries": len(raw_entries),
            "reclaimed": len(claimed),
            "db_writes": written,
            "skipped": skipped,
            "failed": len(refused) - len(dead),
            "dead_lettered": len(dead),
        }
        for name, value in counts.items():
            pipe.hincrby(self.stats_key, name, value)
        pipe.execute()
        return BatchResult(
            len(raw_entries), len(claimed), written, skipped, counts["failed"], len(dead)
        )

    def _apply(self, key: str, entries: list[_Entry]) -> tuple[int, int, dict[bytes, str]]:
        """Save ``key``'s entries: the last one (coalesced), else one by one if the store
        refuses it; ``(db_writes, skipped, {refused id: error})``."""
        last = entries[-1]
        try:
            saved = self.store.save(key, {**last.record, "version": last.version})
        except Exception as exc:
            if _unavailable(exc):
                raise
        else:
            return (0, 1, {}) if saved is None else (1, 0, {})
        written = skipped = 0
        errors: dict[bytes, str] = {}
        for entry in entries:  # find which entries the store refuses, keep the others
            try:
                saved = self.store.save(key, {**entry.record, "version": entry.version})
            except Exception as exc:
                if _unavailable(exc):
                    raise
                errors[entry.id] = describe(exc)
                continue
            written, skipped = written + (saved is not None), skipped + (saved is None)
        return written, skipped, errors

    def _dead_letters(
        self, consumer: str, refused: dict[bytes, str], fields: dict[bytes, dict[bytes, bytes]]
    ) -> dict[bytes, str]:
        """Move refused entries delivered ``max_deliveries`` times to the dead-letter stream;
        ``{entry id: its key}`` of those moved."""
        ids = sorted(refused, key=entry_version)
        pending = self.redis.xpending_range(
            self.stream,
            self.group,
            min=ids[0],
            max=ids[-1],
            count=10 * self.batch,
            consumername=consumer,
        )
        deliveries = {p["message_id"]: p["times_delivered"] for p in pending}
        dead = {
            entry_id: _text(fields[entry_id].get(b"key", b""))
            for entry_id in ids
            if deliveries.get(entry_id, 0) >= self.max_deliveries
        }
        for entry_id in dead:
            self.redis.xadd(
                self.dead_letter,
                {
                    **fields[entry_id],
                    b"entry": entry_id,
                    b"error": refused[entry_id],
                    b"deliveries": deliveries[entry_id],
                },
            )
            log.error(
                "write-behind entry %s of %r dead-lettered to %r after %d deliveries: %s",
                _text(entry_id),
                dead[entry_id],
                self.dead_letter,
                deliveries[entry_id],
                refused[entry_id],
            )
        return dead

    def _settle_records(self, pipe: Any, action: str, done: Mapping[str, bytes]) -> None:
        keys = [self.key(key) for key in done]
        args = [action, int(self.ttl * 1000), *done.values()]
        self._settle.queue(pipe, keys, args)

    def run(
        self, consumer: str, stop: threading.Event, *, block: float = 0.1, max_pause: float = 2.0
    ) -> None:
        """Process batches until ``stop`` is set; the batch in hand is always finished.

        No error ends it: it logs the first error of a streak, then retries with a pause
        doubling from 50 ms to ``max_pause`` (the database or Redis is away; their entries
        stay pending and are reclaimed), and logs when a batch succeeds again.
        """
        pause = 0.0
        while not stop.is_set():
            try:
                self.process(consumer, block=block)
            except Exception as exc:
                if not pause:
                    log.warning("write-behind worker %r: %s; retrying", consumer, describe(exc))
                pause = min(max(pause * 2, 0.05), max_pause)
                stop.wait(pause)
                continue
            if pause:
                log.warning("write-behind worker %r: writing again", consumer)
                pause = 0.0

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


def _worker_main(wb: WriteBehind, consumer: str, block: float, parent: int) -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    # A parent killed outright leaves no one to stop this worker (``parent`` is its pid from
    # before the fork, so a parent that died while this process started counts too).
    watch_parent(stop.set, parent=parent)
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
            target=_worker_main, args=(self.wb, self.consumer, self.block, os.getpid()), daemon=True
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
