"""Request mixes for experiments: which keys a workload asks for, reproducibly.

Real traffic is skewed: a few keys (users, products, client addresses) get most requests.
:func:`zipf_keys` draws such a mix from a fixed random seed, so a chart or a count built on
it is the same on every run.
"""

from __future__ import annotations

import random

from course_lib.validation import positive_int, positive_number

__all__ = ["zipf_keys"]


def zipf_keys(n_keys: int, n_requests: int, *, s: float = 1.1, seed: int = 0) -> list[int]:
    """``n_requests`` ids in ``1..n_keys`` drawn with Zipf popularity (rank ``r`` ~ 1/r^s).

    Popularity does not follow id order (ranks are shuffled). Same arguments, same list.
    """
    n_keys = positive_int("n_keys", n_keys)
    n_requests = positive_int("n_requests", n_requests)
    s = positive_number("s", s)
    rng = random.Random(seed)
    weights = [1 / rank**s for rank in range(1, n_keys + 1)]
    ids = list(range(1, n_keys + 1))
    rng.shuffle(ids)
    return rng.choices(ids, weights=weights, k=n_requests)
