"""What a remote provider says of a job, turned into our own reports.

Webhooks (answered fast), the reconciler's polls and hosted calls all end here, so a
RunPod result found by a poll and the same result delivered by a webhook take one
path. An outcome becomes a ``JobStatus`` on the status stream; the status consumer's
attempt-fenced CAS decides whether it counts, so duplicates and stale attempts change
nothing. Inline image bytes are stored first under the attempt's own key; an image
given as a URL is handed to the result fetchers (``gengui:provider:results``), which
download it with a size cap, a host allowlist and a timeout.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

import aiohttp
import structlog

from core import metrics
from core.events import JobStatus, ProviderResult
from core.imaging import ImageRejected, sniff_image
from core.logging import get_logger
from core.runtime import Runtime
from core.storage import original_key
from providers.base import Failure, Outcome, classify
from providers.download import download

log = get_logger(__name__)


async def store_image(
    rt: Runtime, user_id: UUID, generation_id: UUID, attempt: int, data: bytes
) -> tuple[str, str]:
    """Store the attempt's image; returns (key, content type). Raises ImageRejected."""
    ext, content_type = sniff_image(data)
    key = original_key(user_id, generation_id, attempt, ext)
    await rt.storage.put(key, data, content_type)
    return key, content_type


async def report(
    rt: Runtime, generation_id: UUID, attempt: int, source: str, **fields: Any
) -> None:
    message = JobStatus(generation_id=generation_id, attempt=attempt, source=source, **fields)
    await rt.publisher.send(rt.settings.keys.job_status, message)


async def report_failure(
    rt: Runtime, generation_id: UUID, attempt: int, source: str, failure: Failure
) -> None:
    await report(
        rt,
        generation_id,
        attempt,
        source,
        state="failed",
        error_code=failure.code,
        error_message=failure.message[:500],
        retryable=failure.retryable,
    )


async def apply_outcome(
    rt: Runtime,
    *,
    provider: str,
    generation_id: UUID,
    attempt: int,
    user_id: UUID,
    outcome: Outcome,
) -> str:
    """Turn one outcome into reports; returns what was done (for logs and tests)."""
    if outcome.state == "queued":
        return "waiting"
    if outcome.state == "processing":
        await report(rt, generation_id, attempt, provider, state="processing")
        if outcome.progress is not None:
            await report(
                rt, generation_id, attempt, provider, state="progress", progress=outcome.progress
            )
        return "processing"
    if outcome.state == "cancelled":
        # Not cancelled by us (ours are terminal already, so this report is refused):
        # the provider dropped the job. Another attempt may well succeed.
        failure = Failure(True, "provider_cancelled", "the provider cancelled the job")
        await report_failure(rt, generation_id, attempt, provider, failure)
        return "failed"
    if outcome.state == "failed":
        failure = outcome.failure or Failure(True, "provider_failed", "the provider failed")
        await report_failure(rt, generation_id, attempt, provider, failure)
        return "failed"
    if outcome.image is not None:
        try:
            key, content_type = await store_image(
                rt, user_id, generation_id, attempt, outcome.image
            )
        except ImageRejected as exc:
            failure = Failure(True, "provider_bad_output", f"{exc.code}: {exc}")
            await report_failure(rt, generation_id, attempt, provider, failure)
            return "failed"
        except FileNotFoundError:
            # A concurrent duplicate already completed the generation, and its
            # completion cleared this write's partial file: nothing left to do.
            log.info("results.duplicate_write_discarded")
            return "ignored"
        await report(
            rt,
            generation_id,
            attempt,
            provider,
            state="completed",
            image_key=key,
            content_type=content_type,
        )
        return "completed"
    if outcome.image_url:
        await rt.publisher.send(
            rt.settings.keys.results,
            ProviderResult(
                generation_id=generation_id,
                attempt=attempt,
                user_id=user_id,
                provider=provider,
                image_url=outcome.image_url,
                content_type=outcome.content_type,
            ),
        )
        return "fetching"
    failure = Failure(True, "provider_bad_output", "completed without an image")
    await report_failure(rt, generation_id, attempt, provider, failure)
    return "failed"


class ResultFetcher:
    """``gengui:provider:results`` -> download -> store -> ``completed`` report."""

    def __init__(self, rt: Runtime, session: aiohttp.ClientSession) -> None:
        self.rt = rt
        self.session = session

    async def _still_wanted(self, msg: ProviderResult) -> bool:
        status = await self.rt.pool.fetchval(
            "SELECT status FROM generations WHERE id = $1 AND attempt = $2",
            msg.generation_id,
            msg.attempt,
        )
        return status in ("submitted", "processing")

    async def handle(self, msg: ProviderResult) -> None:
        structlog.contextvars.bind_contextvars(
            generation_id=str(msg.generation_id), attempt=msg.attempt
        )
        if not await self._still_wanted(msg):
            return  # a duplicate webhook, an old attempt, or cancelled: fetch nothing
        s = self.rt.settings
        try:
            data, _ = await download(
                self.session,
                msg.image_url,
                allowed_hosts=s.download_hosts,
                allow_http=s.download_allow_http,
                max_bytes=s.download_max_bytes,
                timeout_s=s.provider_timeout_s,
            )
        except Exception as exc:
            failure = classify(exc)
            log.warning("results.download_failed", code=failure.code, retryable=failure.retryable)
            metrics.PROVIDER_ERRORS.labels(msg.provider, failure.code).inc()
            await report_failure(self.rt, msg.generation_id, msg.attempt, msg.provider, failure)
            return
        await apply_outcome(
            self.rt,
            provider=msg.provider,
            generation_id=msg.generation_id,
            attempt=msg.attempt,
            user_id=msg.user_id,
            outcome=Outcome(state="completed", image=data),
        )
