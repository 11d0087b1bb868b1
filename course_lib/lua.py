"""The one Lua script loader of ``course_lib``: ``.lua`` files read once, run with ``EVALSHA``.

A :class:`Script` is read from a package's folder once per process (:func:`load` is
cached) and called by its SHA1 with ``EVALSHA``. The source is sent (``SCRIPT LOAD``) only
when the server answers ``NOSCRIPT``: on first use, after a restart or a ``SCRIPT FLUSH``.
So a call is one round trip, and a pipeline of calls is one round trip too (plus one
reload round trip, the first time). In a ``MULTI``/``EXEC`` transaction, where a missing
script could not be reloaded without breaking atomicity, :meth:`Script.queue` sends the
source itself. redis-py's ``register_script`` instead checks
``SCRIPT EXISTS`` before every pipeline: an extra round trip each time.

The same :class:`Script` works with ``redis.Redis``, ``redis.cluster.RedisCluster`` and
their ``redis.asyncio`` twins, with one method per kind of client, as redis-py itself
splits ``redis`` from ``redis.asyncio``: :meth:`Script.__call__`, :meth:`Script.pipeline`
and :meth:`Script.bind` for a sync client; :meth:`Script.acall`, :meth:`Script.apipeline`
and :meth:`Script.abind` (coroutines) for an asyncio client. Handing an asyncio client to a
sync method (or the reverse) raises ``TypeError`` instead of returning an un-awaited
coroutine. On a cluster, a call goes to the node that owns its first key; ``SCRIPT LOAD``
is sent to every primary.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Awaitable, Callable, Sequence
from importlib import resources
from typing import Any

import redis
import redis.asyncio
import redis.asyncio.cluster
from redis.cluster import RedisCluster

__all__ = ["Call", "Script", "load"]

Call = tuple[Sequence[Any], Sequence[Any]]
"""One script call in a pipeline: ``(keys, args)``."""

_ASYNC = (redis.asyncio.Redis, redis.asyncio.cluster.RedisCluster)
_CLUSTER = (RedisCluster, redis.asyncio.cluster.RedisCluster)


def _require(client: Any, *, asyncio: bool) -> None:
    # A sync method given an asyncio client would hand back an un-awaited coroutine.
    if isinstance(client, _ASYNC) != asyncio:
        if asyncio:
            wanted, use = "an asyncio", "__call__/pipeline/bind"
        else:
            wanted, use = "a sync", "acall/apipeline/abind"
        raise TypeError(
            f"this method takes {wanted} Redis client, got {type(client).__name__}; "
            f"use {use} for it"
        )


class Script:
    """A Lua script known by its SHA1; see the module docstring for the guarantees."""

    __slots__ = ("name", "sha", "source")

    def __init__(self, name: str, source: str) -> None:
        if not isinstance(source, str) or not source.strip():
            raise ValueError(f"source of script {name!r} must be non-empty Lua text")
        self.name = name
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    def _load_args(self, client: Any) -> tuple[Any, ...]:
        # On a cluster the script must be known to whichever primary owns the key.
        if isinstance(client, _CLUSTER):
            return ("SCRIPT LOAD", self.source, {"target_nodes": client.PRIMARIES})
        return ("SCRIPT LOAD", self.source, {})

    def _send_load(self, client: Any) -> Any:
        command, source, options = self._load_args(client)
        return client.execute_command(command, source, **options)

    def __call__(self, client: Any, keys: Sequence[Any] = (), args: Sequence[Any] = ()) -> Any:
        """Run the script on a sync ``client``: its reply."""
        _require(client, asyncio=False)
        evalsha = ("EVALSHA", self.sha, len(keys), *keys, *args)
        try:
            return client.execute_command(*evalsha)
        except redis.exceptions.NoScriptError:
            self._send_load(client)
            return client.execute_command(*evalsha)

    async def acall(self, client: Any, keys: Sequence[Any] = (), args: Sequence[Any] = ()) -> Any:
        """Run the script on an asyncio ``client``: its reply."""
        _require(client, asyncio=True)
        evalsha = ("EVALSHA", self.sha, len(keys), *keys, *args)
        try:
            return await client.execute_command(*evalsha)
        except redis.exceptions.NoScriptError:
            await self._send_load(client)
            return await client.execute_command(*evalsha)

    def queue(self, transaction: Any, keys: Sequence[Any] = (), args: Sequence[Any] = ()) -> None:
        """Queue the script on a ``MULTI``/``EXEC`` pipeline, sent as ``EVAL`` with its source.

        Inside a transaction a ``NOSCRIPT`` reply comes only at ``EXEC``, after the other
        commands have run, so it cannot be repaired by a reload; sending the source makes
        the transaction all-or-nothing. Redis caches the script, so later ``EVALSHA`` calls
        find it.
        """
        transaction.execute_command("EVAL", self.source, len(keys), *keys, *args)

    def bind(self, client: Any) -> Callable[..., Any]:
        """``script.bind(client)(keys=..., args=...)``: the script with its sync client fixed."""
        _require(client, asyncio=False)
        return functools.partial(self, client)

    def abind(self, client: Any) -> Callable[..., Awaitable[Any]]:
        """``await script.abind(client)(keys=..., args=...)``: the same for an asyncio client."""
        _require(client, asyncio=True)
        return functools.partial(self.acall, client)

    def pipeline(self, client: Any, calls: Sequence[Call]) -> list[Any]:
        """Run every call in one pipelined round trip on a sync ``client``; replies in order.

        A reply is the script's result or the ``redis.RedisError`` that call got (errors
        are returned, not raised, so one refused call does not hide the others). Calls that
        found the script missing are sent again once after ``SCRIPT LOAD``. A connection
        failure of the whole pipeline raises.
        """
        _require(client, asyncio=False)
        replies = self._send(client, calls)
        missing = _missing(replies)
        if missing:
            self._send_load(client)
            again = self._send(client, [calls[i] for i in missing])
            for i, reply in zip(missing, again, strict=True):
                replies[i] = reply
        return replies

    async def apipeline(self, client: Any, calls: Sequence[Call]) -> list[Any]:
        """:meth:`pipeline` for an asyncio ``client``."""
        _require(client, asyncio=True)
        replies = await self._send(client, calls)
        missing = _missing(replies)
        if missing:
            await self._send_load(client)
            again = await self._send(client, [calls[i] for i in missing])
            for i, reply in zip(missing, again, strict=True):
                replies[i] = reply
        return replies

    def _send(self, client: Any, calls: Sequence[Call]) -> Any:
        pipe = client.pipeline(transaction=False)
        for keys, args in calls:
            pipe.execute_command("EVALSHA", self.sha, len(keys), *keys, *args)
        return pipe.execute(raise_on_error=False)

    def __repr__(self) -> str:
        return f"Script({self.name!r}, sha={self.sha[:10]})"


def _missing(replies: list[Any]) -> list[int]:
    return [i for i, r in enumerate(replies) if isinstance(r, redis.exceptions.NoScriptError)]


@functools.cache
def load(
    package: str, name: str, *, prelude: str | None = None, epilogue: str | None = None
) -> Script:
    """The script ``<name>.lua`` of ``package`` (a dotted package name), read once.

    ``prelude`` and ``epilogue`` name other ``.lua`` files of the same package whose text
    is put before and after the script: shared definitions (such as the rate limiters'
    server clock) and a shared main part (such as the rate limiters' loop over a batch).
    """
    folder = resources.files(package)
    try:
        text = (folder / f"{name}.lua").read_text()
        if prelude is not None:
            text = (folder / f"{prelude}.lua").read_text() + text
        if epilogue is not None:
            text += (folder / f"{epilogue}.lua").read_text()
    except FileNotFoundError as exc:
        raise ValueError(f"no Lua script {exc.filename!r} in package {package!r}") from None
    return Script(f"{package}/{name}", text)
