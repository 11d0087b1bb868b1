"""A client that honours ``429 Too Many Requests``: wait ``Retry-After``, plus jitter.

:func:`polite_get` retries on 429 after ``Retry-After`` plus random jitter, so clients
refused together do not all come back in the same instant.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx

__all__ = ["Attempt", "polite_get"]


@dataclass(frozen=True)
class Attempt:
    """One request made by :func:`polite_get`; ``at`` is seconds since the first one."""

    at: float
    status: int
    retry_after: str | None
    ratelimit: str | None
    waited: float


def polite_get(
    client: httpx.Client,
    url: str,
    *,
    max_attempts: int = 5,
    jitter: float = 0.5,
    rng: random.Random | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> list[Attempt]:
    """GET ``url`` until it is not 429, at most ``max_attempts`` times.

    After a 429 it waits ``Retry-After * (1 + U(0, jitter))`` seconds: never earlier than
    the server asked, and spread out so a crowd refused together does not return together.
    Returns every attempt made.
    """
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
    if jitter < 0:
        raise ValueError(f"jitter must be >= 0, got {jitter}")
    rng = rng or random.Random()
    attempts: list[Attempt] = []
    start = time.monotonic()
    waited = 0.0
    for _ in range(max_attempts):
        response = client.get(url)
        attempts.append(
            Attempt(
                round(time.monotonic() - start, 3),
                response.status_code,
                response.headers.get("retry-after"),
                response.headers.get("ratelimit"),
                round(waited, 3),
            )
        )
        if response.status_code != 429:
            break
        waited = float(response.headers.get("retry-after", "1")) * (1 + rng.uniform(0, jitter))
        sleep(waited)
    return attempts
