"""A small blog service: one listing request, written slow and then fixed.

``GET /posts`` checks the caller's rate limit (GCRA on Redis), reads the sidebar's post counts
per category, loads the newest page of posts with their authors and renders JSON.

The slow handler (:meth:`Blog.slow_listing`) has three classic faults, each a method of its
own so that a profile names it:

- :meth:`Blog.category_counts_uncached`: an aggregate over every post, on every request;
- :meth:`Blog.load_page_n_plus_1`: one query for the page, then one lazy load per post for
  its author (the N+1: ``PAGE`` posts, ``PAGE`` authors, ``PAGE + 1`` queries);
- :meth:`Blog.render_naive`: JSON built by hand, one Python call per character.

The fixed handler (:meth:`Blog.fast_listing`) caches the counts (cache-aside on Redis), loads
the page and its authors in one joined query and calls ``json.dumps``. Both return the same
bytes. Data is generated from a fixed seed in a schema of the caller's.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from typing import Any

import redis as redis_lib
from sqlalchemy import Engine, ForeignKey, Integer, Text, func, insert, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, joinedload, mapped_column, relationship

from course_lib.caching import CacheAside
from course_lib.profiling import traced
from course_lib.rate_limiting import GCRA

__all__ = ["AUTHORS", "PAGE", "POSTS", "Author", "Blog", "Post", "make_app", "seed_blog"]

PAGE = 50  # posts per listing page
AUTHORS = 200
POSTS = 4000
CATEGORIES = ("python", "databases", "caching", "queues", "profiling", "networking")
_WORDS = (
    "latency", "throughput", "cache", "index", "query", "pool", "lock", "queue", "span",
    "trace", "profile", "sample", "heap", "leak", "worker", "thread", "process", "socket",
    "request", "response", '"quoted"', "naïve", "café",
)  # fmt: skip


class Base(DeclarativeBase):
    pass


class Author(Base):
    __tablename__ = "authors"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(Text)
    bio: Mapped[str] = mapped_column(Text)


class Post(Base):
    __tablename__ = "posts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    author_id: Mapped[int] = mapped_column(ForeignKey("authors.id"), index=True)
    category: Mapped[str] = mapped_column(Text)
    title: Mapped[str] = mapped_column(Text)
    body: Mapped[str] = mapped_column(Text)
    # lazy="select": touching post.author runs one SELECT per post not yet loaded
    author: Mapped[Author] = relationship(lazy="select")


def _sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(words))


def seed_blog(engine: Engine, *, seed: int = 5) -> None:
    """(Re)create ``authors`` and ``posts`` in the engine's schema with fixed-seed rows.

    Post ``i`` is written by author ``i % AUTHORS + 1``, so any page of ``PAGE`` consecutive
    posts has ``PAGE`` different authors: the N+1 is exactly ``PAGE`` extra queries.
    """
    rng = random.Random(seed)
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    authors = [
        {"id": i, "name": f"Author {i}", "bio": _sentence(rng, 12)} for i in range(1, AUTHORS + 1)
    ]
    posts = [
        {
            "id": i,
            "author_id": i % AUTHORS + 1,
            "category": rng.choice(CATEGORIES),
            "title": _sentence(rng, 6),
            "body": _sentence(rng, 60),
        }
        for i in range(1, POSTS + 1)
    ]
    with engine.begin() as conn:
        conn.execute(insert(Author), authors)
        conn.execute(insert(Post), posts)
        conn.exec_driver_sql("ANALYZE authors")
        conn.exec_driver_sql("ANALYZE posts")


def _escape(ch: str) -> str:
    if ch == '"' or ch == "\\":
        return "\\" + ch
    if ch < " ":
        return f"\\u{ord(ch):04x}"
    if ch > "~":
        return f"\\u{ord(ch):04x}" if ord(ch) < 0x10000 else json.dumps(ch)[1:-1]
    return ch


def _quote(text: str) -> str:
    return '"' + "".join(_escape(ch) for ch in text) + '"'


def _naive_value(value: Any) -> str:
    if isinstance(value, str):
        return _quote(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_quote(k)}: {_naive_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_naive_value(v) for v in value) + "]"
    return json.dumps(value)


class Blog:
    """The service: an engine on the blog's schema, a Redis client and a key namespace.

    With ``traced=True`` every stage runs in an OpenTelemetry span of its own (see
    :func:`course_lib.profiling.traced`), so a trace shows handler -> stage -> Redis / SQL.
    """

    def __init__(
        self, engine: Engine, redis: redis_lib.Redis, namespace: str, *, traced: bool = False
    ) -> None:
        self.engine = engine
        self.redis = redis
        self.namespace = namespace
        # a quota no lesson run exhausts: the limiter is here for its cost, not its refusals
        self.limiter = GCRA(redis, 1000, 100_000, prefix=f"{namespace}:rl")
        self.counts_cache = CacheAside(
            redis, lambda _: self.category_counts_uncached(), ttl=60, namespace=f"{namespace}:c"
        )
        if traced:
            self._trace_stages()

    def _trace_stages(self) -> None:
        for name in (
            "check_limit",
            "category_counts_uncached",
            "category_counts_cached",
            "load_page_n_plus_1",
            "load_page_joined",
            "render_naive",
            "render_json",
        ):
            setattr(self, name, traced(name)(getattr(self, name)))

    # -- stages ---------------------------------------------------------------------------
    def check_limit(self, user: str) -> bool:
        return bool(self.limiter.hit(user))

    def category_counts_uncached(self) -> dict[str, int]:
        query = select(Post.category, func.count()).group_by(Post.category).order_by(Post.category)
        with self.engine.connect() as conn:
            return {category: count for category, count in conn.execute(query)}

    def category_counts_cached(self) -> dict[str, int]:
        return self.counts_cache.get("all")

    def load_page_n_plus_1(self) -> list[dict[str, Any]]:
        with Session(self.engine) as session:
            posts = session.scalars(select(Post).order_by(Post.id.desc()).limit(PAGE)).all()
            return [self._item(post) for post in posts]  # post.author: one query each

    def load_page_joined(self) -> list[dict[str, Any]]:
        query = select(Post).options(joinedload(Post.author)).order_by(Post.id.desc()).limit(PAGE)
        with Session(self.engine) as session:
            return [self._item(post) for post in session.scalars(query).all()]

    @staticmethod
    def _item(post: Post) -> dict[str, Any]:
        return {
            "id": post.id,
            "title": post.title,
            "category": post.category,
            "author": {"id": post.author.id, "name": post.author.name, "bio": post.author.bio},
            "body": post.body,
        }

    def render_naive(self, page: dict[str, Any]) -> str:
        return _naive_value(page)

    def render_json(self, page: dict[str, Any]) -> str:
        return json.dumps(page)

    # -- handlers -------------------------------------------------------------------------
    def slow_listing(self, user: str = "alice") -> str:
        """``GET /posts`` as first written: uncached counts, N+1, hand-made JSON."""
        if not self.check_limit(user):
            return json.dumps({"error": "rate limited"})
        counts = self.category_counts_uncached()
        posts = self.load_page_n_plus_1()
        return self.render_naive({"categories": counts, "posts": posts})

    def fast_listing(self, user: str = "alice") -> str:
        """``GET /posts`` fixed: cached counts, one joined query, ``json.dumps``."""
        if not self.check_limit(user):
            return json.dumps({"error": "rate limited"})
        counts = self.category_counts_cached()
        posts = self.load_page_joined()
        return self.render_json({"categories": counts, "posts": posts})

    def clear(self) -> None:
        """Remove every Redis key of this namespace."""
        keys = list(self.redis.scan_iter(match=f"{self.namespace}:*", count=1000))
        if keys:
            self.redis.delete(*keys)


def make_app(blog: Blog) -> Callable[..., Any]:
    """Starlette app: ``GET /posts/slow`` and ``GET /posts/fast``, each handler in a span
    (``GET /posts/slow`` ...), the caller named by the ``X-User`` header."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    handlers = {
        "slow": traced("GET /posts/slow")(blog.slow_listing),
        "fast": traced("GET /posts/fast")(blog.fast_listing),
    }

    def listing(request: Request) -> Response:  # sync: Starlette runs it in a worker thread
        handler = handlers[request.path_params["variant"]]
        body = handler(request.headers.get("x-user", "anonymous"))
        return Response(body, media_type="application/json")

    return Starlette(routes=[Route("/posts/{variant:str}", listing)])
