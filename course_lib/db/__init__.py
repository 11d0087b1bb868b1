"""Database optimisation: models, fast seeding, keyset pages, a real replica and routing.

- :class:`Base`, :class:`User` (``posts`` relationship, lazy by default), :class:`Post`.
- :func:`populate`: deterministic ``COPY``-based seeding; :func:`add_post_user_index`.
- :class:`QueryCounter`: the shared statement counter (:mod:`course_lib.measure`).
- :func:`keyset_page`, :func:`offset_page`, :func:`iter_keyset`: pagination without OFFSET.
- :class:`Router`, :class:`RoutingSession`, :class:`Pins`: writes to the primary, reads to a
  replica, read-your-writes pinned by client until the replica has replayed the write's LSN.
- :class:`ReplicaSet`: a real primary + streaming replica (``pg_basebackup -R``) for one
  ``with`` block.
- :mod:`.lesson`: what stages notebook 04 (the module's code as written, measurements);
  not meant to be copied into a service.
"""

from course_lib.measure import QueryCounter

from .models import Base, Post, User
from .pagination import iter_keyset, keyset_page, offset_page
from .populate import POST_USER_INDEX, Populated, add_post_user_index, populate
from .replicas import ReplicaSet
from .routing import Pins, Router, RoutingSession, format_lsn, parse_lsn

__all__ = [
    "POST_USER_INDEX",
    "Base",
    "Pins",
    "Populated",
    "Post",
    "QueryCounter",
    "ReplicaSet",
    "Router",
    "RoutingSession",
    "User",
    "add_post_user_index",
    "format_lsn",
    "iter_keyset",
    "keyset_page",
    "offset_page",
    "parse_lsn",
    "populate",
]
