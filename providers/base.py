"""The Provider Protocol and the one error classification everything shares.

A provider takes a dispatched attempt (``submit``); results arrive as ``JobStatus``
messages (local workers, webhooks) or through ``poll`` (the reconciler's backup path).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol
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


class Provider(Protocol):
    name: str

    async def submit(self, job: Job) -> Submission:
        """Hand the attempt to the provider. Raises ProviderError subclasses."""
        ...

    async def cancel(self, job: Job) -> None:
        """Best-effort cancel at the provider."""
        ...
