"""The sans-I/O core every Redis limiter shares: what a decision is apart from talking to Redis.

A Redis limiter is three parts. This module's :class:`LimiterCore` (and one subclass per
algorithm, :mod:`.algorithms`) builds keys and script arguments, groups a batch by cluster
slot, turns a script's reply into :class:`Decision` values and a Redis error into the
``fail_open`` answer; it never sends a command. Two thin shells do the I/O with the same
core: :class:`~course_lib.rate_limiting.redis_limiters.RedisLimiter` on a blocking client
and :class:`~course_lib.rate_limiting.aio.AsyncRedisLimiter` on an asyncio one (``await
limiter.hit(key)``). Neither shell is a subclass of the other, and a key counted by one is
counted by the other.

Guarantees, for both shells:

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
  (any reply of :data:`course_lib.redis_errors.UNAVAILABLE_REPLIES`: ``OOM`` under
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
  pool with a bounded wait), or ``fail_fast_async_client`` for the asyncio shell.
- A full client pool is not an outage (:func:`course_lib.redis_errors.pool_exhausted`): the
  server could count, so answering ``fail_open`` would admit everyone exactly at peak load.
  The limiter raises :class:`~course_lib.redis_errors.PoolExhaustedError` instead, after
  the pool's own bounded wait (``pool_timeout`` of the fail-fast clients). redis-py's
  default asyncio pool raises as soon as its 100 connections are taken: give many
  concurrent tasks a bounded ``BlockingConnectionPool`` instead.
- The client is a ``redis.Redis`` or a ``redis.cluster.RedisCluster`` (or their
  ``redis.asyncio`` twins): each decision touches one key, so ``EVALSHA`` routes to that
  key's node, and ``hit_many`` groups its keys by slot (the keys of one script call must
  share a slot) and sends the groups in a cluster pipeline (one round trip per node
  involved). A group whose call fails gets the ``fail_open`` answer for its keys only.
  Tested on a local 3-node cluster.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar, NamedTuple

import redis
import redis.asyncio.cluster
from redis.cluster import RedisCluster
from redis.crc import key_slot

from course_lib import lua
from course_lib.redis_errors import PoolExhaustedError, pool_exhausted, redis_unavailable
from course_lib.validation import cost_within

from .decision import Decision

__all__ = [
    "FAIL_CLOSED_RETRY_AFTER",
    "MAX_KEYS_PER_CALL",
    "Batch",
    "LimiterCore",
    "decisions_of",
    "script",
]

FAIL_CLOSED_RETRY_AFTER = 1.0
MAX_KEYS_PER_CALL = 1000
"""Most keys ``hit_many`` decides in one script call: a script holds the whole server while
it runs (a few microseconds per key), so a huge batch is cut into calls of this size, all
still in one pipelined round trip."""
_CLUSTER = (RedisCluster, redis.asyncio.cluster.RedisCluster)


def script(name: str) -> lua.Script:
    """The limiter script ``<name>.lua`` between the shared ``_now.lua`` prelude (which
    defines ``now`` in microseconds) and the shared ``_batch.lua`` loop (which calls the
    script's ``decide(key, cost, i)`` for each key of the call and returns the replies)."""
    return lua.load(__package__, name, prelude="_now", epilogue="_batch")


def decisions_of(reply: Sequence[int]) -> list[Decision]:
    """The decisions in a script call's reply: four integers per key, in order (allowed
    0/1, remaining, retry_after and reset_after in microseconds)."""
    values = iter(reply)
    return [
        Decision(allowed == 1, remaining, retry_us / 1e6, reset_us / 1e6)
        for allowed, remaining, retry_us, reset_us in zip(
            values, values, values, values, strict=True
        )
    ]


class Batch(NamedTuple):
    """The script calls of a ``hit_many`` batch: ``calls[i]`` decides the input items at
    ``positions[i]``, in that order."""

    calls: list[lua.Call]
    positions: list[Sequence[int]]
    size: int


class LimiterCore:
    """Keys, script arguments, decisions and the failure policy of a Redis limiter, without
    I/O (see the module docstring). Subclasses set :attr:`script_name`, :attr:`quota`,
    :attr:`window` and the script's two parameters (:attr:`_params`); a shell adds ``hit``
    and ``hit_many`` and says which clients it takes (:attr:`client_types`).

    A shell's ``hit`` is :meth:`script_call`, the one script call (sent or awaited), then
    :meth:`decision` of its reply or :meth:`decision_on_error` of its ``redis.RedisError``;
    its ``hit_many`` is :meth:`batch`, the one pipeline, then :meth:`batch_decisions` or
    :meth:`batch_decisions_on_error`."""

    script_name: ClassVar[str]
    """The algorithm's Lua script, ``<script_name>.lua`` beside this module."""
    client_types: ClassVar[tuple[type, ...]]
    """The Redis clients the shell can talk to (``client_names`` in messages)."""
    client_names: ClassVar[str]
    script: lua.Script
    quota_name: ClassVar[str] = "limit"
    quota: int
    """Units admissible at once (the ``q`` of the ``RateLimit-Policy`` header)."""
    window: float
    """Seconds over which :attr:`quota` applies (the ``w`` of ``RateLimit-Policy``)."""
    _params: tuple[Any, Any]
    """The script's two parameters (ARGV[3] and ARGV[4], see ``_batch.lua``)."""

    def __init__(
        self,
        client: Any,
        *,
        prefix: str,
        fail_open: bool = True,
        clock: Callable[[], float] | None = None,
    ) -> None:
        if not isinstance(client, self.client_types):
            raise TypeError(
                f"redis must be a {self.client_names} client, got {type(client).__name__}"
            )
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
        if not prefix:
            raise ValueError("prefix must be a non-empty string, got ''")
        if not isinstance(fail_open, bool):
            raise TypeError(f"fail_open must be a bool, got {type(fail_open).__name__}")
        if clock is not None and not callable(clock):
            raise TypeError(f"clock must be callable or None, got {type(clock).__name__}")
        self.redis = client
        """The client the shell sends the script calls on; the core never uses it."""
        self.prefix = prefix
        self.fail_open = fail_open
        self.clock = clock
        self.script = script(self.script_name)
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

    def script_call(self, key: str, cost: int = 1) -> lua.Call:
        """The script call that decides ``cost`` units for ``key``: ``(keys, args)``.

        ``TypeError`` for a key that is not a string; ``ValueError`` for a negative cost or
        one above :attr:`quota` (it could never be admitted).
        """
        if not isinstance(key, str):
            raise TypeError(f"key must be a str, got {type(key).__name__}")
        args = (self._now(), self._nonce(), *self._params)
        if type(cost) is int and cost == 1:
            # The default, and most calls: nothing to check (every quota is at least 1), and
            # the script counts 1 when it is sent no cost (one argument less to pack and read).
            return (self.key(key),), args
        return (self.key(key),), (*args, cost_within(cost, self.quota, self.quota_name))

    def batch(self, keys_or_pairs: Iterable[str | tuple[str, int]]) -> Batch:
        """The script calls that decide a batch: one per cluster slot (one in all on a plain
        Redis), cut at :data:`MAX_KEYS_PER_CALL` keys; every item is checked first."""
        names: list[str] = []
        costs: list[int] = []
        for item in keys_or_pairs:
            if isinstance(item, str):
                key, cost = item, 1
            elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
                key, cost = item[0], cost_within(item[1], self.quota, self.quota_name)
            else:
                raise TypeError(
                    f"keys_or_pairs items must be str keys or (str key, int cost) pairs, "
                    f"got {item!r}"
                )
            names.append(self.key(key))
            costs.append(cost)
        groups: Iterable[Sequence[int]] = [range(len(names))]
        if self._cluster:
            # The keys of one script call must share a slot; a key's items stay in order.
            encode = self.redis.get_encoder().encode
            slots: dict[int, list[int]] = {}
            for position, name in enumerate(names):
                slots.setdefault(key_slot(encode(name)), []).append(position)
            groups = slots.values()
        # Every cost 1 (the common case): no costs sent, the script counts 1 per key.
        ones = all(cost == 1 for cost in costs)
        now = self._now()
        calls: list[lua.Call] = []
        positions: list[Sequence[int]] = []
        for group in groups:
            for start in range(0, len(group), MAX_KEYS_PER_CALL):
                part = group[start : start + MAX_KEYS_PER_CALL]
                args = [now, self._nonce(), *self._params]
                if not ones:
                    args += [costs[i] for i in part]
                calls.append(([names[i] for i in part], args))
                positions.append(part)
        return Batch(calls, positions, len(names))

    def decision(self, reply: Sequence[int]) -> Decision:
        """The decision in the reply of a ``hit``'s script call."""
        allowed, remaining, retry_us, reset_us = reply
        return Decision(allowed == 1, remaining, retry_us / 1e6, reset_us / 1e6)

    def batch_decisions(self, batch: Batch, replies: Sequence[Any]) -> list[Decision]:
        """One decision per input item of ``batch``, in input order, from the reply (or the
        ``redis.RedisError``) of each of its calls; see :meth:`decision_on_error`."""
        if len(replies) == 1 and not isinstance(replies[0], redis.RedisError):
            return decisions_of(replies[0])  # one call holds every item, in input order
        decisions: list[Decision | None] = [None] * batch.size
        for reply, part in zip(replies, batch.positions, strict=True):
            if isinstance(reply, redis.RedisError):
                answers = [self.decision_on_error(reply)] * len(part)
            else:
                answers = decisions_of(reply)
            for position, decision in zip(part, answers, strict=True):
                decisions[position] = decision
        return decisions  # type: ignore[return-value]  # every position is filled

    def batch_decisions_on_error(self, batch: Batch, exc: redis.RedisError) -> list[Decision]:
        """One decision per input item of ``batch`` when its pipeline failed as a whole
        (every call got ``exc``); see :meth:`decision_on_error`."""
        return self.batch_decisions(batch, [exc] * len(batch.calls))

    def decision_on_error(self, exc: redis.RedisError) -> Decision:
        """The ``fail_open`` answer when Redis cannot count now (see the module docstring).

        Raises anything else: a full client pool as :class:`PoolExhaustedError`, a fault of
        the command itself as it came.
        """
        if redis_unavailable(exc):
            if self.fail_open:
                return Decision(True, self.quota, 0.0, 0.0, degraded=True)
            retry = FAIL_CLOSED_RETRY_AFTER
            return Decision(False, 0, retry, retry, degraded=True)
        if pool_exhausted(exc) and not isinstance(exc, PoolExhaustedError):
            # redis-py's own pools say only "No connection available." or "Too many
            # connections", which read like an outage.
            raise PoolExhaustedError(
                f"the Redis client's connection pool is full ({exc}); Redis itself was not "
                "asked, so the limiter does not fail open. Give it a bounded blocking pool "
                "(course_lib.services.fail_fast_client) or lower the concurrency"
            ) from exc
        raise exc

    def __repr__(self) -> str:
        name = type(self).__name__
        return f"{name}(quota={self.quota}, window={self.window:g}s, prefix={self.prefix!r})"
