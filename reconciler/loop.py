"""``gengui reconciler``: finds generations stuck anywhere and moves them on.

Replicas run side by side: each tick leases due rows with ``FOR UPDATE SKIP LOCKED``
and pushes their ``next_check_at`` forward in the same statement, so no two replicas
act on one row. The scans use partial indexes on live rows only, so a tick's cost
does not grow with finished generations.

How often a live row is looked at is its ``next_check_at``, set per provider when it
is dispatched: RunPod every ``runpod_check_s`` (5 s), local workers every
``local_check_s`` (2 min), and so on (``providers.registry.check_after``).

Recoveries (each logged as ``reconciler.recovered`` with a reason):
- ``requeue``: queued and not dispatched within the grace period (a lost message, an
  API crash after commit, a Redis restart that lost the stream, a rate-limit wait
  that ended) -> published again;
- ``polled``: a remote job (RunPod, Replicate) whose result never reached us (a lost
  webhook) -> its ``/status`` answer is applied like the webhook would have been;
- ``retry``: a job that is gone -> a new attempt with backoff, or ``failed``
  (``exhausted``) after the last one. Gone means: a queue job whose stream holds no
  backlog any more (the message was lost), a processing job whose runner's
  heartbeat stopped, or a remote job that never got a provider id;
- ``deadline``: past ``deadline_at`` -> ``failed`` (``timed_out``), and the provider's
  job is cancelled;
- ``thumbnail``: completed without a thumbnail after a grace period -> asked again.

A job that is merely slow is left alone: a queue with a backlog, a worker still
heartbeating, a remote job still running. Its deadline bounds it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from redis.exceptions import ResponseError

from consumers.results import apply_outcome
from core import lifecycle, metrics
from core.events import GenerationRequested, ProviderCancel, ThumbnailRequested
from core.keys import GROUP_GPU_WORKERS, GROUP_HOSTED
from core.lifecycle import Status
from core.logging import get_logger
from core.notify import notify
from core.retry import next_attempt_due
from core.runtime import Runtime
from core.storage import clear_generation
from providers.base import Job, classify
from providers.registry import ProviderSet, check_after

log = get_logger(__name__)

BATCH = 500
POLL_CONCURRENCY = 16

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
    SELECT id, attempt, provider, provider_job_id FROM generations
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
    def __init__(self, rt: Runtime, providers: ProviderSet | None = None) -> None:
        self.rt = rt
        self.providers = providers or ProviderSet()
        s = rt.settings
        self.grace = timedelta(seconds=s.dispatch_grace_s)
        self.thumbnail_grace = timedelta(seconds=s.thumbnail_grace_s)
        self._polls = asyncio.Semaphore(POLL_CONCURRENCY)

    async def tick(self) -> dict[str, int]:
        """One pass over everything that is due; returns recoveries by reason."""
        counts: Counter[str] = Counter(
            {"requeue": 0, "polled": 0, "retry": 0, "exhausted": 0, "deadline": 0, "thumbnail": 0}
        )
        counts["deadline"] = await self._deadlines()
        rows = await self.rt.pool.fetch(_LEASE_DUE, BATCH, self.grace)
        # Whether each queue stream still holds a backlog: asked once per tick, up front
        # (the row handlers run concurrently and would each ask otherwise).
        queued_providers = {
            r["provider"]
            for r in rows
            if r["status"] == Status.SUBMITTED and r["provider"] not in self.providers.polling
        }
        backlog = {p: await self._has_backlog(p) for p in sorted(queued_providers)}
        # Queued rows (the common case after Redis lost its streams) go out in one pipeline.
        requeue = [
            GenerationRequested(generation_id=r["id"], attempt=r["attempt"])
            for r in rows
            if r["status"] == Status.QUEUED
        ]
        await self.rt.publisher.send_many(self.rt.settings.keys.requested, requeue)
        counts["requeue"] = len(requeue)
        others = [r for r in rows if r["status"] != Status.QUEUED]
        reasons = await asyncio.gather(*(self._recover(row, backlog) for row in others))
        counts.update(r for r in reasons if r)
        counts["thumbnail"] = await self._thumbnails()
        for reason, n in counts.items():
            if n:
                log.info("reconciler.recovered", reason=reason, count=n)
                metrics.RECONCILER_RECOVERIES.labels(reason).inc(n)
        return dict(counts)

    async def _recover(self, row: asyncpg.Record, backlog: dict[str, bool]) -> str | None:
        status, provider = Status(row["status"]), row["provider"]
        if provider in self.providers.polling:
            return await self._check_remote(row)
        if status is Status.SUBMITTED:
            if backlog[provider]:
                return await self._extend(row)  # still waiting its turn in the queue
            return await self._retry(row, "job_lost")
        if await self._runner_alive(row):
            return await self._extend(row)  # a long job on a live worker
        return await self._retry(row, "runner_gone")

    async def _extend(self, row: asyncpg.Record, reason: str | None = None) -> str | None:
        await self.rt.pool.execute(
            """UPDATE generations SET next_check_at = $3
                WHERE id = $1 AND attempt = $2 AND status IN ('submitted', 'processing')""",
            row["id"],
            row["attempt"],
            lifecycle.due_in(check_after(self.rt.settings, row["provider"])),
        )
        return reason

    async def _has_backlog(self, provider: str) -> bool:
        """Entries not yet taken by the provider's runners: a slow queue, not a lost job."""
        group = GROUP_GPU_WORKERS if provider == "local" else GROUP_HOSTED
        try:
            groups = await self.rt.redis.xinfo_groups(self.rt.settings.keys.jobs(provider))
        except ResponseError:
            return False  # no stream at all: whatever was in it is gone
        for g in groups:
            name = g["name"].decode() if isinstance(g["name"], bytes) else g["name"]
            if name == group:
                lag = g.get("lag")
                return bool(lag) if lag is not None else True
        # No runner ever read it: anything in the stream is backlog.
        return bool(await self.rt.redis.xlen(self.rt.settings.keys.jobs(provider)))

    async def _runner_alive(self, row: asyncpg.Record) -> bool:
        source = await self.rt.pool.fetchval(
            """SELECT detail->>'source' FROM generation_events
                WHERE generation_id = $1 AND attempt = $2 AND status = 'processing'
                ORDER BY id DESC LIMIT 1""",
            row["id"],
            row["attempt"],
        )
        if not source:
            return False
        return bool(await self.rt.redis.exists(self.rt.settings.keys.worker_heartbeat(source)))

    async def _check_remote(self, row: asyncpg.Record) -> str | None:
        """A RunPod/Replicate job: ask the provider; apply what it says."""
        rt, name = self.rt, row["provider"]
        if not row["provider_job_id"]:
            # Never got an id: the submit failed or its process died. Give an in-flight
            # submit its full timeout before calling it gone.
            age = (datetime.now(UTC) - row["updated_at"]).total_seconds()
            if age < rt.settings.provider_timeout_s:
                return await self._extend(row)
            return await self._retry(row, "not_submitted")
        try:
            async with self._polls:
                outcome = await self.providers.polling[name].poll(Job.from_row(row))
        except Exception as exc:
            failure = classify(exc)
            log.warning("reconciler.poll_failed", provider=name, code=failure.code)
            metrics.PROVIDER_ERRORS.labels(name, failure.code).inc()
            return None  # asked again after the lease (the grace period)
        done = await apply_outcome(
            rt,
            provider=name,
            generation_id=row["id"],
            attempt=row["attempt"],
            user_id=row["user_id"],
            outcome=outcome,
        )
        if done in ("waiting", "processing", "fetching"):
            return await self._extend(row)
        return "polled"

    async def _retry(self, row: asyncpg.Record, why: str) -> str | None:
        rt = self.rt
        gid, attempt = row["id"], row["attempt"]
        await self._cancel_at_provider(row)
        if attempt >= rt.settings.max_attempts:
            failed = await lifecycle.transition(
                rt.pool,
                gid,
                attempt=attempt,
                to=Status.FAILED,
                error_code="no_result",
                error_message=f"no result after {attempt} attempts",
                detail={"reason": why},
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
            detail={"reason": why},
            next_check_at=next_attempt_due(attempt, rt.settings),
        )
        if retried is None:
            return None
        await notify(rt.publisher, retried, "generation.queued")
        return "retry"

    async def _cancel_at_provider(self, row: Any) -> None:
        """Remote jobs we give up on are stopped at the provider (best effort, queued)."""
        if row["provider_job_id"]:
            await self.rt.publisher.send(
                self.rt.settings.keys.cancels,
                ProviderCancel(
                    generation_id=row["id"],
                    attempt=row["attempt"],
                    provider=row["provider"],
                    provider_job_id=row["provider_job_id"],
                ),
            )

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
                await self._cancel_at_provider(row)
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
