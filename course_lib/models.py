"""The course's one SQLAlchemy model of ``users`` and their ``posts``, shared by every topic
that reads them: notebook 01's caches (:mod:`course_lib.caching.lesson.users`) and notebook
04's queries (:mod:`course_lib.db`). Defined once, so a run's schema has one ``users`` table
whichever side created it. Depends on SQLAlchemy only.

Guarantees:

- ``users`` has the columns both sides need, in this order: ``id``, ``name``, ``email``
  (notebook 04's), then ``plan``, ``score``, ``version`` (the caches'). Every column but
  ``id`` has a server default (``''``, ``''``, ``'free'``, ``0``, ``0``), so an insert
  that names only some of them works: :func:`course_lib.db.populate` copies ``id, name,
  email``, and :class:`~course_lib.caching.lesson.users.UserStore` inserts a user from the
  fields a write carries.
- ``email`` is not unique: the write caches promise that every write their store's checks
  accept lands in the database, and a duplicate email is a refusal no check can see
  without a query.
- ``version`` is a 64-bit integer that starts at 0; the write caches compare it to keep
  caches and the database from going backwards.
- ``Post.user_id`` is a foreign key **without** an index on purpose: PostgreSQL indexes the
  referenced primary key, never the referencing column, and the missing index is the lesson
  of notebook 04's section 3 (:func:`course_lib.db.add_post_user_index` adds it).
  ``User.posts`` loads lazily (``lazy="select"``, SQLAlchemy's default), which is what
  makes the N+1 possible.
- Deleting a user never reads ``posts``: a user without posts is deleted in one statement
  (also where no ``posts`` table exists), a user with posts is refused by the foreign key.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, ForeignKey, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

__all__ = ["Base", "Post", "User"]


class Base(DeclarativeBase):
    """Declarative base of the course's models; ``Base.metadata`` creates the tables."""


class User(Base):
    """A row of ``users``; ``posts`` are loaded on first access (one query per user)."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(Text, server_default="")
    email: Mapped[str] = mapped_column(Text, server_default="")
    plan: Mapped[str] = mapped_column(Text, server_default="free")
    score: Mapped[int] = mapped_column(Integer, server_default="0")
    version: Mapped[int] = mapped_column(BigInteger, server_default="0")
    # passive_deletes: deleting a user is one DELETE, and the database (its foreign key)
    # decides about the posts, so a schema that has no posts table (notebook 01's) can
    # delete users too; without it the ORM would first load the posts to orphan them.
    posts: Mapped[list[Post]] = relationship(
        back_populates="user", order_by="Post.id", passive_deletes=True
    )

    def __repr__(self) -> str:
        return f"User(id={self.id}, name={self.name!r})"


class Post(Base):
    """A row of ``posts``, written by one user."""

    __tablename__ = "posts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    title: Mapped[str] = mapped_column(String(120))
    likes: Mapped[int] = mapped_column(Integer)
    user: Mapped[User] = relationship(back_populates="posts")

    def __repr__(self) -> str:
        return f"Post(id={self.id}, user_id={self.user_id}, title={self.title!r})"
