"""The backoff decision, as a table: no I/O."""

from __future__ import annotations

import random

import pytest

from core.retry import backoff_s


@pytest.mark.parametrize(
    ("attempt", "low", "high"),
    [(1, 1.0, 2.0), (2, 2.0, 4.0), (3, 4.0, 8.0), (6, 30.0, 60.0), (20, 30.0, 60.0)],
)
def test_backoff_doubles_within_equal_jitter_and_is_capped(
    attempt: int, low: float, high: float
) -> None:
    rng = random.Random(7)
    waits = [backoff_s(attempt, base_s=2.0, cap_s=60.0, rng=rng) for _ in range(200)]
    assert all(low <= w <= high for w in waits)
    assert max(waits) - min(waits) > (high - low) / 2, "jitter must spread retries"


def test_attempt_must_be_positive() -> None:
    with pytest.raises(ValueError, match="attempt"):
        backoff_s(0, base_s=1, cap_s=1)
