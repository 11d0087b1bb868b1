"""Write-behind without I/O: key names, the stream entry format, a batch's bookkeeping.

What the sync shell (:mod:`course_lib.caching.write_behind`) and the asyncio shell
(:mod:`course_lib.caching.aio.write_behind`) share. Nothing here talks to Redis or to the
database: every function takes replies and returns what to send or what was decided, so
both shells behave the same and a batch's decisions can be read (and tested) apart from
the round trips that carry them.

The entry format, written by ``write_behind.lua``: field ``key`` (the entity key) and one
field ``c:<column>`` per column of the whole record, each value JSON text. The cached
record is a hash of column -> JSON text, plus ``__entry``, the id of its latest entry.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import redis.asyncio.cluster
import redis.cluster
from redis.exceptions import ResponseError

from course_lib import lua
from course_lib.validation import instance_of, non_negative_int, positive_number, text

from .._base import check_namespace, describe
from ..serialization import dumps, loads
from ..store import Store

__all__ = [
    "STAT_NAMES",
    "Batch",
    "BatchResult",
    "Entry",
    "NotReplicated",
    "ProducerCore",
    "RawEntry",
    "StreamKeys",
    "changed_columns",
    "check_replicas",
    "database_unavailable",
    "decode_record",
    "entry_version",
    "group_exists",
    "lag_seconds",
    "missing_group",
    "reply_text",
    "split_claimed",
    "stored_record",
    "totals",
    "write_args",
]

ENTRY_FIELD = "__entry"  # the record's field naming its latest entry (not a column)
COLUMN_PREFIX = b"c:"
STAT_NAMES = ("entries", "reclaimed", "db_writes", "skipped", "failed", "dead_lettered")
_CLUSTERS = (redis.cluster.RedisCluster, redis.asyncio.cluster.RedisCluster)


def reply_text(raw: bytes | str) -> str:
    """A Redis reply as text, whether the client decodes responses or not."""
    return raw.decode() if isinstance(raw, bytes) else raw


def entry_version(entry_id: bytes | str) -> int:
    """A stream id ``<ms>-<seq>`` as one increasing integer: ``ms * 2**20 + seq``.

    It exceeds 2^53: compare it as an integer (Python, PostgreSQL ``bigint``), never as a
    double (Lua numbers, JavaScript).
    """
    ms, seq = reply_text(entry_id).split("-")
    return (int(ms) << 20) + int(seq)


class NotReplicated(RuntimeError):
    """A write the primary queued but fewer than ``replicas`` replicas confirmed in time:
    a failover now may lose it. ``entry`` is its stream id."""

    def __init__(self, entry: str, acked: int, wanted: int) -> None:
        super().__init__(f"write {entry} reached {acked} of {wanted} replicas in time")
        self.entry = entry


def check_replicas(entry: Any, acked: Any, wanted: int) -> Any:
    """The entry id of a write sent with ``WAIT wanted``; :class:`NotReplicated` if fewer
    replicas confirmed it (an entry of ``None`` wrote nothing, so there is nothing to lose)."""
    if entry is not None and int(acked) < wanted:
        raise NotReplicated(reply_text(entry), int(acked), wanted)
    return entry


def group_exists(exc: ResponseError) -> bool:
    """Whether ``XGROUP CREATE`` failed only because the group exists already."""
    return str(exc).startswith("BUSYGROUP")


def missing_group(exc: ResponseError) -> bool:
    """Whether a command failed because the stream or its group does not exist (yet)."""
    return str(exc).startswith("NOGROUP")


class StreamKeys:
    """The Redis keys of one write-behind stream.

    The stream's name is the hash tag of every key, so all of them live in one Redis
    Cluster slot (the write script and the worker's transaction touch several at once):
    the stream ``<stream>``, the dead letters ``{<stream>}:dead``, the counters
    ``{<stream>}#stats``, the records ``<namespace>:{<stream>}:<key>``. Neither name may
    contain braces.
    """

    __slots__ = ("dead_letter", "namespace", "stats", "stream")

    def __init__(self, stream: str, namespace: str | None = None) -> None:
        self.stream = check_namespace("stream", text("stream", stream))
        if namespace is None:
            self.namespace = stream
        else:
            self.namespace = check_namespace("namespace", text("namespace", namespace))
        self.dead_letter = f"{{{stream}}}:dead"
        self.stats = f"{{{stream}}}#stats"

    def record(self, key: Any) -> str:
        """The Redis key of ``key``'s cached record (in the stream's slot)."""
        return f"{self.namespace}:{{{self.stream}}}:{key}"


# Producer.


class ProducerCore:
    """What the sync and asyncio producers share: checked settings, key names, and what a
    write sends. A producer declares the stream and its group (``XGROUP CREATE MKSTREAM``)
    before its first write, so consumers started later find them."""

    def __init__(
        self,
        redis: Any,
        store: Store,
        *,
        stream: str,
        group: str,
        namespace: str | None = None,
        replicas: int = 0,
        replica_timeout: float = 1.0,
    ) -> None:
        self.redis = redis  # a sync or asyncio client, as the shell needs
        self.store: Store = instance_of("store", store, Store, "a Store (load and save)")
        self.keys = StreamKeys(stream, namespace)
        self.group = text("group", group)
        self.replicas = non_negative_int("replicas", replicas)
        self.replica_timeout = positive_number("replica_timeout", replica_timeout)
        self.script = lua.load("course_lib.caching", "write_behind")
        self.declared = False  # set once this producer has declared the group

    def prepare(self, key: Any, value: Any) -> tuple[list[str], dict[str, Any]]:
        """The script's keys for a write of ``key``, and the checked changed columns."""
        return [self.keys.record(key), self.keys.stream], changed_columns(self.store, value)

    def queue_replicated(self, pipe: Any, keys: list[str], args: list[Any]) -> None:
        """Queue the write script and ``WAIT replicas`` on ``pipe``, a pipeline of the client.

        ``WAIT`` counts the writes of its own connection, and a cluster client sends it to
        every primary unless told where: so it goes to the stream's node, where the script
        goes too, and a pipeline sends what goes to one node on one connection.
        """
        self.script.queue(pipe, keys, args)
        where = {}
        if isinstance(self.redis, _CLUSTERS):
            where["target_nodes"] = self.redis.get_node_from_key(self.keys.stream)
        timeout_ms = int(self.replica_timeout * 1000)
        pipe.execute_command("WAIT", self.replicas, timeout_ms, **where)


def changed_columns(store: Any, value: Any) -> dict[str, Any]:
    """The columns a write changes, checked by the store's ``validate`` if it has one (a
    value the database would refuse raises ``ValueError`` before it is queued)."""
    validate = getattr(store, "validate", None)
    if validate is not None:
        fields = validate(value)
    elif isinstance(value, Mapping):
        fields = dict(value)
    else:
        raise TypeError(f"value must be a mapping, got {type(value).__name__}")
    if not fields:
        raise ValueError("value must change at least one column")
    if any(not isinstance(name, str) or name == ENTRY_FIELD for name in fields):
        raise ValueError(f"value has an invalid column name: {sorted(map(str, fields))}")
    return fields


def write_args(
    key: Any, fields: Mapping[str, Any], stored: Mapping[str, Any] | None = None
) -> list[Any]:
    """The arguments of ``write_behind.lua`` for changing ``fields`` of ``key``.

    Without ``stored`` the script refuses (returns nil) when the record is not cached; with
    the stored row (``{}`` if none), it starts the record from that row.
    """
    changed = [part for name, v in fields.items() for part in (name, dumps(v))]
    if stored is None:
        return [str(key), len(fields), "0", *changed]
    loaded = [part for name, v in stored.items() if name != "version" for part in (name, dumps(v))]
    return [str(key), len(fields), "1", *changed, *loaded]


def decode_record(raw: Mapping[Any, Any]) -> dict[str, Any]:
    """A cached record (``HGETALL`` reply) as a row, without its ``__entry`` field."""
    return {reply_text(k): loads(v) for k, v in raw.items() if reply_text(k) != ENTRY_FIELD}


def stored_record(row: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A stored row as the cache shows it: without its ``version``."""
    return None if row is None else {k: v for k, v in row.items() if k != "version"}


# Consumer.

RawEntry = tuple[bytes, dict[bytes, bytes]]


@dataclass(frozen=True)
class Entry:
    """One parsed stream entry: its id, the version the store orders by, the key, the row."""

    id: bytes
    version: int
    key: str
    record: dict[str, Any]

    @classmethod
    def parse(cls, entry_id: bytes, fields: Mapping[bytes, bytes]) -> Entry:
        """Raises ``KeyError`` or ``ValueError`` for an entry not in the format above."""
        record = {
            reply_text(k[len(COLUMN_PREFIX) :]): loads(v)
            for k, v in fields.items()
            if k.startswith(COLUMN_PREFIX)
        }
        return cls(entry_id, entry_version(entry_id), reply_text(fields[b"key"]), record)

    def row(self) -> dict[str, Any]:
        """What the store saves: the record with its ``version``."""
        return {**self.record, "version": self.version}


# PEP 249 names the errors of a database that is away (a lost connection, a server shutting
# down) OperationalError and InterfaceError. Every driver and SQLAlchemy's wrappers use
# these names (SQLAlchemy adds DisconnectionError, and TimeoutError for a full pool), so
# the consumer tells them apart without importing a driver.
_UNAVAILABLE_ERRORS = {"OperationalError", "InterfaceError", "DisconnectionError", "TimeoutError"}


def database_unavailable(exc: BaseException) -> bool:
    """Whether ``exc``, raised by the store, says the database itself is away (retry the
    batch later) rather than that it refused this entry."""
    if isinstance(exc, OSError) or getattr(exc, "connection_invalidated", False):
        return True
    return any(kind.__name__ in _UNAVAILABLE_ERRORS for kind in type(exc).__mro__)


def split_claimed(reply: Sequence[Any]) -> tuple[list[RawEntry], list[bytes], bool]:
    """An ``XAUTOCLAIM`` reply's entries: those claimed, the ids claimed whose entry was
    deleted from the stream, and whether some came back without even their id.

    Redis 6.2 returns a deleted entry as nil, without its id (7.0 drops it itself): those
    ids must then be found in the pending list.
    """
    claimed = [(entry_id, fields) for entry_id, fields in reply if entry_id is not None]
    vanished = [entry_id for entry_id, fields in claimed if not fields]
    claimed = [(entry_id, fields) for entry_id, fields in claimed if fields]
    return claimed, vanished, len(claimed) + len(vanished) < len(reply)


@dataclass(frozen=True)
class BatchResult:
    """What one batch of a consumer did.

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


@dataclass
class Batch:
    """One batch's entries and what became of them, as the consumer learns it.

    Entries are grouped by key in version order; a malformed one is refused at once. The
    consumer saves each key's group, then reports it with :meth:`saved`; the refused
    entries it dead-letters are reported with :meth:`dead_lettered`. The rest is decided
    here: which ids to acknowledge, which records to settle, the counters.
    """

    claimed: list[RawEntry]
    fresh: list[RawEntry]
    by_key: dict[str, list[Entry]] = field(default_factory=dict, init=False)
    refused: dict[bytes, str] = field(default_factory=dict, init=False)  # entry id -> error
    written: int = field(default=0, init=False)
    skipped: int = field(default=0, init=False)
    landed: dict[str, bytes] = field(default_factory=dict, init=False)  # key -> latest saved
    dead: dict[bytes, str] = field(default_factory=dict, init=False)  # entry id -> its key

    def __post_init__(self) -> None:
        for entry_id, fields in sorted(self.entries, key=lambda e: entry_version(e[0])):
            try:
                entry = Entry.parse(entry_id, fields)
            except (KeyError, ValueError) as exc:
                self.refused[entry_id] = f"malformed entry: {describe(exc)}"
                continue
            self.by_key.setdefault(entry.key, []).append(entry)

    @property
    def entries(self) -> list[RawEntry]:
        return self.claimed + self.fresh

    def saved(self, key: str, outcomes: Mapping[bytes, bool | str]) -> None:
        """``key``'s group was saved. ``outcomes`` tells, for each entry the consumer tried,
        ``True`` if the store changed the row, ``False`` if it already had that version or
        a newer one, or the error if it refused the entry."""
        errors = {i: error for i, error in outcomes.items() if isinstance(error, str)}
        self.written += sum(outcome is True for outcome in outcomes.values())
        self.skipped += sum(outcome is False for outcome in outcomes.values())
        self.refused.update(errors)
        landed = [e.id for e in self.by_key[key] if e.id not in errors]
        if landed:
            self.landed[key] = landed[-1]

    def due_for_dead_letter(
        self, deliveries: Mapping[bytes, int], max_deliveries: int
    ) -> list[bytes]:
        """The refused ids delivered ``max_deliveries`` times, oldest first."""
        ids = sorted(self.refused, key=entry_version)
        return [i for i in ids if deliveries.get(i, 0) >= max_deliveries]

    def dead_letter_entry(self, entry_id: bytes, deliveries: int) -> dict[bytes, Any]:
        """What the dead-letter stream keeps of ``entry_id``: its fields and why."""
        fields = dict(self.entries)[entry_id]
        return {
            **fields,
            b"entry": entry_id,
            b"error": self.refused[entry_id],
            b"deliveries": deliveries,
        }

    def dead_lettered(self, entry_id: bytes) -> None:
        """``entry_id`` was moved to the dead-letter stream."""
        self.dead[entry_id] = reply_text(dict(self.entries)[entry_id].get(b"key", b""))

    def acknowledged(self) -> list[bytes]:
        """Ids done with: saved, skipped, or dead-lettered (a refused one stays pending)."""
        return [i for i, _ in self.entries if i not in self.refused or i in self.dead]

    def dropped(self) -> dict[str, bytes]:
        """Records whose latest entry was dead-lettered: key -> that entry id."""
        return {key: entry_id for entry_id, key in self.dead.items() if key}

    def settle_calls(self, keys: StreamKeys, ttl_ms: int) -> list[lua.Call]:
        """The ``settle.lua`` calls for this batch: records whose latest entry landed get
        their TTL back (``expire``); those whose latest entry was dead-lettered are dropped."""
        calls: list[lua.Call] = []
        for action, done in (("expire", self.landed), ("drop", self.dropped())):
            if done:
                calls.append(([keys.record(k) for k in done], [action, ttl_ms, *done.values()]))
        return calls

    def counts(self) -> dict[str, int]:
        """What this batch adds to the stream's counters (:data:`STAT_NAMES`)."""
        return asdict(self.result())

    def result(self) -> BatchResult:
        return BatchResult(
            entries=len(self.entries),
            reclaimed=len(self.claimed),
            db_writes=self.written,
            skipped=self.skipped,
            failed=len(self.refused) - len(self.dead),
            dead_lettered=len(self.dead),
        )


# Monitor.


def lag_seconds(oldest: Sequence[Any], now: float | None = None) -> float:
    """Age in seconds of the oldest entry (an ``XRANGE ... COUNT 1`` reply); 0 if none."""
    if not oldest:
        return 0.0
    ms = int(reply_text(oldest[0][0]).split("-")[0])
    return max(0.0, (time.time() if now is None else now) - ms / 1000)


def totals(raw: Mapping[Any, Any]) -> dict[str, int]:
    """The counters hash (``HGETALL``) as totals, every name present."""
    counts = dict.fromkeys(STAT_NAMES, 0)
    counts.update({reply_text(k): int(v) for k, v in raw.items()})
    return counts
