"""The generation state machine: one transition table, one writer of ``status``.

Every change is a compare-and-set in SQL, fenced by ``attempt``::

    UPDATE generations SET status = :to, ...
     WHERE id = :id AND attempt = :attempt AND status = ANY(:allowed_from)

A duplicate or late message matches no row, so it changes nothing. The accepted
transition and its history row are written by one statement.

    queued ──▶ submitted ──▶ processing ──▶ completed
       ▲           │              │   └───▶ failed
       └── retry: attempt + 1 ────┘ (also from failed)
    any non-terminal ──▶ cancelled
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import asyncpg


class Status(enum.StrEnum):
    QUEUED = "queued"
    SUBMITTED = "submitted"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL = frozenset({Status.COMPLETED, Status.FAILED, Status.CANCELLED})
NON_TERMINAL = frozenset(Status) - TERMINAL

# to-status -> the statuses it may be reached from. The only source of truth.
TRANSITIONS: Mapping[Status, frozenset[Status]] = {
    Status.SUBMITTED: frozenset({Status.QUEUED}),
    Status.PROCESSING: frozenset({Status.SUBMITTED}),
    Status.COMPLETED: frozenset({Status.SUBMITTED, Status.PROCESSING}),
    Status.FAILED: frozenset({Status.QUEUED, Status.SUBMITTED, Status.PROCESSING}),
    Status.CANCELLED: NON_TERMINAL,
    # A retry starts a new attempt: see ``retry``.
    Status.QUEUED: frozenset({Status.SUBMITTED, Status.PROCESSING, Status.FAILED}),
}

# Columns a transition may set besides status. Names come from code, never from input.
_SETTABLE = frozenset(
    {
        "provider",
        "provider_job_id",
        "flag_rule",
        "error_code",
        "error_message",
        "image_key",
        "image_content_type",
        "progress",
        "next_check_at",
        "deadline_at",
    }
)


def due_in(delta: timedelta) -> datetime:
    """A ``next_check_at`` / ``deadline_at`` value ``delta`` from now."""
    return datetime.now(UTC) + delta


def can_transition(current: Status, to: Status) -> bool:
    return current in TRANSITIONS.get(to, frozenset())


def _sorted_statuses(statuses: frozenset[Status]) -> list[str]:
    return sorted(s.value for s in statuses)


def _transition_sql(to: Status, columns: tuple[str, ...], bump_attempt: bool) -> str:
    sets = ["status = $3", "updated_at = now()"]
    sets += [f"{name} = ${i}" for i, name in enumerate(columns, start=6)]
    if to is Status.COMPLETED:
        sets.append("completed_at = now()")
        sets.append("progress = 1.0")
    if to in TERMINAL and "next_check_at" not in columns:
        sets.append("next_check_at = NULL")
    if bump_attempt:
        sets.append("attempt = attempt + 1")
    return f"""
        WITH upd AS (
            UPDATE generations SET {", ".join(sets)}
             WHERE id = $1 AND attempt = $2 AND status = ANY($4::text[])
         RETURNING *
        ), hist AS (
            INSERT INTO generation_events (generation_id, attempt, status, detail)
            SELECT id, attempt, status, $5::jsonb FROM upd
        )
        SELECT * FROM upd
    """


async def transition(
    conn: asyncpg.Connection | asyncpg.Pool,
    generation_id: UUID,
    *,
    attempt: int,
    to: Status,
    detail: Mapping[str, Any] | None = None,
    **fields: Any,
) -> asyncpg.Record | None:
    """Move one generation to ``to`` if its current status and attempt allow it.

    Returns the updated row, or None when nothing matched (stale, duplicate, or
    already past this point) — callers treat None as "already handled".
    """
    if to is Status.QUEUED:
        raise ValueError("use retry() to start a new attempt")
    return await _run(conn, generation_id, attempt, to, TRANSITIONS[to], detail, fields, False)


async def retry(
    conn: asyncpg.Connection | asyncpg.Pool,
    generation_id: UUID,
    *,
    attempt: int,
    allowed_from: frozenset[Status] = TRANSITIONS[Status.QUEUED],
    detail: Mapping[str, Any] | None = None,
    **fields: Any,
) -> asyncpg.Record | None:
    """Start attempt ``attempt + 1`` from ``queued``; results of older attempts are then ignored."""
    if not allowed_from <= TRANSITIONS[Status.QUEUED]:
        raise ValueError(f"retry is not allowed from {sorted(allowed_from)}")
    fields = {"provider_job_id": None, "progress": None, **fields}
    return await _run(
        conn, generation_id, attempt, Status.QUEUED, allowed_from, detail, fields, True
    )


async def _run(
    conn: asyncpg.Connection | asyncpg.Pool,
    generation_id: UUID,
    attempt: int,
    to: Status,
    allowed_from: frozenset[Status],
    detail: Mapping[str, Any] | None,
    fields: Mapping[str, Any],
    bump_attempt: bool,
) -> asyncpg.Record | None:
    unknown = fields.keys() - _SETTABLE
    if unknown:
        raise ValueError(f"not settable by a transition: {sorted(unknown)}")
    columns = tuple(sorted(fields))
    sql = _transition_sql(to, columns, bump_attempt)
    row = await conn.fetchrow(
        sql,
        generation_id,
        attempt,
        to.value,
        _sorted_statuses(allowed_from),
        dict(detail) if detail else None,  # the pool's jsonb codec encodes it
        *(fields[c] for c in columns),
    )
    if row is not None and to in TERMINAL:
        from core import metrics  # metrics reads this module's statuses: import late

        metrics.GENERATIONS_FINISHED.labels(to.value, row["provider"]).inc()
    return row


async def record_progress(
    conn: asyncpg.Connection | asyncpg.Pool,
    generation_id: UUID,
    *,
    attempt: int,
    progress: float,
    next_check_at: datetime,
) -> asyncpg.Record | None:
    """Progress is not a status change: no history row, and only while processing."""
    return await conn.fetchrow(
        """UPDATE generations SET progress = $3, next_check_at = $4, updated_at = now()
            WHERE id = $1 AND attempt = $2 AND status = 'processing'
              AND (progress IS NULL OR progress < $3)
        RETURNING *""",
        generation_id,
        attempt,
        progress,
        next_check_at,
    )
