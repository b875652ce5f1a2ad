"""Cancellers: ``gengui:provider:cancels`` -> the provider's cancel call.

The generation is already ``cancelled`` or ``failed`` in Postgres when a cancel is
queued here; stopping the remote job only saves its cost. A late result is refused
by the lifecycle CAS either way, and its image deleted, so a failed cancel is
retried a few times (the stream's redelivery) and then dead-lettered, never fatal.
"""

from __future__ import annotations

from dataclasses import replace

import structlog

from core.events import ProviderCancel
from core.logging import get_logger
from core.runtime import Runtime
from providers.base import Job, PollingProvider

log = get_logger(__name__)


class Canceller:
    def __init__(self, rt: Runtime, providers: dict[str, PollingProvider]) -> None:
        self.rt = rt
        self.providers = providers

    async def handle(self, msg: ProviderCancel) -> None:
        structlog.contextvars.bind_contextvars(
            generation_id=str(msg.generation_id), attempt=msg.attempt
        )
        provider = self.providers.get(msg.provider)
        if provider is None:
            log.warning("cancel.provider_not_configured", provider=msg.provider)
            return
        row = await self.rt.pool.fetchrow(
            "SELECT * FROM generations WHERE id = $1", msg.generation_id
        )
        if row is None:
            return
        # The row may have moved on to a newer attempt: cancel the job named here.
        job = replace(Job.from_row(row), attempt=msg.attempt, provider_job_id=msg.provider_job_id)
        await provider.cancel(job)
        log.info("cancel.sent", provider=msg.provider, provider_job_id=msg.provider_job_id)
