"""The generation state machine: one transition table, one writer of ``status``.

Every change is a compare-and-set in SQL, fenced by ``attempt``::

    UPDATE generations SET status = :to, ...
     WHERE id = :id AND attempt = :attempt AND status = ANY(:allowed_from)

A duplicate or late message matches no row, so it changes nothing. The accepted
transition, its history row and the generation's next check (``generation_checks``:
set when the change names one, deleted when the generation finishes) are written by one
statement.

    queued ──▶ submitted ──▶ processing ──▶ completed
       ▲           │              │   └───▶ failed
       └── retry: attempt + 1 ────┘ (also from failed)
    any non-terminal ──▶ cancelled
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
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

# Columns a transition may set besides status, with their SQL types (for the arrays of
# a batch). Names come from code, never from input.
_SETTABLE: Mapping[str, str] = {
    "provider": "text",
    "provider_job_id": "text",
    "flag_rule": "text",
    "runner": "text",
    "error_code": "text",
    "error_message": "text",
    "image_key": "text",
    "image_content_type": "text",
    "progress": "float8",
    "deadline_at": "timestamptz",
}

# A change's field that is not a column: when the reconciler looks at the generation
# next (``generation_checks.due_at``, a datetime; NOT NULL, so None is refused by the
# database and nothing changes). A change to a live status names one; one that finishes
# the generation deletes its check unless it names one (a completed generation is
# looked at again if its thumbnail never comes).
CHECK = "next_check_at"


def due_in(delta: timedelta) -> datetime:
    """A ``next_check_at`` / ``deadline_at`` value ``delta`` from now."""
    return datetime.now(UTC) + delta


def can_transition(current: Status, to: Status) -> bool:
    return current in TRANSITIONS.get(to, frozenset())


def _sorted_statuses(statuses: frozenset[Status]) -> list[str]:
    return sorted(s.value for s in statuses)


def _sets(to: Status, values: Mapping[str, str], bump_attempt: bool) -> str:
    """The SET list of a transition: status, then each column from its value expression."""
    sets = ["status = $3", "updated_at = now()"]
    sets += [f"{name} = {value}" for name, value in values.items()]
    if to is Status.SUBMITTED:
        sets.append("submitted_at = now()")  # the duration metric's start
    if to is Status.COMPLETED:
        sets.append("completed_at = now()")
        sets.append("progress = 1.0")
    if bump_attempt:
        sets.append("attempt = attempt + 1")
    return ", ".join(sets)


def check_cte(due: str | None, source: str = "upd") -> str:
    """The CTE (``, chk AS (...)``, after the one named ``upd``) that leaves the moved
    generations their check: ``due`` (an expression over ``source``, which holds the
    moved rows' ``id``), or none at all when ``due`` is None. Every statement that moves
    a generation writes its check this way, so the two never disagree after a crash."""
    if due is None:
        return """, chk AS (
            DELETE FROM generation_checks c USING upd WHERE c.generation_id = upd.id
        )"""
    return f""", chk AS (
        INSERT INTO generation_checks (generation_id, due_at)
        SELECT id, {due} FROM {source}
            ON CONFLICT (generation_id) DO UPDATE SET due_at = EXCLUDED.due_at
    )"""


def _leaves(to: Status, due: str | None, source: str) -> str:
    """A transition's check: the one it names, none once finished, else the one it had."""
    return check_cte(due, source) if due is not None or to in TERMINAL else ""


def _split(fields: Mapping[str, Any]) -> tuple[tuple[str, ...], bool]:
    """A change's columns (sorted, checked) and whether it names a check."""
    unknown = fields.keys() - _SETTABLE.keys() - {CHECK}
    if unknown:
        raise ValueError(f"not settable by a transition: {sorted(unknown)}")
    return tuple(sorted(fields.keys() - {CHECK})), CHECK in fields


def _transition_sql(to: Status, columns: tuple[str, ...], check: bool, bump_attempt: bool) -> str:
    values = {name: f"${i}" for i, name in enumerate(columns, start=6)}
    due = f"${6 + len(columns)}::timestamptz" if check else None
    return f"""
        WITH upd AS (
            UPDATE generations SET {_sets(to, values, bump_attempt)}
             WHERE id = $1 AND attempt = $2 AND status = ANY($4::text[])
         RETURNING *
        ), hist AS (
            INSERT INTO generation_events (generation_id, attempt, status, detail)
            SELECT id, attempt, status, $5::jsonb FROM upd
        ){_leaves(to, due, "upd")}
        SELECT * FROM upd
    """


async def transition(
    conn: asyncpg.Connection | asyncpg.Pool,
    generation_id: UUID,
    *,
    attempt: int,
    to: Status,
    allowed_from: frozenset[Status] | None = None,
    detail: Mapping[str, Any] | None = None,
    **fields: Any,
) -> asyncpg.Record | None:
    """Move one generation to ``to`` if its current status and attempt allow it (and
    its status is one of ``allowed_from``, when given: a decision taken on a status
    seen earlier).

    Returns the updated row, or None when nothing matched (stale, duplicate, or
    already past this point) — callers treat None as "already handled".
    """
    if to is Status.QUEUED:
        raise ValueError("use retry() to start a new attempt")
    if allowed_from is None:
        allowed_from = TRANSITIONS[to]
    elif not allowed_from <= TRANSITIONS[to]:
        raise ValueError(f"{to} is not allowed from {sorted(allowed_from)}")
    return await _run(conn, generation_id, attempt, to, allowed_from, detail, fields, False)


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
    fields = {"provider_job_id": None, "progress": None, "runner": None, **fields}
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
    columns, check = _split(fields)
    sql = _transition_sql(to, columns, check, bump_attempt)
    row = await conn.fetchrow(
        sql,
        generation_id,
        attempt,
        to.value,
        _sorted_statuses(allowed_from),
        dict(detail) if detail else None,  # the pool's jsonb codec encodes it
        *(fields[c] for c in columns),
        *((fields[CHECK],) if check else ()),
    )
    if row is not None and to in TERMINAL:
        _count_finished(to, [row])
    return row


@dataclass(frozen=True, slots=True)
class Change:
    """One generation's part in a batch transition (``transition_many``)."""

    generation_id: UUID
    attempt: int
    fields: Mapping[str, Any] = field(default_factory=dict)
    detail: Mapping[str, Any] | None = None


def _batch_sql(to: Status, columns: tuple[str, ...], check: bool) -> str:
    # Every array has one element per change; unnest zips them into input rows.
    arrays = ["$1::uuid[]", "$2::int[]", "$5::text[]"]
    arrays += [f"${i}::{_SETTABLE[name]}[]" for i, name in enumerate(columns, start=6)]
    names = ["id", "attempt", "detail", *columns]
    if check:
        arrays.append(f"${6 + len(columns)}::timestamptz[]")
        names.append("due")
    values = {name: f"i.{name}" for name in columns}
    return f"""
        WITH i AS (
            SELECT * FROM unnest({", ".join(arrays)}) AS i({", ".join(names)})
        ), upd AS (
            UPDATE generations g SET {_sets(to, values, False)}
              FROM i
             WHERE g.id = i.id AND g.attempt = i.attempt AND g.status = ANY($4::text[])
         RETURNING g.*
        ), hist AS (
            INSERT INTO generation_events (generation_id, attempt, status, detail)
            SELECT upd.id, upd.attempt, upd.status, i.detail::jsonb FROM upd JOIN i USING (id)
        ){_leaves(to, "i.due" if check else None, "upd JOIN i USING (id)")}
        SELECT * FROM upd
    """


async def transition_many(
    conn: asyncpg.Connection | asyncpg.Pool, to: Status, changes: Sequence[Change]
) -> list[asyncpg.Record]:
    """``transition`` for many generations in one statement: the same CAS and history
    row for each, and the rows that moved (in no particular order) are returned.

    All changes must set the same columns, and name each generation at most once: a
    generation with two changes in a batch needs two calls, in order.
    """
    if to is Status.QUEUED:
        raise ValueError("use retry() to start a new attempt")
    if not changes:
        return []
    first = changes[0].fields
    if any(c.fields.keys() != first.keys() for c in changes):
        raise ValueError("every change of a batch must set the same columns")
    columns, check = _split(first)
    if len({c.generation_id for c in changes}) != len(changes):
        raise ValueError("a batch names a generation twice")
    rows = await conn.fetch(
        _batch_sql(to, columns, check),
        [c.generation_id for c in changes],
        [c.attempt for c in changes],
        to.value,
        _sorted_statuses(TRANSITIONS[to]),
        [json.dumps(dict(c.detail)) if c.detail else None for c in changes],
        *([c.fields[name] for c in changes] for name in columns),
        *(([c.fields[CHECK] for c in changes],) if check else ()),
    )
    if to in TERMINAL:
        _count_finished(to, rows)
    return rows


def _count_finished(to: Status, rows: Sequence[asyncpg.Record]) -> None:
    from core import metrics  # metrics reads this module's statuses: import late

    for row in rows:
        metrics.GENERATIONS_FINISHED.labels(to.value, row["provider"]).inc()


_PROGRESS = f"""
    WITH i AS (
        SELECT * FROM unnest($1::uuid[], $2::int[], $3::float8[], $4::timestamptz[])
            AS i(id, attempt, progress, due)
    ), upd AS (
        UPDATE generations g SET progress = i.progress, updated_at = now()
          FROM i
         WHERE g.id = i.id AND g.attempt = i.attempt AND g.status = 'processing'
           AND (g.progress IS NULL OR g.progress < i.progress)
     RETURNING g.*
    ){check_cte("i.due", "upd JOIN i USING (id)")}
    SELECT * FROM upd
"""


async def record_progress(
    conn: asyncpg.Connection | asyncpg.Pool, changes: Sequence[Change]
) -> list[asyncpg.Record]:
    """Progress is not a status change: no history row, only while processing, and
    never backwards. Each change sets ``progress`` and the check (``CHECK``)."""
    if not changes:
        return []
    return await conn.fetch(
        _PROGRESS,
        [c.generation_id for c in changes],
        [c.attempt for c in changes],
        [c.fields["progress"] for c in changes],
        [c.fields[CHECK] for c in changes],
    )


# The checks of live generations pushed to other times, each fenced like a transition
# (``attempt`` and status): a generation that moved on since its row was read keeps
# the check that change left. The lock on each generation makes the fence exact: a
# transition in flight is waited for and the row read again.
_RESCHEDULE = """
    WITH live AS (
        SELECT g.id, u.due
          FROM unnest($1::uuid[], $2::int[], $3::timestamptz[]) AS u(id, attempt, due)
          JOIN generations g ON g.id = u.id AND g.attempt = u.attempt
         WHERE g.status = ANY($4::text[])
           FOR SHARE OF g
    )
    INSERT INTO generation_checks (generation_id, due_at)
    SELECT id, due FROM live
        ON CONFLICT (generation_id) DO UPDATE SET due_at = EXCLUDED.due_at
"""


async def reschedule(
    conn: asyncpg.Connection | asyncpg.Pool,
    changes: Sequence[Change],
    statuses: frozenset[Status],
) -> None:
    """Each change's check (``CHECK``) for its generation if it is still at that
    attempt and in one of ``statuses``; no status changes, no history row."""
    if not changes:
        return
    await conn.execute(
        _RESCHEDULE,
        [c.generation_id for c in changes],
        [c.attempt for c in changes],
        [c.fields[CHECK] for c in changes],
        _sorted_statuses(statuses),
    )
