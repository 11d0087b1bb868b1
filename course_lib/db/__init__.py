"""Database optimisation: models, fast seeding, keyset pages, a real replica and routing.

- :class:`Base`, :class:`User` (``posts`` relationship, lazy by default), :class:`Post`.
- :func:`populate`: deterministic ``COPY``-based seeding; :func:`add_post_user_index`.
- :class:`QueryCounter`: the shared statement counter (:mod:`course_lib.measure`).
- :func:`keyset_page`, :func:`offset_page`, :func:`iter_keyset`: pagination without OFFSET.
- :class:`Router`, :class:`RoutingSession`, :class:`Pins`, :class:`ReplicaStatus`: writes to
  the primary, reads spread over the replicas within ``max_lag``, read-your-writes from any
  replica that has replayed the client's last write (the primary when none has).
- :mod:`.lesson`: what stages notebook 04 (the module's code as written, measurements, and
  :class:`~course_lib.db.lesson.replicas.ReplicaSet`, a real primary + N streaming replicas
  for one ``with`` block); not meant to be copied into a service.
"""

from course_lib.measure import QueryCounter

from .models import Base, Post, User
from .pagination import iter_keyset, keyset_page, offset_page
from .populate import POST_USER_INDEX, Populated, add_post_user_index, populate
from .routing import Pins, ReplicaStatus, Router, RoutingSession, format_lsn, parse_lsn

__all__ = [
    "POST_USER_INDEX",
    "Base",
    "Pins",
    "Populated",
    "Post",
    "QueryCounter",
    "ReplicaStatus",
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
