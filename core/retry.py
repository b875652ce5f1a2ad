"""When to try again: a pure decision, tested as a table.

Exponential backoff with "equal jitter": attempt n waits between half and all of
``min(cap, base * 2**(n-1))``. The floor keeps a retry storm from landing at once on a
provider that just failed; the jitter spreads replicas' retries apart.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

from core.settings import Settings


def backoff_s(
    attempt: int, *, base_s: float, cap_s: float, rng: random.Random | None = None
) -> float:
    """Seconds to wait before starting the attempt after ``attempt`` (1-based)."""
    if attempt < 1:
        raise ValueError("attempt starts at 1")
    ceiling = min(cap_s, base_s * 2 ** (attempt - 1))
    return ceiling / 2 + (rng or random).uniform(0, ceiling / 2)


def next_attempt_due(attempt: int, settings: Settings) -> datetime:
    """When the attempt after ``attempt`` may be dispatched (its ``next_check_at``)."""
    delay = backoff_s(attempt, base_s=settings.retry_base_s, cap_s=settings.retry_cap_s)
    return datetime.now(UTC) + timedelta(seconds=delay)
