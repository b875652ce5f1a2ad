"""Generations as the API sees them: input validation, creation, reads and the resource shape."""

from __future__ import annotations

import base64
import hashlib
import secrets
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

import asyncpg
from pydantic import BaseModel, ConfigDict, Field, field_validator

from core.errors import Conflict, InvalidInput
from core.lifecycle import Status
from core.limits import GenerationLimits, check_generation_limits, lock_user

MAX_SEED = 2**32 - 1


class CreateGeneration(BaseModel):
    """Body of ``POST /api/v1/generations``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(min_length=1, max_length=4000)
    negative_prompt: str | None = Field(default=None, max_length=4000)
    width: int = Field(default=1024, ge=256, le=2048, multiple_of=64)
    height: int = Field(default=1024, ge=256, le=2048, multiple_of=64)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt must not be blank")
        return value

    @field_validator("prompt", "negative_prompt")
    @classmethod
    def _no_nul(cls, value: str | None) -> str | None:
        # Postgres text cannot hold NUL; reject it here rather than fail at INSERT.
        if value is not None and "\x00" in value:
            raise ValueError("must not contain NUL characters")
        return value

    def request_hash(self) -> str:
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()


def resource(row: asyncpg.Record | dict[str, Any]) -> dict[str, Any]:
    """The public JSON shape of a generation."""
    gid = row["id"]
    error = (
        {"code": row["error_code"], "message": row["error_message"]} if row["error_code"] else None
    )
    return {
        "id": str(gid),
        "status": row["status"],
        "attempt": row["attempt"],
        "provider": row["provider"],
        "prompt": row["prompt"],
        "negative_prompt": row["negative_prompt"],
        "width": row["width"],
        "height": row["height"],
        "seed": row["seed"],
        "progress": row["progress"],
        "error": error,
        "image_url": f"/api/v1/generations/{gid}/image" if row["image_key"] else None,
        "thumbnail_url": f"/api/v1/generations/{gid}/thumbnail" if row["thumbnail_key"] else None,
        "created_at": _iso(row["created_at"]),
        "updated_at": _iso(row["updated_at"]),
        "completed_at": _iso(row["completed_at"]),
    }


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


_INSERT = """
    WITH ins AS (
        INSERT INTO generations (id, user_id, status, attempt, provider, prompt, negative_prompt,
                                 width, height, seed, idempotency_key, request_hash,
                                 deadline_at, flag_rule)
        VALUES (gen_random_uuid(), $1, 'queued', 1, $2, $3, $4, $5, $6, $7, $8, $9,
                now() + $11::interval, $12)
        ON CONFLICT (user_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
        RETURNING *
    ), hist AS (
        INSERT INTO generation_events (generation_id, attempt, status)
        SELECT id, attempt, status FROM ins
    ), chk AS (
        -- Looked at after the grace period: published again if its request was lost.
        INSERT INTO generation_checks (generation_id, due_at)
        SELECT id, now() + $10::interval FROM ins
    )
    SELECT * FROM ins
"""


_BY_KEY = "SELECT * FROM generations WHERE user_id = $1 AND idempotency_key = $2"


async def create(
    pool: asyncpg.Pool,
    user_id: UUID,
    body: CreateGeneration,
    *,
    provider: str,
    idempotency_key: str | None,
    dispatch_grace: timedelta,
    deadline: timedelta,
    flag_rule: str | None = None,
    limits: GenerationLimits | None = None,
) -> tuple[asyncpg.Record, bool]:
    """Insert a queued generation; returns (row, created). A replayed key returns the original.

    ``flag_rule`` says why ``provider`` was chosen (see ``core.flags.Choice``). With
    ``limits``, the user's active count and daily quota are checked in the inserting
    transaction, under a per-user lock (``core.limits``); a replay is answered before
    the check, so it is never refused and never counted twice.
    """
    seed = body.seed if body.seed is not None else secrets.randbelow(MAX_SEED + 1)
    request_hash = body.request_hash()
    values = (
        user_id,
        body,
        provider,
        seed,
        idempotency_key,
        request_hash,
        dispatch_grace,
        deadline,
        flag_rule,
    )
    if limits is not None and limits.enforced:
        async with pool.acquire() as conn, conn.transaction():
            await lock_user(conn, user_id)
            if idempotency_key is not None:
                existing = await conn.fetchrow(_BY_KEY, user_id, idempotency_key)
                if existing is not None:
                    return _replayed(existing, request_hash), False
            await check_generation_limits(conn, user_id, limits)
            row = await _insert(conn, *values)
    else:
        row = await _insert(pool, *values)
    if row is not None:
        return row, True
    existing = await pool.fetchrow(_BY_KEY, user_id, idempotency_key)
    if existing is None:  # deleted between the two statements; vanishingly rare
        raise Conflict("retry the request", code="idempotency_conflict")
    return _replayed(existing, request_hash), False


def _replayed(existing: asyncpg.Record, request_hash: str) -> asyncpg.Record:
    if existing["request_hash"] != request_hash:
        raise Conflict(
            "this Idempotency-Key was used with a different request body",
            code="idempotency_key_reused",
        )
    return existing


async def _insert(
    conn: asyncpg.Pool | asyncpg.Connection,
    user_id: UUID,
    body: CreateGeneration,
    provider: str,
    seed: int,
    idempotency_key: str | None,
    request_hash: str,
    dispatch_grace: timedelta,
    deadline: timedelta,
    flag_rule: str | None,
) -> asyncpg.Record | None:
    return await conn.fetchrow(
        _INSERT,
        user_id,
        provider,
        body.prompt,
        body.negative_prompt,
        body.width,
        body.height,
        seed,
        idempotency_key,
        request_hash,
        dispatch_grace,
        deadline,
        flag_rule,
    )


async def get(pool: asyncpg.Pool, user_id: UUID, generation_id: UUID) -> asyncpg.Record | None:
    # Filtering by owner in SQL: another user's id is simply "not found".
    return await pool.fetchrow(
        "SELECT * FROM generations WHERE id = $1 AND user_id = $2", generation_id, user_id
    )


async def latest(pool: asyncpg.Pool, user_id: UUID) -> asyncpg.Record | None:
    return await pool.fetchrow(
        "SELECT * FROM generations WHERE user_id = $1 ORDER BY created_at DESC, id DESC LIMIT 1",
        user_id,
    )


def encode_cursor(created_at: datetime, generation_id: UUID) -> str:
    raw = f"{created_at.isoformat()}|{generation_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, UUID]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        created, gid = raw.split("|", 1)
        return datetime.fromisoformat(created), UUID(gid)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInput("cursor is not valid", code="invalid_cursor") from exc


async def list_page(
    pool: asyncpg.Pool,
    user_id: UUID,
    *,
    limit: int,
    cursor: str | None,
    status: Status | None,
) -> tuple[list[asyncpg.Record], str | None]:
    """Newest first, keyset-paginated on (created_at, id): stable while rows are added."""
    after = decode_cursor(cursor) if cursor else None
    rows = await pool.fetch(
        """SELECT * FROM generations
            WHERE user_id = $1
              AND ($2::text IS NULL OR status = $2)
              AND ($3::timestamptz IS NULL OR (created_at, id) < ($3, $4::uuid))
            ORDER BY created_at DESC, id DESC
            LIMIT $5""",
        user_id,
        status.value if status else None,
        after[0] if after else None,
        after[1] if after else None,
        limit + 1,
    )
    page = rows[:limit]
    next_cursor = (
        encode_cursor(page[-1]["created_at"], page[-1]["id"]) if len(rows) > limit else None
    )
    return page, next_cursor
