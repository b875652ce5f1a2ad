"""Status: worker and provider reports -> lifecycle transitions, history, notices,
thumbnail requests.

Every report is applied with a CAS fenced by attempt, so duplicates and reports from
older attempts change nothing. A refused ``completed`` report whose image is not the
generation's image has its stored object deleted: no orphan, never a second image.

Reports are applied a batch at a time (one stream read): one statement per kind of
report moves every generation of the batch, and the notices and thumbnail requests go
out in one pipeline after them. A ``processing`` or ``progress`` whose outcome is in the
same batch is skipped (``moot``); other reports of one generation in one batch are
applied in report order: the batch is cut into rounds in which each generation appears
once.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Sequence
from datetime import timedelta
from uuid import UUID

import asyncpg

from core import lifecycle, metrics
from core.events import JobStatus, ThumbnailRequested
from core.lifecycle import Change, Status
from core.logging import get_logger
from core.notify import Outbox
from core.retry import next_attempt_due
from core.runtime import Runtime
from core.storage import clear_generation, generation_prefix, sweep

log = get_logger(__name__)


def moot(reports: Sequence[JobStatus]) -> list[JobStatus]:
    """The reports left once those made moot by an outcome in the same batch are dropped:
    the ``processing`` and ``progress`` of an attempt whose ``completed`` (with an image)
    or ``failed`` is here too. The row goes straight to its outcome (``submitted ->
    completed`` is a transition of its own), saving a statement, a history row and a
    notice for each. Reports meet their outcome in one read when they come in quick
    succession (hosted runners, webhooks) or when the consumer lags behind a backlog."""
    final = {
        (r.generation_id, r.attempt)
        for r in reports
        if r.state == "failed" or (r.state == "completed" and r.image_key)
    }
    if not final:
        return list(reports)
    return [
        r
        for r in reports
        if r.state not in ("processing", "progress") or (r.generation_id, r.attempt) not in final
    ]


def rounds(reports: Sequence[JobStatus]) -> list[list[JobStatus]]:
    """Cut reports into rounds that name each generation at most once, keeping each
    generation's reports in order: its n-th report goes to round n."""
    seen: dict[UUID, int] = defaultdict(int)
    out: list[list[JobStatus]] = []
    for report in reports:
        n = seen[report.generation_id]
        seen[report.generation_id] = n + 1
        if n == len(out):
            out.append([])
        out[n].append(report)
    return out


def _source(report: JobStatus) -> dict[str, str] | None:
    return {"source": report.source} if report.source else None


class StatusProcessor:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.check_after = timedelta(seconds=rt.settings.local_check_s)
        self.thumbnail_grace = timedelta(seconds=rt.settings.thumbnail_grace_s)

    async def handle(self, report: JobStatus) -> None:
        await self.handle_batch([report])

    async def handle_batch(
        self, reports: Sequence[JobStatus], outbox: Outbox | None = None
    ) -> list[JobStatus]:
        """Applies every report: none is left for one-at-a-time handling. What it tells
        goes into ``outbox`` when given (the consumer sends it with the batch's ack),
        else it is sent here."""
        own = outbox is None
        if outbox is None:
            outbox = Outbox(self.rt.publisher)
        try:
            for batch in rounds(moot(reports)):
                by_state: dict[str, list[JobStatus]] = defaultdict(list)
                for report in batch:
                    by_state[report.state].append(report)
                # Distinct generations: the kinds of a round can run side by side.
                results = await asyncio.gather(
                    self._processing(by_state["processing"], outbox),
                    self._progress(by_state["progress"], outbox),
                    self._completed(by_state["completed"], outbox),
                    *(self._failed(report, outbox) for report in by_state["failed"]),
                    return_exceptions=True,
                )
                for result in results:
                    if isinstance(result, BaseException):
                        raise result
        finally:
            # What did move is told even if a later part of the batch failed (by the
            # consumer, with a given outbox).
            if own:
                await outbox.flush()
        return []

    async def _processing(self, reports: list[JobStatus], outbox: Outbox) -> None:
        due = lifecycle.due_in(self.check_after)
        changes = [
            Change(
                r.generation_id, r.attempt, {"next_check_at": due, "runner": r.source}, _source(r)
            )
            for r in reports
        ]
        for row in await lifecycle.transition_many(self.rt.pool, Status.PROCESSING, changes):
            outbox.notify(row, "generation.processing")

    async def _progress(self, reports: list[JobStatus], outbox: Outbox) -> None:
        due = lifecycle.due_in(self.check_after)
        changes = [
            Change(r.generation_id, r.attempt, {"progress": r.progress, "next_check_at": due})
            for r in reports
            if r.progress is not None
        ]
        for row in await lifecycle.record_progress(self.rt.pool, changes):
            outbox.notify(row, "generation.progress")

    async def _completed(self, reports: list[JobStatus], outbox: Outbox) -> None:
        for report in reports:
            if not report.image_key:
                log.error("status.completed_without_image", generation_id=str(report.generation_id))
        reports = [r for r in reports if r.image_key]
        # Kept set until the thumbnail is attached: the reconciler asks again after it.
        due = lifecycle.due_in(self.thumbnail_grace)
        changes = [
            Change(
                r.generation_id,
                r.attempt,
                {
                    "image_key": r.image_key,
                    "image_content_type": r.content_type,
                    "next_check_at": due,
                },
                _source(r),
            )
            for r in reports
        ]
        rows = await lifecycle.transition_many(self.rt.pool, Status.COMPLETED, changes)
        won = {row["id"] for row in rows}
        # Independent of each other (Postgres, the store): side by side, not in series.
        self._observe_durations(rows)
        await asyncio.gather(
            self._discard_unused_images([r for r in reports if r.generation_id not in won]),
            self._clear_leftovers(rows),
        )
        for row in rows:
            log.info("generation.completed", generation_id=str(row["id"]), attempt=row["attempt"])
            outbox.send(
                self.rt.settings.keys.thumbnails,
                ThumbnailRequested(
                    generation_id=row["id"],
                    attempt=row["attempt"],
                    user_id=row["user_id"],
                    image_key=row["image_key"],
                ),
                # Not lost if it fails: the row keeps its check and the reconciler
                # asks for the thumbnail after the grace period.
                required=False,
            )
            outbox.notify(row, "generation.completed")

    async def _clear_leftovers(self, rows: list[asyncpg.Record]) -> None:
        storage = self.rt.storage
        prefixes = [generation_prefix(row["user_id"], row["id"]) for row in rows]
        # A worker killed mid-write leaves a partial file; the winning report clears it.
        # Any other writer of this generation is stale: its rename simply fails.
        partials = await storage.discard_partials(*prefixes)
        if partials:
            log.info("status.partials_deleted", count=partials)
        # Earlier attempts may have stored images whose reports never arrived.
        for row, prefix in zip(rows, prefixes, strict=True):
            if row["attempt"] > 1:
                stale = await sweep(storage, prefix, keep={row["image_key"]})
                if stale:
                    log.info(
                        "status.stale_objects_deleted",
                        generation_id=str(row["id"]),
                        count=len(stale),
                    )

    @staticmethod
    def _observe_durations(rows: list[asyncpg.Record]) -> None:
        """Submit -> completed of the winning attempt, both times on its row."""
        for row in rows:
            start, end = row["submitted_at"], row["completed_at"]
            if start is not None and end is not None:
                seconds = (end - start).total_seconds()
                metrics.GENERATION_DURATION.labels(row["provider"]).observe(max(seconds, 0.0))

    async def _discard_unused_images(self, refused: list[JobStatus]) -> None:
        """Refused ``completed`` reports: delete their image unless it is the one kept."""
        if not refused:
            return
        current = {
            r["id"]: r["image_key"]
            for r in await self.rt.pool.fetch(
                "SELECT id, image_key FROM generations WHERE id = ANY($1::uuid[])",
                [r.generation_id for r in refused],
            )
        }
        for report in refused:
            if current.get(report.generation_id) != report.image_key:
                assert report.image_key is not None
                await self.rt.storage.delete(report.image_key)
                log.info(
                    "status.stale_image_deleted",
                    generation_id=str(report.generation_id),
                    image_key=report.image_key,
                )

    async def _failed(self, report: JobStatus, outbox: Outbox) -> None:
        """Failures are rare and each may start a new attempt: one at a time."""
        pool, gid = self.rt.pool, report.generation_id
        code = report.error_code or "generation_failed"
        message = report.error_message or "the provider reported a failure"
        if report.retryable and report.attempt < self.rt.settings.max_attempts:
            row = await lifecycle.retry(
                pool,
                gid,
                attempt=report.attempt,
                allowed_from=frozenset({Status.SUBMITTED, Status.PROCESSING}),
                detail={"error_code": code, "error_message": message},
                # Waits out its backoff as a queued row; the reconciler publishes it.
                next_check_at=next_attempt_due(report.attempt, self.rt.settings),
            )
            if row is not None:
                outbox.notify(row, "generation.queued")
                return
        row = await lifecycle.transition(
            pool,
            gid,
            attempt=report.attempt,
            to=Status.FAILED,
            error_code=code,
            error_message=message,
        )
        if row is not None:
            log.info("generation.failed", generation_id=str(gid), error_code=code)
            await clear_generation(self.rt.storage, row["user_id"], row["id"])
            outbox.notify(row, "generation.failed")
