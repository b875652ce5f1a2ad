"""``gengui reconciler``: finds generations stuck anywhere and moves them on.

Replicas run side by side: each tick leases due rows with ``FOR UPDATE SKIP LOCKED``
and pushes their ``next_check_at`` forward in the same statement, so no two replicas
act on one row. The scans use partial indexes on live rows only, so a tick's cost
does not grow with finished generations.

Recoveries (each logged as ``reconciler.recovered`` with a reason):
- ``requeue``: queued and not dispatched within the grace period (a lost message, an
  API crash after commit, a Redis restart that lost the stream) -> published again;
- ``retry``: submitted/processing with no report within ``local_check_s`` (a dead
  worker, a lost job) -> a new attempt, or ``failed`` after the last one;
- ``deadline``: past ``deadline_at`` -> ``failed`` (``timed_out``);
- ``thumbnail``: completed without a thumbnail after a grace period -> asked again.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import timedelta

from core import lifecycle
from core.events import GenerationRequested, ThumbnailRequested
from core.lifecycle import Status
from core.logging import get_logger
from core.notify import notify
from core.retry import next_attempt_due
from core.runtime import Runtime
from core.storage import clear_generation

log = get_logger(__name__)

BATCH = 500

_LEASE_DUE = """
    WITH due AS (
        SELECT id FROM generations
         WHERE status IN ('queued', 'submitted', 'processing') AND next_check_at <= now()
         ORDER BY next_check_at
         LIMIT $1
           FOR UPDATE SKIP LOCKED
    )
    UPDATE generations g SET next_check_at = now() + $2::interval
      FROM due WHERE g.id = due.id
    RETURNING g.*
"""

_PAST_DEADLINE = """
    SELECT id, attempt FROM generations
     WHERE status IN ('queued', 'submitted', 'processing') AND deadline_at <= now()
     LIMIT $1
"""

_LEASE_THUMBNAILS = """
    WITH due AS (
        SELECT id FROM generations
         WHERE status = 'completed' AND thumbnail_key IS NULL AND next_check_at <= now()
         ORDER BY next_check_at
         LIMIT $1
           FOR UPDATE SKIP LOCKED
    )
    UPDATE generations g SET next_check_at = now() + $2::interval
      FROM due WHERE g.id = due.id
    RETURNING g.id, g.attempt, g.user_id, g.image_key
"""


class Reconciler:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        s = rt.settings
        self.grace = timedelta(seconds=s.dispatch_grace_s)
        self.thumbnail_grace = timedelta(seconds=s.thumbnail_grace_s)

    async def tick(self) -> dict[str, int]:
        """One pass over everything that is due; returns recoveries by reason."""
        counts = {"requeue": 0, "retry": 0, "exhausted": 0, "deadline": 0, "thumbnail": 0}
        counts["deadline"] = await self._deadlines()
        rows = await self.rt.pool.fetch(_LEASE_DUE, BATCH, self.grace)
        for row in rows:
            reason = await self._recover(row)
            if reason:
                counts[reason] += 1
        counts["thumbnail"] = await self._thumbnails()
        for reason, n in counts.items():
            if n:
                log.info("reconciler.recovered", reason=reason, count=n)
        return counts

    async def _recover(self, row: object) -> str | None:
        rt, keys = self.rt, self.rt.settings.keys
        gid, attempt, status = row["id"], row["attempt"], Status(row["status"])  # type: ignore[index]
        if status is Status.QUEUED:
            await rt.publisher.send(
                keys.requested, GenerationRequested(generation_id=gid, attempt=attempt)
            )
            return "requeue"
        if attempt >= rt.settings.max_attempts:
            failed = await lifecycle.transition(
                rt.pool,
                gid,
                attempt=attempt,
                to=Status.FAILED,
                error_code="no_result",
                error_message=f"no result after {attempt} attempts",
            )
            if failed is not None:
                await clear_generation(rt.storage, failed["user_id"], gid)
                await notify(rt.publisher, failed, "generation.failed")
            return "exhausted" if failed is not None else None
        # The new attempt waits out its backoff as a queued row; the requeue path
        # publishes it when due, so a retry survives losing the stream too.
        retried = await lifecycle.retry(
            rt.pool,
            gid,
            attempt=attempt,
            allowed_from=frozenset({Status.SUBMITTED, Status.PROCESSING}),
            detail={"reason": "no_report"},
            next_check_at=next_attempt_due(attempt, rt.settings),
        )
        if retried is None:
            return None
        await notify(rt.publisher, retried, "generation.queued")
        return "retry"

    async def _deadlines(self) -> int:
        n = 0
        for row in await self.rt.pool.fetch(_PAST_DEADLINE, BATCH):
            failed = await lifecycle.transition(
                self.rt.pool,
                row["id"],
                attempt=row["attempt"],
                to=Status.FAILED,
                error_code="timed_out",
                error_message="the generation did not finish before its deadline",
            )
            if failed is not None:
                n += 1
                await clear_generation(self.rt.storage, failed["user_id"], failed["id"])
                await notify(self.rt.publisher, failed, "generation.failed")
        return n

    async def _thumbnails(self) -> int:
        rows = await self.rt.pool.fetch(_LEASE_THUMBNAILS, BATCH, self.thumbnail_grace)
        messages = [
            ThumbnailRequested(
                generation_id=r["id"],
                attempt=r["attempt"],
                user_id=r["user_id"],
                image_key=r["image_key"],
            )
            for r in rows
        ]
        await self.rt.publisher.send_many(self.rt.settings.keys.thumbnails, messages)
        return len(messages)

    async def run(self, stop: asyncio.Event) -> None:
        interval = self.rt.settings.reconcile_interval_s
        log.info("reconciler.started", interval_s=interval)
        while not stop.is_set():
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                # A failed tick (database restarting) is retried next interval.
                log.exception("reconciler.tick_failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
