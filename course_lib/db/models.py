"""The two tables every lesson of notebook 04 uses: ``users`` and their ``posts``.

They are the course's one model, :mod:`course_lib.models` (notebook 01's caches read and
write the same ``users``), re-exported here under the names this topic has always used:
``Post.user_id`` is a foreign key without an index on purpose, and ``User.posts`` loads
lazily, which is what makes the N+1 possible.
"""

from __future__ import annotations

from course_lib.models import Base, Post, User

__all__ = ["Base", "Post", "User"]
