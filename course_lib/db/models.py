"""The two tables every lesson of notebook 04 uses: ``users`` and their ``posts``.

``Post.user_id`` is a foreign key **without** an index on purpose: PostgreSQL indexes the
referenced primary key, never the referencing column, and the missing index is the lesson
of section 3 (:func:`course_lib.db.add_post_user_index` adds it). ``User.posts`` loads
lazily (``lazy="select"``, SQLAlchemy's default), which is what makes the N+1 possible.
"""

from __future__ import annotations

from sqlalchemy import ForeignKey, Integer, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

__all__ = ["Base", "Post", "User"]


class Base(DeclarativeBase):
    """Declarative base of the course's models; ``Base.metadata`` creates the tables."""


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(80))
    email: Mapped[str] = mapped_column(String(120), unique=True)
    posts: Mapped[list[Post]] = relationship(back_populates="user", order_by="Post.id")

    def __repr__(self) -> str:
        return f"User(id={self.id}, name={self.name!r})"


class Post(Base):
    __tablename__ = "posts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    title: Mapped[str] = mapped_column(String(120))
    likes: Mapped[int] = mapped_column(Integer)
    user: Mapped[User] = relationship(back_populates="posts")

    def __repr__(self) -> str:
        return f"Post(id={self.id}, user_id={self.user_id}, title={self.title!r})"
