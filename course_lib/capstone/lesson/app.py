"""The capstone service: a read-mostly feed API built from the course's library parts only.

- ``GET /users/{id}/feed``: the user and the latest posts of the user and of the
  :data:`FOLLOWS` users they follow (users ``id+1 .. id+FOLLOWS``, wrapping around).
- ``POST /posts`` (JSON ``{"user_id": .., "title": ..}``): writes a post on the primary and
  answers its id and the commit's WAL position (``X-Write-LSN``); a client that sends that
  position back (``X-Min-LSN``) on its next read sees its own write, from whichever process
  serves that read (read-your-writes across processes, the LSN carried by the client).

Every pattern is a switch of :class:`Config`, flipped at run time by ``POST /_config`` so
that one set of processes serves every step of the ladder:

- ``eager``: ``selectinload(User.posts)`` (2 statements per feed) instead of the lazy
  ``user.posts`` of each followed user (1 + 9 statements: the N+1);
- ``cache``: :class:`~course_lib.caching.AsyncCacheAside` on the feed, invalidated on write
  for every feed the writer appears in (fan-out on write);
- ``replica``: reads through :class:`~course_lib.db.Router` (a streaming replica, the primary
  when it is down or behind the client's LSN); a replica read that fails is retried once on
  the primary (a read is idempotent), so stopping the replica loses no request;
- ``limit``: :class:`~course_lib.rate_limiting.RateLimitMiddleware` with an asyncio GCRA per
  API key (``X-Api-Key``), failing open when Redis is down.

Every response carries ``X-Statements`` (SQL statements on ``users``/``posts`` this request
ran), ``X-Primary-Statements`` (those of them on the primary) and ``X-Redis`` (Redis round
trips it made), counted in the process, so a load run sees them per request. Lesson code:
it composes caching, rate limiting and db; no library topic imports it.
"""

from __future__ import annotations

import contextvars
import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any

import anyio.to_thread
from redis.exceptions import RedisError
from sqlalchemy import Engine, create_engine, event, select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, selectinload
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from course_lib.caching import AsyncCacheAside
from course_lib.db import Post, Router, User
from course_lib.profiling import traced
from course_lib.rate_limiting import RateLimitMiddleware, api_key_or_ip
from course_lib.rate_limiting.aio import GCRA
from course_lib.services import fail_fast_async_redis

__all__ = [
    "CLIENT_BURST",
    "CLIENT_RATE",
    "FEED_POSTS",
    "FOLLOWS",
    "Config",
    "Service",
    "make_app",
    "pool_size",
]

FOLLOWS = 8  # a feed shows the user and the 8 users they follow: 9 users' posts
FEED_POSTS = 10  # newest posts in a feed
CLIENT_RATE = 40.0  # requests/s each API key may sustain (GCRA)
CLIENT_BURST = 20  # and at once
CACHE_TTL = 30.0  # seconds: bounds how stale a feed can be if an invalidation is lost


def pool_size(processes: int, cores: int | None = None) -> int:
    """Connections per engine per process from notebook 04's rule: about ``2 x cores``
    connections in all for the server's cores, shared by every app process."""
    cores = cores or os.cpu_count() or 1
    return max(1, math.ceil(2 * cores / processes))


@dataclass
class Config:
    """The ladder's switches (all off: the module's way)."""

    eager: bool = False
    cache: bool = False
    replica: bool = False
    limit: bool = False

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Config:
        names = {f.name for f in fields(cls)}
        if not isinstance(data, dict) or set(data) - names:
            raise ValueError(f"config must be an object with keys among {sorted(names)}")
        for name, value in data.items():
            if not isinstance(value, bool):
                raise TypeError(f"config {name} must be a bool, got {type(value).__name__}")
        return cls(**data)


class _Counts:
    """What one request cost: statements and Redis round trips."""

    __slots__ = ("on_primary", "redis", "statements")

    def __init__(self) -> None:
        self.statements = 0
        self.on_primary = 0
        self.redis = 0


# The request being served; the SQL event runs in a worker thread, which anyio starts with a
# copy of this context, so it finds the same _Counts object.
_current: contextvars.ContextVar[_Counts | None] = contextvars.ContextVar("capstone_counts")


def _counter(primary: bool) -> Callable[..., None]:
    def count(conn: Any, cursor: Any, statement: str, *rest: Any) -> None:
        counts = _current.get(None)
        # only the request's own tables: the router's probes and LSN reads are bookkeeping
        if counts is not None and (" users" in statement or " posts" in statement):
            counts.statements += 1
            counts.on_primary += primary

    return count


def _count_redis(client: Any) -> None:
    """Count each command ``client`` sends (a round trip: no pipelines here) against the
    current request, skipping what a connection sends while it connects."""
    pool = client.connection_pool
    base = pool.connection_class

    class Counting(base):  # type: ignore[misc, valid-type]
        _handshake = False

        async def connect_check_health(self, *args: Any, **kwargs: Any) -> None:
            self._handshake = True
            try:
                await super().connect_check_health(*args, **kwargs)
            finally:
                self._handshake = False

        async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
            counts = _current.get(None)
            if counts is not None and not self._handshake:
                counts.redis += 1
            await super().send_packed_command(command, check_health)

    pool.connection_class = Counting


def _feed_ids(user_id: int, users: int) -> list[int]:
    return [user_id] + [(user_id + k - 1) % users + 1 for k in range(1, FOLLOWS + 1)]


class Service:
    """One process's service: engines, router, Redis client, cache, limiter and switches.

    ``users`` is how many users the table holds (for the follow ring). Build it in the
    process that serves it (the cache belongs to one event loop).
    """

    def __init__(
        self,
        *,
        primary_url: str,
        replica_url: str,
        redis_url: str,
        users: int,
        processes: int = 1,
        namespace: str = "cap",
        config: Config | None = None,
    ) -> None:
        size = pool_size(processes)
        self.users = users
        self.config = config or Config()
        self.primary = create_engine(primary_url, pool_size=size, max_overflow=0)
        self.replica = create_engine(replica_url, pool_size=size, max_overflow=0)
        event.listen(self.primary, "before_cursor_execute", _counter(primary=True))
        event.listen(self.replica, "before_cursor_execute", _counter(primary=False))
        # probe_timeout well under a request's budget: a stopped replica costs reads little
        self.router = Router(self.primary, self.replica, probe_interval=0.2, probe_timeout=0.3)
        self.redis = fail_fast_async_redis(redis_url, timeout=0.25, max_connections=64)
        _count_redis(self.redis)
        # single-flight per process: concurrent misses of a feed wait for one load in the
        # process, without polling Redis for a lock (at most one load per process per key)
        self.cache = AsyncCacheAside(
            self.redis,
            self._load_cached,
            ttl=CACHE_TTL,
            namespace=f"{namespace}:feed",
            stampede="local",
        )
        self.limiter = GCRA(self.redis, CLIENT_RATE, CLIENT_BURST, prefix=f"{namespace}:rl")
        self.missed_invalidations = 0

    def engines(self) -> list[Engine]:
        return [self.primary, self.replica]

    def close(self) -> None:
        self.router.dispose()
        for engine in self.engines():
            engine.dispose()

    # -- reads -----------------------------------------------------------------------------
    def _session(self, min_lsn: str | None) -> Session:
        if self.config.replica:
            return self.router.session(min_lsn=min_lsn)
        return Session(self.primary)  # the module's way: every read on the primary

    def _query_feed(self, session: Session, user_id: int) -> dict[str, Any] | None:
        query = select(User).where(User.id.in_(_feed_ids(user_id, self.users)))
        if self.config.eager:
            query = query.options(selectinload(User.posts))
        people = {user.id: user for user in session.scalars(query)}
        if user_id not in people:
            return None
        # without selectinload each user.posts below is one more SELECT: the N+1
        posts = [post for user in people.values() for post in user.posts]
        posts.sort(key=lambda post: post.id, reverse=True)
        me = people[user_id]
        return {
            "user": {"id": me.id, "name": me.name},
            "posts": [
                {"id": p.id, "user_id": p.user_id, "title": p.title, "likes": p.likes}
                for p in posts[:FEED_POSTS]
            ],
        }

    @traced("load feed")
    def load_feed(self, user_id: int, min_lsn: str | None = None) -> dict[str, Any] | None:
        """The feed from the database (the replica when switched on, else the primary)."""
        try:
            with self._session(min_lsn) as session:
                return self._query_feed(session, user_id)
        except DBAPIError:
            if not self.config.replica:
                raise
        with Session(self.primary) as session:  # the replica failed mid-read: once more
            return self._query_feed(session, user_id)

    async def _load_cached(self, user_id: int) -> dict[str, Any] | None:
        return await anyio.to_thread.run_sync(self.load_feed, user_id)

    async def feed(self, user_id: int, min_lsn: str | None) -> dict[str, Any] | None:
        # A client that just wrote reads past the cache (its fresh write is not cached yet,
        # and a replica behind its LSN must not fill the cache for everyone).
        if self.config.cache and min_lsn is None:
            return await self.cache.get(user_id)
        return await anyio.to_thread.run_sync(self.load_feed, user_id, min_lsn)

    # -- writes ----------------------------------------------------------------------------
    @traced("insert post")
    def insert_post(self, user_id: int, title: str) -> tuple[int, str | None]:
        with self.router.session() as session:
            post = Post(user_id=user_id, title=title, likes=0)
            session.add(post)
            session.flush()  # the id now: reading it after the commit would reload the row
            post_id = post.id
            session.commit()
            return post_id, session.write_lsn

    async def write(self, user_id: int, title: str) -> tuple[int, str | None]:
        post_id, lsn = await anyio.to_thread.run_sync(self.insert_post, user_id, title)
        if self.config.cache:
            # every feed that shows this user's posts: theirs and their followers'
            for reader in _followers_and_self(user_id, self.users):
                try:
                    await self.cache.invalidate(reader)
                except RedisError:
                    # The post is committed: answer it. A Redis that comes back with its data
                    # serves this feed stale for at most CACHE_TTL; ours restarts empty.
                    self.missed_invalidations += 1
        return post_id, lsn


def _followers_and_self(user_id: int, users: int) -> list[int]:
    return [(user_id - k - 1) % users + 1 for k in range(FOLLOWS + 1)]


class _Counted:
    """Outermost ASGI layer: counts the request's statements and Redis round trips and adds
    them to the response as ``X-Statements`` / ``X-Redis``."""

    def __init__(self, app: Callable[..., Any]) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        counts = _Counts()
        token = _current.set(counts)

        async def counted_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-statements", str(counts.statements).encode()),
                    (b"x-primary-statements", str(counts.on_primary).encode()),
                    (b"x-redis", str(counts.redis).encode()),
                    (b"x-backend", str(os.getpid()).encode()),
                ]
            await send(message)

        try:
            await self.app(scope, receive, counted_send)
        finally:
            _current.reset(token)


def build_app(service: Service, *, api_keys: frozenset[str]) -> Callable[..., Any]:
    """The ASGI app of ``service``: routes, the limiter switch and the counters."""

    async def feed(request: Request) -> Response:
        user_id = int(request.path_params["user_id"])
        body = await traced("GET /users/{id}/feed")(service.feed)(
            user_id, request.headers.get("x-min-lsn")
        )
        if body is None:
            return JSONResponse({"detail": "no such user"}, status_code=404)
        return JSONResponse(body)

    async def create_post(request: Request) -> Response:
        data = await request.json()
        post_id, lsn = await traced("POST /posts")(service.write)(
            int(data["user_id"]), str(data["title"])[:120]
        )
        headers = {"x-write-lsn": lsn} if lsn else {}
        return JSONResponse({"id": post_id, "lsn": lsn}, status_code=201, headers=headers)

    async def set_config(request: Request) -> Response:
        service.config = Config.from_json(await request.json())
        return JSONResponse(asdict(service.config))

    async def stats(request: Request) -> Response:
        return JSONResponse(
            {
                "pid": os.getpid(),
                "cache": service.cache.stats,
                "missed_invalidations": service.missed_invalidations,
                "routed": service.router.routed,
            }
        )

    api = Starlette(
        routes=[
            Route("/users/{user_id:int}/feed", feed),
            Route("/posts", create_post, methods=["POST"]),
        ]
    )
    limited = RateLimitMiddleware(api, service.limiter, key=api_key_or_ip(api_keys))
    admin = Starlette(
        routes=[
            Route("/_config", set_config, methods=["POST"]),
            Route("/_stats", stats),
        ]
    )

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/_"):
            await admin(scope, receive, send)
        elif service.config.limit:
            await limited(scope, receive, send)
        else:
            await api(scope, receive, send)

    return _Counted(app)


def make_app(
    *,
    primary_url: str,
    replica_url: str,
    redis_url: str,
    users: int,
    processes: int = 1,
    namespace: str = "cap",
    api_keys: list[str] | None = None,
    config: dict[str, bool] | None = None,
) -> Callable[..., Any]:
    """App factory for :func:`course_lib.http.serve_processes` (JSON keyword arguments)."""
    service = Service(
        primary_url=primary_url,
        replica_url=replica_url,
        redis_url=redis_url,
        users=users,
        processes=processes,
        namespace=namespace,
        config=Config.from_json(config or {}),
    )
    return build_app(service, api_keys=frozenset(api_keys or ()))


def config_json(config: Config) -> str:
    """The body of ``POST /_config`` for ``config``."""
    return json.dumps(asdict(config))
