"""The schema, as SQLModel tables. Migrations are generated from these and checked for drift."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from sqlmodel import Field, SQLModel

from core.lifecycle import NON_TERMINAL, Status

_STATUS_VALUES = ", ".join(f"'{s.value}'" for s in Status)
_NON_TERMINAL_VALUES = ", ".join(f"'{s.value}'" for s in sorted(NON_TERMINAL))


def _now_column(**kwargs: Any) -> Any:
    return Field(
        default=None,
        sa_type=sa.DateTime(timezone=True),
        nullable=False,
        sa_column_kwargs={"server_default": sa.func.now(), **kwargs},
    )


class User(SQLModel, table=True):
    __tablename__ = "users"

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    email: str = Field(max_length=320, unique=True)
    plan: str = Field(default="free", max_length=32, sa_column_kwargs={"server_default": "free"})
    created_at: datetime | None = _now_column()
    # argon2id (core.passwords); NULL for accounts made by an operator (``gengui users
    # create``), which sign in with API tokens only.
    password_hash: str | None = Field(default=None, max_length=255)
    # Set once the owner proved they read mail at ``email``; creating generations needs it.
    email_verified_at: datetime | None = Field(default=None, sa_type=sa.DateTime(timezone=True))


class Session(SQLModel, table=True):
    """A browser session (an HttpOnly cookie); only the token's SHA-256 is stored."""

    __tablename__ = "sessions"

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    user_id: uuid.UUID = Field(foreign_key="users.id", ondelete="CASCADE", index=True)
    token_hash: bytes = Field(sa_type=sa.LargeBinary, unique=True)
    created_at: datetime | None = _now_column()
    expires_at: datetime = Field(sa_type=sa.DateTime(timezone=True))
    revoked_at: datetime | None = Field(default=None, sa_type=sa.DateTime(timezone=True))


class AccountToken(SQLModel, table=True):
    """A single-use token mailed to a user: e-mail verification or password reset.

    Bound to the address it was sent to, so it proves control of that address only.
    """

    __tablename__ = "account_tokens"
    __table_args__ = (
        sa.CheckConstraint(
            "purpose IN ('verify_email', 'reset_password')", name="account_tokens_purpose_check"
        ),
    )

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    user_id: uuid.UUID = Field(foreign_key="users.id", ondelete="CASCADE", index=True)
    purpose: str = Field(max_length=16)
    token_hash: bytes = Field(sa_type=sa.LargeBinary, unique=True)
    email: str = Field(max_length=320)
    created_at: datetime | None = _now_column()
    expires_at: datetime = Field(sa_type=sa.DateTime(timezone=True))
    used_at: datetime | None = Field(default=None, sa_type=sa.DateTime(timezone=True))


class ApiToken(SQLModel, table=True):
    """An opaque bearer token; only its SHA-256 is stored (tokens are 256-bit random)."""

    __tablename__ = "api_tokens"

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    user_id: uuid.UUID = Field(foreign_key="users.id", ondelete="CASCADE", index=True)
    token_hash: bytes = Field(sa_type=sa.LargeBinary, unique=True)
    name: str = Field(default="default", max_length=100)
    created_at: datetime | None = _now_column()
    expires_at: datetime | None = Field(default=None, sa_type=sa.DateTime(timezone=True))
    revoked_at: datetime | None = Field(default=None, sa_type=sa.DateTime(timezone=True))


class Generation(SQLModel, table=True):
    __tablename__ = "generations"
    __table_args__ = (
        sa.CheckConstraint(f"status IN ({_STATUS_VALUES})", name="generations_status_check"),
        sa.CheckConstraint("attempt >= 1", name="generations_attempt_check"),
        # Keyless rows (most) stay out of it: each write of a row is one index entry fewer.
        sa.Index(
            "ix_generations_idempotency_key",
            "user_id",
            "idempotency_key",
            unique=True,
            postgresql_where=sa.text("idempotency_key IS NOT NULL"),
        ),
        # Newest-first keyset pagination per user.
        sa.Index(
            "ix_generations_user_created", "user_id", sa.text("created_at DESC"), sa.text("id DESC")
        ),
        sa.Index(
            "ix_generations_deadline",
            "deadline_at",
            postgresql_where=sa.text(f"status IN ({_NON_TERMINAL_VALUES})"),
        ),
        # The active-generations limit counts a user's live rows (core.limits).
        sa.Index(
            "ix_generations_user_active",
            "user_id",
            postgresql_where=sa.text(f"status IN ({_NON_TERMINAL_VALUES})"),
        ),
    )

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    user_id: uuid.UUID = Field(foreign_key="users.id", ondelete="CASCADE")
    status: str = Field(default=Status.QUEUED.value, max_length=16)
    attempt: int = Field(default=1, sa_column_kwargs={"server_default": "1"})
    provider: str = Field(max_length=32)
    provider_job_id: str | None = Field(default=None, max_length=200)
    flag_rule: str | None = Field(default=None, max_length=200)
    # The runner (worker, hosted runner) that reported the attempt processing.
    runner: str | None = Field(default=None, max_length=200)
    prompt: str = Field(sa_type=sa.Text)
    negative_prompt: str | None = Field(default=None, sa_type=sa.Text)
    width: int
    height: int
    seed: int = Field(sa_type=sa.BigInteger)
    error_code: str | None = Field(default=None, max_length=64)
    error_message: str | None = Field(default=None, sa_type=sa.Text)
    image_key: str | None = Field(default=None, max_length=512)
    image_content_type: str | None = Field(default=None, max_length=64)
    thumbnail_key: str | None = Field(default=None, max_length=512)
    idempotency_key: str | None = Field(default=None, max_length=255)
    request_hash: str | None = Field(default=None, max_length=64)
    progress: float | None = Field(default=None)
    created_at: datetime | None = _now_column()
    updated_at: datetime | None = _now_column()
    # When the current attempt went to its provider (the `submitted` transition).
    submitted_at: datetime | None = Field(default=None, sa_type=sa.DateTime(timezone=True))
    completed_at: datetime | None = Field(default=None, sa_type=sa.DateTime(timezone=True))
    deadline_at: datetime | None = Field(default=None, sa_type=sa.DateTime(timezone=True))


class GenerationCheck(SQLModel, table=True):
    """When the reconciler looks at a generation next: one row per generation that has
    a check (a live one, or a completed one still without its thumbnail), written by
    the statements that move the generation and deleted by the ones that finish it.

    Kept apart from the wide ``generations`` row so that the reconciler's lease, which
    pushes ``due_at`` forward on every row it looks at, writes a narrow row in two
    indexes rather than a wide one in five (bench/README.md, the schedule table).
    """

    __tablename__ = "generation_checks"
    __table_args__ = (sa.Index("ix_generation_checks_due", "due_at"),)

    generation_id: uuid.UUID = Field(
        foreign_key="generations.id", ondelete="CASCADE", primary_key=True
    )
    due_at: datetime = Field(sa_type=sa.DateTime(timezone=True))


class GenerationEvent(SQLModel, table=True):
    """Append-only history: one row per accepted transition."""

    __tablename__ = "generation_events"
    __table_args__ = (sa.Index("ix_generation_events_generation", "generation_id", "id"),)

    id: int | None = Field(default=None, primary_key=True, sa_type=sa.BigInteger)
    generation_id: uuid.UUID = Field(foreign_key="generations.id", ondelete="CASCADE")
    attempt: int
    status: str = Field(max_length=16)
    detail: dict[str, Any] | None = Field(default=None, sa_type=JSONB)
    created_at: datetime | None = _now_column()
