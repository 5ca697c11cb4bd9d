"""How the project's own clients come back after "busy": ``Retry-After``, then jittered exponential back-off.

A client refused with 429 or 503 (the gateway: slots full, shutting down, Triton's queue full or Triton away)
waits at least what ``Retry-After`` asks, plus a random share of an exponentially growing window, so that
clients refused together do not all come back together (a synchronised retry is the next overload)::

    delay = retry_after + uniform(0, min(cap_s, base_s * 2 ** (attempt - 1)))

Used by ``FashionClient`` (for Triton's own "busy" answers, which carry no Retry-After), by the overload
benchmark's polite clients (``loadtest.overload``) and, as a copy the tests compare with this one, by the
Locust users' polite mode (``loadtest/locustfile.py`` must run without this project).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

RETRY_STATUSES = (429, 503)


@dataclass(frozen=True)
class Backoff:
    """``attempts`` tries at most (the first included); waits as in the module docstring."""

    attempts: int = 4
    base_s: float = 0.1
    cap_s: float = 5.0

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.base_s <= 0 or self.cap_s < self.base_s:
            raise ValueError(f"need attempts >= 1 and 0 < base_s <= cap_s, got {self}")

    def delay_s(self, attempt: int, retry_after_s: float = 0.0, rng: random.Random | None = None) -> float:
        """Seconds to wait before try ``attempt + 1``, after the ``attempt``-th refusal in a row (1-based)."""
        window = min(self.cap_s, self.base_s * 2 ** max(0, attempt - 1))
        return max(0.0, retry_after_s) + (rng or random).uniform(0.0, window)


def retry_after_s(value: str | None, default: float = 1.0) -> float:
    """A ``Retry-After`` header in seconds (the HTTP-date form is not sent by the gateway: ``default``)."""
    try:
        return min(60.0, max(0.0, float(value))) if value is not None else default
    except ValueError:
        return default
