"""Status: worker and provider reports -> lifecycle transitions, history, notices,
thumbnail requests.

Every report is applied with a CAS fenced by attempt, so duplicates and reports from
older attempts change nothing. A refused ``completed`` report whose image is not the
generation's image has its stored object deleted: no orphan, never a second image.
"""

from __future__ import annotations

from datetime import timedelta

import asyncpg
import structlog

from core import lifecycle, metrics
from core.events import JobStatus, ThumbnailRequested
from core.lifecycle import Status
from core.logging import get_logger
from core.notify import notify
from core.retry import next_attempt_due
from core.runtime import Runtime
from core.storage import clear_generation, generation_prefix, sweep

log = get_logger(__name__)


class StatusProcessor:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.check_after = timedelta(seconds=rt.settings.local_check_s)

    async def handle(self, msg: JobStatus) -> None:
        structlog.contextvars.bind_contextvars(
            generation_id=str(msg.generation_id), attempt=msg.attempt
        )
        if msg.state == "processing":
            await self._processing(msg)
        elif msg.state == "progress":
            await self._progress(msg)
        elif msg.state == "completed":
            await self._completed(msg)
        else:
            await self._failed(msg)

    async def _processing(self, msg: JobStatus) -> None:
        row = await lifecycle.transition(
            self.rt.pool,
            msg.generation_id,
            attempt=msg.attempt,
            to=Status.PROCESSING,
            next_check_at=lifecycle.due_in(self.check_after),
            detail={"source": msg.source} if msg.source else None,
        )
        if row is not None:
            await notify(self.rt.publisher, row, "generation.processing")

    async def _progress(self, msg: JobStatus) -> None:
        if msg.progress is None:
            return
        row = await lifecycle.record_progress(
            self.rt.pool,
            msg.generation_id,
            attempt=msg.attempt,
            progress=msg.progress,
            next_check_at=lifecycle.due_in(self.check_after),
        )
        if row is not None:
            await notify(self.rt.publisher, row, "generation.progress")

    async def _completed(self, msg: JobStatus) -> None:
        if not msg.image_key:
            log.error("status.completed_without_image")
            return
        row = await lifecycle.transition(
            self.rt.pool,
            msg.generation_id,
            attempt=msg.attempt,
            to=Status.COMPLETED,
            image_key=msg.image_key,
            image_content_type=msg.content_type,
            # Kept set until the thumbnail is attached: the reconciler asks again after it.
            next_check_at=lifecycle.due_in(timedelta(seconds=self.rt.settings.thumbnail_grace_s)),
            detail={"source": msg.source} if msg.source else None,
        )
        if row is None:
            await self._discard_unused_image(msg)
            return
        log.info("generation.completed")
        await self._observe_duration(row)
        prefix = generation_prefix(row["user_id"], row["id"])
        # A worker killed mid-write leaves a partial file; the winning report clears it.
        # Any other writer of this generation is stale: its rename simply fails.
        partials = await self.rt.storage.discard_partials(prefix)
        # Earlier attempts may have stored images whose reports never arrived.
        stale = (
            await sweep(self.rt.storage, prefix, keep={msg.image_key}) if row["attempt"] > 1 else []
        )
        if stale or partials:
            log.info("status.stale_objects_deleted", count=len(stale), partials=partials)
        await self.rt.publisher.send(
            self.rt.settings.keys.thumbnails,
            ThumbnailRequested(
                generation_id=row["id"],
                attempt=row["attempt"],
                user_id=row["user_id"],
                image_key=msg.image_key,
            ),
        )
        await notify(self.rt.publisher, row, "generation.completed")

    async def _observe_duration(self, row: asyncpg.Record) -> None:
        """Submit -> completed of the winning attempt, per provider."""
        submitted_at = await self.rt.pool.fetchval(
            """SELECT created_at FROM generation_events
                WHERE generation_id = $1 AND attempt = $2 AND status = 'submitted'
                ORDER BY id DESC LIMIT 1""",
            row["id"],
            row["attempt"],
        )
        if submitted_at is not None and row["completed_at"] is not None:
            seconds = (row["completed_at"] - submitted_at).total_seconds()
            metrics.GENERATION_DURATION.labels(row["provider"]).observe(max(seconds, 0.0))

    async def _discard_unused_image(self, msg: JobStatus) -> None:
        current = await self.rt.pool.fetchval(
            "SELECT image_key FROM generations WHERE id = $1", msg.generation_id
        )
        if current != msg.image_key:
            assert msg.image_key is not None
            await self.rt.storage.delete(msg.image_key)
            log.info("status.stale_image_deleted", image_key=msg.image_key)

    async def _failed(self, msg: JobStatus) -> None:
        pool = self.rt.pool
        code = msg.error_code or "generation_failed"
        message = msg.error_message or "the provider reported a failure"
        if msg.retryable and msg.attempt < self.rt.settings.max_attempts:
            row = await lifecycle.retry(
                pool,
                msg.generation_id,
                attempt=msg.attempt,
                allowed_from=frozenset({Status.SUBMITTED, Status.PROCESSING}),
                detail={"error_code": code, "error_message": message},
                # Waits out its backoff as a queued row; the reconciler publishes it.
                next_check_at=next_attempt_due(msg.attempt, self.rt.settings),
            )
            if row is not None:
                await notify(self.rt.publisher, row, "generation.queued")
                return
        row = await lifecycle.transition(
            pool,
            msg.generation_id,
            attempt=msg.attempt,
            to=Status.FAILED,
            error_code=code,
            error_message=message,
        )
        if row is not None:
            log.info("generation.failed", error_code=code)
            await clear_generation(self.rt.storage, row["user_id"], row["id"])
            await notify(self.rt.publisher, row, "generation.failed")
