"""A client that honours ``429 Too Many Requests``: wait ``Retry-After``, plus jitter.

:func:`polite_get` retries on 429 after ``Retry-After`` plus random jitter, so clients
refused together do not all come back in the same instant.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

import httpx

from course_lib.validation import non_negative_number, positive_int, positive_number

__all__ = ["Attempt", "polite_get", "retry_after_seconds"]


@dataclass(frozen=True)
class Attempt:
    """One request made by :func:`polite_get`; ``at`` is seconds since the first one."""

    at: float
    status: int
    retry_after: str | None
    ratelimit: str | None
    waited: float


def retry_after_seconds(value: str | None, *, now: float | None = None) -> float | None:
    """The wait a ``Retry-After`` header asks for, in seconds (RFC 9110: delta-seconds or
    an HTTP-date, ``now`` being the epoch time to count from); 1 s if there is none, ``None``
    if it is unreadable (negative, not a number, not a date)."""
    if value is None:
        return 1.0
    text = value.strip()
    if text.isdigit():
        return float(text)
    try:
        when = parsedate_to_datetime(text).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    wait = when - (time.time() if now is None else now)
    return max(0.0, wait) if math.isfinite(wait) else None


def polite_get(
    client: httpx.Client,
    url: str,
    *,
    max_attempts: int = 5,
    jitter: float = 0.5,
    max_wait: float = 60.0,
    rng: random.Random | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> list[Attempt]:
    """GET ``url`` until it is not 429, at most ``max_attempts`` times.

    After a 429 it waits ``Retry-After * (1 + U(0, jitter))`` seconds: never earlier than
    the server asked, and spread out so a crowd refused together does not return together.
    Every wait is bounded: a 429 whose ``Retry-After`` asks for more than ``max_wait``
    seconds, or cannot be read (:func:`retry_after_seconds`), ends the retries at once.
    Returns every attempt made; the last one is the 429 if the retries ended that way.
    ``ValueError``/``TypeError`` for a ``max_attempts`` < 1, a negative ``jitter`` or a
    ``max_wait`` that is not a finite number > 0.
    """
    max_attempts = positive_int("max_attempts", max_attempts)
    jitter = non_negative_number("jitter", jitter)
    max_wait = positive_number("max_wait", max_wait)
    rng = rng or random.Random()
    attempts: list[Attempt] = []
    start = time.monotonic()
    waited = 0.0
    for attempt in range(max_attempts):
        response = client.get(url)
        header = response.headers.get("retry-after")
        attempts.append(
            Attempt(
                round(time.monotonic() - start, 3),
                response.status_code,
                header,
                response.headers.get("ratelimit"),
                round(waited, 3),
            )
        )
        if response.status_code != 429 or attempt == max_attempts - 1:
            break
        asked = retry_after_seconds(header)
        if asked is None or asked > max_wait:
            break
        waited = asked * (1 + rng.uniform(0, jitter))
        sleep(waited)
    return attempts
