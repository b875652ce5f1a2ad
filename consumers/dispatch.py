"""Dispatch: ``generation:requested`` -> the generation's provider.

New generations for queue providers skip this: the API writes them ``submitted`` and
sends their jobs itself (``Settings.api_dispatch``, ``core.api.generations.Announcer``).
What comes here is the rest: remote providers' creates, retries, the reconciler's
requeues, and every create when ``api_dispatch`` is off.

The attempt is claimed (queued -> submitted, CAS) before the provider is called, so a
redelivered request for the same attempt is a no-op. A crash between the claim and
the provider call leaves a submitted row with no job: the reconciler retries it when
its check (``generation_checks``) is due. A remote provider's job id is written to the row as
soon as the provider answers, before anything waits on it, so the reconciler can
poll it even if every webhook is lost.

Rate limits are taken before the claim: a request over its provider's limit stays
``queued`` with its check at the end of its wait, and the reconciler
publishes it again then. Nothing is dropped.

Requests for queue providers (local workers, hosted runners) are dispatched a batch at
a time: one statement claims them all, and their jobs and ``generation.submitted``
notices go out with one script call. A request names its provider, so the batch is
sorted without reading its rows: the claim is the batch's only statement. Requests for
remote providers take the one-at-a-time path: each is an HTTP call under its rate limit.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import timedelta
from uuid import UUID

import structlog

from core import lifecycle, metrics
from core.events import GenerationRequested
from core.lifecycle import Change, Status
from core.logging import get_logger
from core.notify import Outbox, notify
from core.ratelimit import RateLimiter
from core.runtime import Runtime
from core.webhooks import webhook_secret, webhook_url
from providers.base import Job, classify
from providers.registry import ProviderSet, QueueProvider, check_after

# Waits longer than this give the slot back: the row is published again when due.
MAX_INLINE_WAIT_S = 1.0

log = get_logger(__name__)


class Dispatcher:
    def __init__(self, rt: Runtime, providers: ProviderSet, limiter: RateLimiter) -> None:
        self.rt = rt
        self.providers = providers
        self.limiter = limiter
        self.secret = webhook_secret(rt.settings)

    async def _rate_limited(self, generation_id: UUID, attempt: int, provider: str) -> bool:
        """Take a token, waiting briefly; on a long wait put the row off and say so."""
        wait_s = await self.limiter.take(provider)
        if wait_s <= 0:
            return False
        if wait_s <= MAX_INLINE_WAIT_S:
            await asyncio.sleep(wait_s)
            if await self.limiter.take(provider) <= 0:
                return False
        due = lifecycle.due_in(timedelta(seconds=max(wait_s, MAX_INLINE_WAIT_S)))
        await lifecycle.reschedule(
            self.rt.pool,
            [Change(generation_id, attempt, {"next_check_at": due})],
            frozenset({Status.QUEUED}),
        )
        log.info("dispatch.rate_limited", provider=provider, wait_s=wait_s)
        return True

    async def handle_batch(
        self, requests: Sequence[GenerationRequested], outbox: Outbox | None = None
    ) -> list[GenerationRequested]:
        """Claims and publishes the queue providers' requests in bulk; returns the
        requests for other providers, which ``handle`` takes one at a time. The jobs and
        notices go into ``outbox`` when given (the consumer sends them with the batch's
        ack), else they are sent here."""
        rt = self.rt
        # Each generation's newest attempt asked for, with its provider: older attempts
        # and duplicates would fail the claim's CAS anyway.
        asked: dict[UUID, tuple[int, str]] = {}
        for gid, attempt, provider_name in await self._with_providers(requests):
            if gid not in asked or asked[gid][0] < attempt:
                asked[gid] = (attempt, provider_name)
        queues = {
            (gid, attempt): p
            for gid, (attempt, p) in asked.items()
            if isinstance(self.providers.dispatch.get(p), QueueProvider)
        }
        # A remote or unknown provider takes the careful path, which reads its row.
        slow = {(gid, attempt) for gid, (attempt, _) in asked.items()} - queues.keys()
        changes = [
            Change(gid, attempt, {"next_check_at": lifecycle.due_in(check_after(rt.settings, p))})
            for (gid, attempt), p in queues.items()
        ]
        claimed = await lifecycle.transition_many(rt.pool, Status.SUBMITTED, changes)
        own = outbox is None
        if outbox is None:
            outbox = Outbox(rt.publisher)
        dispatched = []
        for row in claimed:
            provider = self.providers.dispatch.get(row["provider"])
            if not isinstance(provider, QueueProvider):
                # The request named another provider than its row's (never published
                # so): the row is left submitted without a job, which the reconciler
                # retries as after a crash.
                log.error("dispatch.provider_mismatch", generation_id=str(row["id"]))
                continue
            provider.dispatch_in(outbox, row)
            dispatched.append(row)
        # A failure here leaves claimed rows without a job: the reconciler finds their
        # queue empty after check_after and retries them, as after a crash.
        if own:
            await outbox.flush()
        for row in dispatched:
            log.info(
                "generation.dispatched",
                generation_id=str(row["id"]),
                attempt=row["attempt"],
                provider=row["provider"],
            )
        return [r for r in requests if (r.generation_id, r.attempt) in slow]

    async def _with_providers(
        self, requests: Sequence[GenerationRequested]
    ) -> list[tuple[UUID, int, str]]:
        """(generation, attempt, provider) of each request: those that do not name their
        provider (published by an older version) are looked up, and dropped unless still
        queued under their attempt (dispatched already, superseded or cancelled)."""
        named = [(r.generation_id, r.attempt, r.provider) for r in requests if r.provider]
        bare = {(r.generation_id, r.attempt) for r in requests if not r.provider}
        if not bare:
            return named
        rows = await self.rt.pool.fetch(
            "SELECT id, attempt, provider FROM generations"
            " WHERE id = ANY($1::uuid[]) AND status = 'queued'",
            list({gid for gid, _ in bare}),
        )
        return named + [
            (row["id"], row["attempt"], row["provider"])
            for row in rows
            if (row["id"], row["attempt"]) in bare
        ]

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
