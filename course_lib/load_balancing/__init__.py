"""Load balancing: strategies that pick a backend, and a live rig to measure them.

- Strategies (:mod:`.strategies`): :class:`RoundRobin`, :class:`WeightedRoundRobin`
  (nginx's smooth algorithm), :class:`LeastConnections` (random tie-break),
  :class:`PowerOfTwoChoices`, :class:`IpHash` (nginx's ``ip_hash``, bit for bit),
  :class:`ConsistentHash` (virtual nodes, optional bounded load). All thread-safe, O(1) or
  O(log n) per pick, with ``pick/acquire/take/acquire_server/release/add/remove/
  mark_down/mark_up``;
  :class:`NoBackendAvailable` when every server is down.
- :mod:`.backends`: an ASGI backend with a latency profile, run one per process through
  :func:`course_lib.http.serve_processes`.
- :mod:`.proxy`: an asyncio reverse proxy (HTTP/1.1 parsed by httptools, uvloop where
  installed) with keep-alive upstream connections, passive health checks (nginx's
  ``max_fails`` / ``fail_timeout``) and retry of idempotent requests on the next backend;
  one record per request.
- :mod:`.loadgen`: closed-loop and open-loop load (latency from the intended send time).
- :mod:`.nginx`: the same upstreams as an nginx config, and nginx run on a free port.
- :mod:`.lesson`: what stages notebook 02 (the module's balancers as written, demos).
"""

from .strategies import (
    ConsistentHash,
    IpHash,
    LeastConnections,
    NoBackendAvailable,
    PowerOfTwoChoices,
    RoundRobin,
    Strategy,
    WeightedRoundRobin,
    ip_hash_octets,
)

__all__ = [
    "ConsistentHash",
    "IpHash",
    "LeastConnections",
    "NoBackendAvailable",
    "PowerOfTwoChoices",
    "RoundRobin",
    "Strategy",
    "WeightedRoundRobin",
    "ip_hash_octets",
]
