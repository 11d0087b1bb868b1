"""What every Redis limiter of the course shares.

- One Lua script per algorithm, ``<name>.lua`` beside this module (between the shared
  ``_now.lua`` prelude and the shared ``_batch.lua`` loop, which decides each key of the
  call in order), run through :mod:`course_lib.lua`: read once per process, called
  with ``EVALSHA``; the script is sent (``SCRIPT LOAD``) only when Redis answers
  ``NOSCRIPT`` (first use, or after a restart or ``SCRIPT FLUSH``). A script runs atomically
  on the server, so one decision is one round trip and no other client can interleave.
- Time comes from the Redis server (``TIME`` inside the script), so application servers
  whose clocks disagree still share one notion of "now". An injected ``clock`` replaces it,
  for replaying recorded traffic and for tests.
- Keys are ``<prefix>:{<key>}``: the braces are a Redis Cluster hash tag, so every key of
  one client lands in the same slot.
- ``hit_many`` decides a batch in one pipelined round trip and one script call per
  Redis Cluster slot (one call in all on a plain ``redis.Redis``; groups of more than
  :data:`MAX_KEYS_PER_CALL` keys are split so no call holds the server long): the script
  loops over the keys on the server, so a batch pays the per-command cost once per call,
  not once per key. Each decision is the one ``hit`` would make, atomic; the same key
  repeated is counted in order.
- A step of the server's clock is survived: state stamped after "now" (the clock stepped
  back) is treated as stamped now, so the step neither grants extra quota nor blocks a
  client longer than one window (window limiters) or one refill of the cost (buckets).
  Redis keeps expiry times on its wall clock too, so after a step back keys live longer
  than their TTL said: memory, not admissions.
- When Redis cannot be reached (connection refused or lost, timeout) or cannot count now
  (any reply of :data:`course_lib.services.clients.UNAVAILABLE_REPLIES`: ``OOM`` under
  ``noeviction``, ``MISCONF``, ``READONLY`` from a replica after a failover, ``LOADING``
  after a restart, ``BUSY``, ``NOREPLICAS``, ``MASTERDOWN``, and on a cluster ``CLUSTERDOWN``
  and ``TRYAGAIN``), the limiter
  does not raise: it answers with its ``fail_open`` policy and marks the decision ``degraded``.
  The default, ``fail_open=True``, admits the request, because a rate limiter usually
  protects availability and should not take the whole API down with its store (Envoy's
  global rate limit filter defaults to the same). Pass ``fail_open=False`` where an extra
  request costs more than a refused one (paid upstream APIs, login attempts); the request
  is then refused with ``retry_after`` = :data:`FAIL_CLOSED_RETRY_AFTER`. How long a dead
  server takes to be noticed is the client's business: a default redis-py 8 client retries
  with backoff and takes seconds per call; give the limiter
  :func:`~course_lib.services.fail_fast_client` (short timeouts, no retries, a bounded
  pool with a bounded wait).
- A full client pool is not an outage (:func:`course_lib.services.pool_exhausted`): the
  server could count, so answering ``fail_open`` would admit everyone exactly at peak load.
  The limiter raises :class:`~course_lib.services.PoolExhaustedError` instead, after the
  pool's own bounded wait (``pool_timeout`` of the fail-fast clients).
- The client is a ``redis.Redis`` or a ``redis.cluster.RedisCluster``: each decision touches
  one key, so ``EVALSHA`` routes to that key's node, and ``hit_many`` groups its keys by
  slot (the keys of one script call must share a slot) and sends the groups in a cluster
  pipeline (one round trip per node involved). A group whose call fails gets the
  ``fail_open`` answer for its keys only. Tested on a local 3-node cluster.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar

import redis
import redis.asyncio.cluster
from redis.cluster import RedisCluster
from redis.crc import key_slot

from course_lib import lua
from course_lib.redis_errors import PoolExhaustedError, pool_exhausted, redis_unavailable
from course_lib.validation import cost_within

from .decision import Decision

__all__ = ["FAIL_CLOSED_RETRY_AFTER", "MAX_KEYS_PER_CALL", "RedisLimiter", "script"]

FAIL_CLOSED_RETRY_AFTER = 1.0
MAX_KEYS_PER_CALL = 1000
"""Most keys ``hit_many`` decides in one script call: a script holds the whole server while
it runs (a few microseconds per key), so a huge batch is cut into calls of this size, all
still in one pipelined round trip."""
_new = tuple.__new__
_CLUSTER = (RedisCluster, redis.asyncio.cluster.RedisCluster)


def script(name: str) -> lua.Script:
    """The limiter script ``<name>.lua`` between the shared ``_now.lua`` prelude (which
    defines ``now`` in microseconds) and the shared ``_batch.lua`` loop (which calls the
    script's ``decide(key, cost, i)`` for each key of the call and returns the replies)."""
    return lua.load(__package__, name, prelude="_now", epilogue="_batch")


def _to_decision(reply: Sequence[int]) -> Decision:
    allowed, remaining, retry_us, reset_us = reply
    return _new(Decision, (allowed == 1, remaining, retry_us / 1e6, reset_us / 1e6, False))


def _flat_decisions(reply: Sequence[int]) -> list[Decision]:
    """The decisions of a script call's reply: four integers per key, in order."""
    values = iter(reply)
    return [
        _new(Decision, (allowed == 1, remaining, retry_us / 1e6, reset_us / 1e6, False))
        for allowed, remaining, retry_us, reset_us in zip(
            values, values, values, values, strict=True
        )
    ]


class RedisLimiter:
    """Base class: subclasses set :attr:`script`, :attr:`quota`, :attr:`window` and the
    script's parameters (:attr:`_params`); see the module docstring for the guarantees."""

    script: ClassVar[str]
    _client_types: ClassVar[tuple[type, ...]] = (redis.Redis, RedisCluster)
    _client_names: ClassVar[str] = "redis.Redis or RedisCluster"
    quota_name: ClassVar[str] = "limit"
    quota: int
    """Units admissible at once (the ``q`` of the ``RateLimit-Policy`` header)."""
    window: float
    """Seconds over which :attr:`quota` applies (the ``w`` of ``RateLimit-Policy``)."""
    _params: tuple[Any, Any]
    """The script's two parameters (ARGV[3] and ARGV[4], see ``_batch.lua``)."""

    def __init__(
        self,
        client: redis.Redis | RedisCluster,
        *,
        prefix: str,
        fail_open: bool = True,
        clock: Callable[[], float] | None = None,
    ) -> None:
        if not isinstance(client, self._client_types):
            raise TypeError(
                f"redis must be a {self._client_names} client, got {type(client).__name__}"
            )
        if not isinstance(prefix, str) or not prefix:
            raise ValueError(f"prefix must be a non-empty string, got {prefix!r}")
        if not isinstance(fail_open, bool):
            raise TypeError(f"fail_open must be a bool, got {type(fail_open).__name__}")
        if clock is not None and not callable(clock):
            raise TypeError(f"clock must be callable or None, got {type(clock).__name__}")
        self.redis = client
        self.prefix = prefix
        self.fail_open = fail_open
        self.clock = clock
        self._script = script(self.script)
        self._sha = self._script.sha
        self._cluster = isinstance(client, _CLUSTER)

    def key(self, key: str) -> str:
        """The Redis key that holds ``key``'s state."""
        return f"{self.prefix}:{{{key}}}"

    def _now(self) -> str:
        return "" if self.clock is None else str(round(self.clock() * 1_000_000))

    def _nonce(self) -> str:
        """The script's second argument, new for each call where the script needs it (none
        by default)."""
        return ""

    def _check_cost(self, cost: object) -> int:
        return cost_within(cost, self.quota, self.quota_name)

    def _fallback(self) -> Decision:
        if self.fail_open:
            return Decision(True, self.quota, 0.0, 0.0, True)
        return Decision(False, 0, FAIL_CLOSED_RETRY_AFTER, FAIL_CLOSED_RETRY_AFTER, True)

    def hit(self, key: str, cost: int = 1) -> Decision:
        """Count ``cost`` units against ``key`` if they fit; one atomic round trip.

        ``cost=0`` asks without spending. Raises ``ValueError`` for a negative cost or one
        above :attr:`quota`; never raises because Redis is unreachable (see ``fail_open``).
        """
        keys, args = self._call(key, cost)
        try:
            reply = self._script(self.redis, keys, args)
        except redis.RedisError as exc:
            return self._unavailable(exc)
        return _to_decision(reply)

    def hit_many(self, keys_or_pairs: Iterable[str | tuple[str, int]]) -> list[Decision]:
        """Decide a batch in one pipelined round trip, one script call per cluster slot;
        decisions come back in input order.

        Items are keys (cost 1) or ``(key, cost)`` pairs; the same key may appear several
        times and is counted in order. All costs are validated before anything is sent.
        Each decision is the one ``hit`` would make, atomic on its own; the batch is not a
        transaction. A script call that fails answers ``fail_open`` for its keys only.
        """
        calls, positions = self._batch(keys_or_pairs)
        if not calls:
            return []
        try:
            replies = self._script.pipeline(self.redis, calls)
        except redis.RedisError as exc:
            replies = [exc] * len(calls)
        return self._decisions(replies, positions)

    # What hit / hit_many do apart from I/O, shared with the asyncio family (.aio).
    def _call(self, key: str, cost: object) -> tuple[tuple[str], tuple[Any, ...]]:
        if key.__class__ is not str and not isinstance(key, str):
            raise TypeError(f"key must be a str, got {type(key).__name__}")
        if cost != 1 or cost.__class__ is not int:
            cost = self._check_cost(cost)
            return (self.key(key),), (self._now(), self._nonce(), *self._params, cost)
        # no cost argument: the script counts 1 (one argument less to pack and read)
        return (self.key(key),), (self._now(), self._nonce(), *self._params)

    def _batch(
        self, keys_or_pairs: Iterable[str | tuple[str, int]]
    ) -> tuple[list[lua.Call], list[Sequence[int]]]:
        """The script calls of a batch, and for each call the input positions of its keys."""
        names: list[str] = []
        costs: list[int] = []
        ones = True  # every cost is 1: the script is sent no costs (see _batch.lua)
        for item in keys_or_pairs:
            if isinstance(item, str):
                # cost 1 always fits: every quota is a positive int
                key, cost = item, 1
            elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
                key, cost = item
                cost = self._check_cost(cost)
                ones = ones and cost == 1
            else:
                raise TypeError(
                    f"keys_or_pairs items must be str keys or (str key, int cost) pairs, "
                    f"got {item!r}"
                )
            names.append(self.key(key))
            costs.append(cost)
        groups: list[Sequence[int]]
        if self._cluster:
            # The keys of one script call must share a slot; a key's items stay in order.
            encode = self.redis.get_encoder().encode
            slots: dict[int, list[int]] = {}
            for position, name in enumerate(names):
                slots.setdefault(key_slot(encode(name)), []).append(position)
            groups = list(slots.values())
        else:
            groups = [range(len(names))]
        now = self._now()
        calls: list[lua.Call] = []
        positions: list[Sequence[int]] = []
        for group in groups:
            for start in range(0, len(group), MAX_KEYS_PER_CALL):
                part = group[start : start + MAX_KEYS_PER_CALL]
                keys = [names[i] for i in part]
                args: tuple[Any, ...] = (now, self._nonce(), *self._params)
                if not ones:
                    args += tuple(costs[i] for i in part)
                calls.append((keys, args))
                positions.append(part)
        return calls, positions

    def _unavailable(self, exc: redis.RedisError) -> Decision:
        """The ``fail_open`` answer when Redis cannot count now; raises anything else, a full
        client pool as :class:`PoolExhaustedError`."""
        if redis_unavailable(exc):
            return self._fallback()
        if pool_exhausted(exc) and not isinstance(exc, PoolExhaustedError):
            # redis-py's own pools say only "No connection available." or "Too many
            # connections", which read like an outage.
            raise PoolExhaustedError(
                f"the Redis client's connection pool is full ({exc}); Redis itself was not "
                "asked, so the limiter does not fail open. Give it a bounded blocking pool "
                "(course_lib.services.fail_fast_client) or lower the concurrency"
            ) from exc
        raise exc

    def _decisions(self, replies: list[Any], positions: list[Sequence[int]]) -> list[Decision]:
        """One decision per input item, in input order, from one reply per script call."""
        if len(replies) == 1 and not isinstance(replies[0], Exception):
            return _flat_decisions(replies[0])  # one call, in input order
        decisions: list[Decision] = [None] * sum(map(len, positions))  # type: ignore[list-item]
        for reply, part in zip(replies, positions, strict=True):
            if isinstance(reply, Exception):
                fallback = self._unavailable(reply)
                for i in part:
                    decisions[i] = fallback
            else:
                for i, decision in zip(part, _flat_decisions(reply), strict=True):
                    decisions[i] = decision
        return decisions

    def __repr__(self) -> str:
        name = type(self).__name__
        return f"{name}(quota={self.quota}, window={self.window:g}s, prefix={self.prefix!r})"
