"""The transition table, as data: what may follow what."""

from __future__ import annotations

import pytest

from core.lifecycle import NON_TERMINAL, TERMINAL, TRANSITIONS, Status, can_transition

S = Status


@pytest.mark.parametrize(
    ("current", "to", "allowed"),
    [
        (S.QUEUED, S.SUBMITTED, True),
        (S.SUBMITTED, S.PROCESSING, True),
        (S.SUBMITTED, S.COMPLETED, True),  # a fast worker's completed may beat its processing
        (S.PROCESSING, S.COMPLETED, True),
        (S.PROCESSING, S.FAILED, True),
        (S.QUEUED, S.FAILED, True),
        (S.FAILED, S.QUEUED, True),  # a user retry starts a new attempt
        (S.PROCESSING, S.QUEUED, True),  # a reconciler retry
        (S.QUEUED, S.CANCELLED, True),
        (S.PROCESSING, S.CANCELLED, True),
        (S.COMPLETED, S.PROCESSING, False),
        (S.COMPLETED, S.FAILED, False),
        (S.COMPLETED, S.CANCELLED, False),
        (S.CANCELLED, S.COMPLETED, False),
        (S.FAILED, S.COMPLETED, False),
        (S.PROCESSING, S.SUBMITTED, False),
        (S.QUEUED, S.PROCESSING, False),
        (S.QUEUED, S.COMPLETED, False),
        (S.CANCELLED, S.QUEUED, False),
        (S.COMPLETED, S.QUEUED, False),
    ],
)
def test_transition_table(current: Status, to: Status, allowed: bool) -> None:
    assert can_transition(current, to) is allowed


def test_terminal_states_have_no_way_out_but_a_failed_retry() -> None:
    for status in TERMINAL:
        exits = {to for to, sources in TRANSITIONS.items() if status in sources}
        assert exits == ({S.QUEUED} if status is S.FAILED else set())


def test_every_non_terminal_state_can_be_cancelled_and_every_state_is_reachable() -> None:
    assert TRANSITIONS[S.CANCELLED] == NON_TERMINAL
    reachable = {S.QUEUED} | set(TRANSITIONS)
    assert reachable == set(Status)


async def test_transition_refuses_unknown_columns_and_queued_without_retry() -> None:
    import uuid

    from core import lifecycle

    with pytest.raises(ValueError, match="retry"):
        await lifecycle.transition(None, uuid.uuid4(), attempt=1, to=S.QUEUED)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not settable"):
        await lifecycle.transition(None, uuid.uuid4(), attempt=1, to=S.FAILED, status="completed")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not allowed"):
        await lifecycle.retry(None, uuid.uuid4(), attempt=1, allowed_from=frozenset({S.COMPLETED}))  # type: ignore[arg-type]
