"""Dispatch: ``generation:requested`` -> the generation's provider.

The attempt is claimed (queued -> submitted, CAS) before the provider is called, so a
redelivered request for the same attempt is a no-op. A crash between the claim and
the provider call leaves a submitted row with no job: the reconciler retries it when
its ``next_check_at`` passes.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta

import structlog

from core import lifecycle
from core.events import GenerationRequested
from core.lifecycle import Status
from core.logging import get_logger
from core.notify import notify
from core.runtime import Runtime
from providers.base import Job, Provider, classify

log = get_logger(__name__)


class Dispatcher:
    def __init__(
        self, rt: Runtime, providers: Mapping[str, Provider], check_after: timedelta
    ) -> None:
        self.rt = rt
        self.providers = providers
        self.check_after = check_after

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
        provider = self.providers.get(row["provider"])
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
        claimed = await lifecycle.transition(
            pool,
            msg.generation_id,
            attempt=msg.attempt,
            to=Status.SUBMITTED,
            next_check_at=lifecycle.due_in(self.check_after),
        )
        if claimed is None:
            return
        try:
            await provider.submit(Job.from_row(claimed))
        except Exception as exc:
            failure = classify(exc)
            log.warning("dispatch.submit_failed", code=failure.code, retryable=failure.retryable)
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
        log.info("generation.dispatched", provider=provider.name)
        await notify(self.rt.publisher, claimed, "generation.submitted")
