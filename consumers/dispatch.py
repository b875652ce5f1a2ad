"""Dispatch: ``generation:requested`` -> the generation's provider.

The attempt is claimed (queued -> submitted, CAS) before the provider is called, so a
redelivered request for the same attempt is a no-op. A crash between the claim and
the provider call leaves a submitted row with no job: the reconciler retries it when
its ``next_check_at`` passes. A remote provider's job id is written to the row as
soon as the provider answers, before anything waits on it, so the reconciler can
poll it even if every webhook is lost.

Rate limits are taken before the claim: a request over its provider's limit stays
``queued`` with ``next_check_at`` at the end of its wait, and the reconciler
publishes it again then. Nothing is dropped.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

import structlog

from core import lifecycle, metrics
from core.events import GenerationRequested
from core.lifecycle import Status
from core.logging import get_logger
from core.notify import notify
from core.ratelimit import RateLimiter
from core.runtime import Runtime
from core.webhooks import webhook_secret, webhook_url
from providers.base import Job, classify
from providers.registry import ProviderSet, check_after

# Waits longer than this give the slot back: the row is published again when due.
MAX_INLINE_WAIT_S = 1.0

log = get_logger(__name__)


class Dispatcher:
    def __init__(self, rt: Runtime, providers: ProviderSet, limiter: RateLimiter) -> None:
        self.rt = rt
        self.providers = providers
        self.limiter = limiter
        self.secret = webhook_secret(rt.settings)

    async def _rate_limited(self, generation_id: object, attempt: int, provider: str) -> bool:
        """Take a token, waiting briefly; on a long wait put the row off and say so."""
        wait_s = await self.limiter.take(provider)
        if wait_s <= 0:
            return False
        if wait_s <= MAX_INLINE_WAIT_S:
            await asyncio.sleep(wait_s)
            if await self.limiter.take(provider) <= 0:
                return False
        await self.rt.pool.execute(
            """UPDATE generations SET next_check_at = now() + $3::interval
                WHERE id = $1 AND attempt = $2 AND status = 'queued'""",
            generation_id,
            attempt,
            timedelta(seconds=max(wait_s, MAX_INLINE_WAIT_S)),
        )
        log.info("dispatch.rate_limited", provider=provider, wait_s=wait_s)
        return True

    async def handle(self, msg: GenerationRequested) -> None:
        structlog.contextvars.bind_contextvars(
            generation_id=str(msg.generation_id), attempt=msg.attempt
        )
        pool = self.rt.pool
        row = await pool.fetchrow(
            "SELECT provider FROM generations WHERE id = $1 AND attempt = $2 AND status = 'queued'",
            msg.generation_id,
            msg.attempt,
        )
        if row is None:
            return  # dispatched already, or a newer attempt exists, or cancelled
        provider = self.providers.dispatch.get(row["provider"])
        if provider is None:
            failed = await lifecycle.transition(
                pool,
                msg.generation_id,
                attempt=msg.attempt,
                to=Status.FAILED,
                error_code="provider_unknown",
                error_message=f"provider {row['provider']!r} is not configured",
            )
            if failed is not None:
                await notify(self.rt.publisher, failed, "generation.failed")
            return
        remote = provider.name in self.providers.polling
        if remote and await self._rate_limited(msg.generation_id, msg.attempt, provider.name):
            return
        claimed = await lifecycle.transition(
            pool,
            msg.generation_id,
            attempt=msg.attempt,
            to=Status.SUBMITTED,
            next_check_at=lifecycle.due_in(check_after(self.rt.settings, provider.name)),
        )
        if claimed is None:
            return
        url = (
            webhook_url(self.rt.settings, self.secret, provider.name, claimed["id"], msg.attempt)
            if remote
            else None
        )
        try:
            submission = await provider.submit(Job.from_row(claimed), webhook_url=url)
        except Exception as exc:
            failure = classify(exc)
            log.warning("dispatch.submit_failed", code=failure.code, retryable=failure.retryable)
            metrics.PROVIDER_ERRORS.labels(provider.name, failure.code).inc()
            if failure.retryable:
                # Leave it submitted: the reconciler retries it with backoff.
                return
            failed = await lifecycle.transition(
                pool,
                msg.generation_id,
                attempt=msg.attempt,
                to=Status.FAILED,
                error_code=failure.code,
                error_message=failure.message,
            )
            if failed is not None:
                await notify(self.rt.publisher, failed, "generation.failed")
            return
        if submission.provider_job_id is not None:
            await pool.execute(
                "UPDATE generations SET provider_job_id = $3 WHERE id = $1 AND attempt = $2",
                msg.generation_id,
                msg.attempt,
                submission.provider_job_id,
            )
        log.info("generation.dispatched", provider=provider.name)
        await notify(self.rt.publisher, claimed, "generation.submitted")
