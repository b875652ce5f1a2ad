"""The Provider Protocol and the one error classification everything shares.

A provider takes a dispatched attempt (``submit``); results arrive as ``JobStatus``
messages (local workers, webhooks) or through ``poll`` (the reconciler's backup path).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, Protocol, runtime_checkable
from uuid import UUID

from core.errors import ProviderError, ProviderRejected, ProviderRetryable


@dataclass(frozen=True)
class Job:
    """One attempt of one generation, as a provider sees it."""

    generation_id: UUID
    attempt: int
    user_id: UUID
    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    seed: int
    provider_job_id: str | None = None
    deadline_at: datetime | None = None

    @classmethod
    def from_row(cls, row: Any) -> Job:
        return cls(
            generation_id=row["id"],
            attempt=row["attempt"],
            user_id=row["user_id"],
            prompt=row["prompt"],
            negative_prompt=row["negative_prompt"],
            width=row["width"],
            height=row["height"],
            seed=row["seed"],
            provider_job_id=row["provider_job_id"],
            deadline_at=row["deadline_at"],
        )


@dataclass(frozen=True)
class Submission:
    """What ``submit`` returns: the provider's id for the job, when it has one."""

    provider_job_id: str | None = None


@dataclass(frozen=True)
class Failure:
    retryable: bool
    code: str
    message: str


def classify(exc: BaseException) -> Failure:
    """Retryable vs permanent, with a reason code. Unknown errors are retryable: the
    deadline still bounds them, while a wrong "permanent" would fail a good job."""
    if isinstance(exc, ProviderRejected):
        return Failure(False, exc.code, exc.message)
    if isinstance(exc, ProviderRetryable | ProviderError):
        return Failure(True, exc.code, exc.message)
    if isinstance(exc, TimeoutError):
        return Failure(True, "provider_timeout", "the provider did not answer in time")
    if isinstance(exc, OSError):
        return Failure(True, "provider_unreachable", str(exc) or type(exc).__name__)
    return Failure(True, "provider_error", repr(exc))


OutcomeState = Literal["queued", "processing", "completed", "failed", "cancelled"]


@dataclass(frozen=True)
class Outcome:
    """What a provider says of one job, from a webhook, a poll, or a synchronous call.

    A completed outcome carries the image inline (``image``, already decoded) or as a
    URL to download (``image_url``, fetched through ``providers.download``). A failed
    one carries its classified ``failure``.
    """

    state: OutcomeState
    image: bytes | None = None
    image_url: str | None = None
    content_type: str | None = None
    progress: float | None = None
    failure: Failure | None = None
    provider_job_id: str | None = None


class Provider(Protocol):
    """Every provider: ``submit`` hands an attempt over; ``cancel`` is best effort."""

    name: str

    async def submit(self, job: Job, *, webhook_url: str | None = None) -> Submission:
        """Hand the attempt to the provider. Raises ProviderError subclasses."""
        ...

    async def cancel(self, job: Job) -> None:
        """Best-effort cancel at the provider. Never raises for an unknown/finished job."""
        ...


@runtime_checkable
class PollingProvider(Provider, Protocol):
    """A provider whose jobs run remotely and can be asked about (RunPod, Replicate).

    Results arrive by webhook (``parse_webhook``) or, as the backup path, by ``poll``.
    """

    async def poll(self, job: Job) -> Outcome:
        """The job's current outcome at the provider (``job.provider_job_id`` is set)."""
        ...

    def verify_webhook(self, headers: Mapping[str, str], body: bytes) -> bool:
        """The provider's own signature check (Replicate); True where it has none."""
        ...

    def parse_webhook(self, body: bytes) -> Outcome:
        """A webhook body -> an Outcome. Raises ProviderRejected for a malformed body."""
        ...


@runtime_checkable
class SyncProvider(Provider, Protocol):
    """A hosted API that answers the request with the image (Gemini, OpenAI).

    ``submit`` only queues the job for the hosted runner; ``generate`` makes the call,
    off the dispatch loop and under the provider's concurrency and rate limits.
    """

    async def generate(self, job: Job) -> Outcome:
        """Call the API; returns a completed Outcome with bytes, or raises ProviderError."""
        ...
