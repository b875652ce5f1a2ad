"""Versioned message schemas for every stream and channel.

Each message carries ``v``; a consumer rejects versions it does not know (they go to
the dead-letter stream rather than being half-understood). On the wire a message is
one stream field, ``__data__``, holding the JSON — the layout FastStream's Redis
parser also reads, so FastStream tooling can consume our streams.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field

DATA_FIELD = b"__data__"


def json_bytes(model: BaseModel) -> bytes:
    """``model.model_dump_json().encode()`` without the round trip through ``str``:
    pydantic's serializer writes bytes, which ``model_dump_json`` decodes. Every
    message and notice is written this way (a thousand per reconciler tick)."""
    return model.__pydantic_serializer__.to_json(model)


class Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    v: Literal[1] = 1


class GenerationRequested(Message):
    """API or reconciler -> dispatchers: dispatch this attempt to its provider.

    ``provider`` is the row's (it never changes), so a dispatcher can claim a batch of
    queue jobs without reading their rows first; a request without it (published by an
    older version) is looked up."""

    generation_id: UUID
    attempt: int = Field(ge=1)
    provider: str | None = None


class LocalJob(Message):
    """A queue provider's job: dispatch -> GPU workers (``local``) or hosted runners
    (``gemini``, ``openai``). Everything a runner needs, so it needs no database."""

    generation_id: UUID
    attempt: int = Field(ge=1)
    user_id: UUID
    prompt: str
    negative_prompt: str | None = None
    width: int
    height: int
    seed: int
    deadline_at: datetime | None = None


JobState = Literal["processing", "progress", "completed", "failed"]


class JobStatus(Message):
    """Workers, providers, webhooks -> status processors."""

    generation_id: UUID
    attempt: int = Field(ge=1)
    state: JobState
    progress: float | None = Field(default=None, ge=0.0, le=1.0)
    image_key: str | None = None
    content_type: str | None = None
    error_code: str | None = None
    error_message: str | None = None
    retryable: bool = False
    source: str | None = Field(default=None, description="worker id or provider name")


class ProviderResult(Message):
    """Webhook or reconciler -> result fetchers: a finished job whose image is at a URL
    (Replicate). Fetching is slow and bounded, so it never runs in a webhook handler."""

    generation_id: UUID
    attempt: int = Field(ge=1)
    user_id: UUID
    provider: str
    image_url: str
    content_type: str | None = None


class ProviderCancel(Message):
    """API (cancel) or reconciler (deadline) -> cancellers: stop the job at the provider."""

    generation_id: UUID
    attempt: int = Field(ge=1)
    provider: str
    provider_job_id: str


class ThumbnailRequested(Message):
    """Status processors -> thumbnailers."""

    generation_id: UUID
    attempt: int = Field(ge=1)
    user_id: UUID
    image_key: str


class DeadLetter(Message):
    """A message that failed too often, kept with its last error for ``gengui dlq``."""

    stream: str
    group: str
    message_id: str
    deliveries: int
    error: str
    data: str


UserEventType = Literal[
    "generation.queued",
    "generation.submitted",
    "generation.processing",
    "generation.progress",
    "generation.completed",
    "generation.failed",
    "generation.cancelled",
    "thumbnail.ready",
]


class UserEvent(Message):
    """Pub/sub -> API replicas -> the user's SSE/WebSocket clients."""

    type: UserEventType
    generation: dict[str, Any]
