"""``gengui reconciler``: finds generations stuck anywhere and moves them on.

Replicas run side by side: each tick leases due checks (``generation_checks``, one
narrow row per generation that has one) with ``FOR UPDATE SKIP LOCKED`` and pushes
them forward in the same statement, so no two replicas act on one generation. Only
live generations and completed ones still without a thumbnail have a check, so a
tick's cost does not grow with finished generations; and the lease writes the narrow
schedule rows, not the wide generations (bench/README.md).

How often a live generation is looked at is its check, set per provider when it is
dispatched: RunPod every ``runpod_check_s`` (5 s), local workers every
``local_check_s`` (2 min), and so on (``providers.registry.check_after``).

Recoveries (each logged as ``reconciler.recovered`` with a reason):
- ``requeue``: queued and not dispatched within the grace period (a lost message, an
  API crash after commit, a Redis restart that lost the stream, a rate-limit wait
  that ended) -> published again;
- ``polled``: a remote job (RunPod, Replicate) whose result never reached us (a lost
  webhook) -> its ``/status`` answer is applied like the webhook would have been;
- ``retry``: a job that is gone -> a new attempt with backoff, or ``failed``
  (``exhausted``) after the last one. Gone means: a queue job whose stream holds no
  backlog any more and that no runner's heartbeat names (the message was lost), a
  processing job whose runner's heartbeat stopped or no longer names it (the runner
  finished it but its report was lost: ``core.heartbeats``), or a remote job that
  never got a provider id. A local job
  found gone while the status stream still held reports not applied is retried only
  once those are (its own may be among them: the status consumers behind, or down);
- ``deadline``: past ``deadline_at`` -> ``failed`` (``timed_out``), and the provider's
  job is cancelled;
- ``thumbnail``: completed without a thumbnail after a grace period -> asked again.

A check left behind by a generation that finished anyway is deleted when it is due.

A job that is merely slow is left alone: a queue with a backlog, a worker still
heartbeating with the job in hand, a remote job still running. Its deadline bounds it.

A tick's cost is per kind of row, not per row: the leased rows are sorted into kinds
and each kind is settled in a few round trips whatever its size (one pipeline of
XADDs for the requeues, one look per queue at its backlog and runners, one ``MGET`` of
the runners' heartbeats (a processing row names its runner), one ``UPDATE ... FROM
unnest`` for the rows to extend). A retry is fenced by the status the job was found gone
in, so a report that lands meanwhile wins.
Queue and worker jobs are leased straight for their provider's check interval, which
is what they get when left alone (the common case), so such a row is written once per
tick; if the tick then dies, they are looked at again after that interval rather than
the grace period. Remote jobs are leased for the grace period and extended after their
poll; polls are per row, ``POLL_CONCURRENCY`` at a time, and local rows do not wait for
them. Every write stays fenced by ``attempt`` and status, row by row.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import asyncpg
from redis.exceptions import ResponseError

from consumers.results import apply_outcome
from core import heartbeats, lifecycle, metrics
from core.events import GenerationRequested, ProviderCancel, ThumbnailRequested, UserEventType
from core.keys import GROUP_STATUS, runners_group
from core.lifecycle import Status
from core.logging import get_logger
from core.notify import notify_many
from core.retry import next_attempt_due
from core.runtime import Runtime
from core.settings import PROVIDERS
from core.storage import clear_generation
from providers.base import Job, classify
from providers.registry import ProviderSet, check_after

log = get_logger(__name__)

# Rows leased per tick: 1,000 stuck rows are settled in one tick (issue target).
BATCH = 1000
POLL_CONCURRENCY = 16

# What settling a leased row reads: a lease returns these, not the whole wide row (its
# decoding was about half the reconciler's CPU in a 1,000-row tick of left-alone rows:
# bench/README.md). A polled row's job (prompt and the rest) is read with one query for
# all of them (``_JOBS``).
_LEASED = """g.id, g.user_id, g.status, g.attempt, g.provider, g.provider_job_id, g.runner,
    g.updated_at, g.image_key, g.thumbnail_key"""
_JOBS = "SELECT * FROM generations WHERE id = ANY($1::uuid[])"

# A due check is leased for as long as its recovery may take: a queued row for the
# grace period (published again after it), a remote row for the grace period (polled
# within it), a queue or worker job straight for its provider's check interval ($3, $4):
# that is what it gets when it is left alone, the common case, so it is written once;
# a missing thumbnail for the thumbnail grace period ($5). The generation is read, not
# written.
_LEASE_DUE = f"""
    WITH due AS (
        SELECT generation_id FROM generation_checks
         WHERE due_at <= now()
         ORDER BY due_at
         LIMIT $1
           FOR UPDATE SKIP LOCKED
    )
    UPDATE generation_checks c
       SET due_at = now() + CASE g.status
           WHEN 'queued' THEN $2::interval
           WHEN 'completed' THEN $5::interval
           ELSE coalesce(($4::interval[])[array_position($3::text[], g.provider::text)],
                         $2::interval) END
      FROM due JOIN generations g ON g.id = due.generation_id
     WHERE c.generation_id = due.generation_id
    RETURNING {_LEASED}
"""

_PAST_DEADLINE = """
    SELECT id, attempt, provider, provider_job_id FROM generations
     WHERE status IN ('queued', 'submitted', 'processing') AND deadline_at <= now()
     LIMIT $1
"""

# Checks of generations that finished with nothing left to ask for, fenced like a
# transition (a generation retried since its lease keeps its new check).
_FORGET = """
    WITH done AS (
        SELECT id FROM generations
         WHERE id = ANY($1::uuid[])
           AND (status IN ('failed', 'cancelled')
                OR (status = 'completed' AND thumbnail_key IS NOT NULL))
           FOR SHARE
    )
    DELETE FROM generation_checks c USING done WHERE c.generation_id = done.id
"""
_EXTENDED_FROM = frozenset({Status.SUBMITTED, Status.PROCESSING})


@dataclass
class _Plan:
    """What a tick decided for some leased rows, carried out together by kind."""

    extend: list[asyncpg.Record] = field(default_factory=list)  # left alone, looked at later
    retry: list[tuple[asyncpg.Record, str]] = field(default_factory=list)  # (row, why gone)
    recheck: list[asyncpg.Record] = field(default_factory=list)  # looked at again soon


StreamId = tuple[int, int]
_NO_ID: StreamId = (0, 0)
# A suspect not seen again for this long has moved on (or another replica has it).
_SUSPECT_FOR_S = 3600.0


def _stream_id(value: bytes | str) -> StreamId:
    ms, _, seq = _text(value).partition("-")
    return int(ms), int(seq or 0)


@dataclass(frozen=True)
class _Applied:
    """How far the status stream has been applied by its consumers."""

    tip: StreamId  # the newest report in it
    delivered: StreamId  # the newest report read by a status consumer
    oldest_pending: StreamId | None  # the oldest report read but not applied (acked) yet

    def through(self, last: StreamId) -> bool:
        """Whether every report up to ``last`` has been applied."""
        return self.delivered >= last and (
            self.oldest_pending is None or self.oldest_pending > last
        )


@dataclass(frozen=True)
class _Queue:
    """What a tick learns of one provider's job queue."""

    backlog: bool  # entries not taken yet
    runners: tuple[str, ...]  # consumers of its group with jobs not acked yet


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class Reconciler:
    def __init__(self, rt: Runtime, providers: ProviderSet | None = None) -> None:
        self.rt = rt
        self.providers = providers or ProviderSet()
        s = rt.settings
        self.grace = timedelta(seconds=s.dispatch_grace_s)
        self.thumbnail_grace = timedelta(seconds=s.thumbnail_grace_s)
        self._polls = asyncio.Semaphore(POLL_CONCURRENCY)
        # Local jobs found gone while reports were still to be applied: (generation,
        # attempt) -> (the status stream's newest id then, when last seen waiting;
        # ``_unless_reported``).
        self._suspects: dict[tuple[UUID, int], tuple[StreamId, float]] = {}
        self._clock = time.monotonic
        # Queue and worker jobs are leased straight for their check interval; remote
        # jobs for the grace period, since their poll may take a while.
        self._leased_for_check = {
            name: check_after(s, name) for name in PROVIDERS if name not in self.providers.polling
        }

    async def tick(self) -> dict[str, int]:
        """One pass over everything that is due; returns recoveries by reason."""
        counts: Counter[str] = Counter(
            {"requeue": 0, "polled": 0, "retry": 0, "exhausted": 0, "deadline": 0, "thumbnail": 0}
        )
        # First: a row past its deadline fails, it is not retried by a lease below.
        counts["deadline"] = await self._deadlines()
        counts.update(await self._lease_and_settle())
        for reason, n in counts.items():
            if n:
                log.info("reconciler.recovered", reason=reason, count=n)
                metrics.RECONCILER_RECOVERIES.labels(reason).inc(n)
        return dict(counts)

    async def _lease_and_settle(self) -> Counter[str]:
        """Lease up to BATCH due checks and settle their generations by kind."""
        rows = await self.rt.pool.fetch(
            _LEASE_DUE,
            BATCH,
            self.grace,
            list(self._leased_for_check),
            list(self._leased_for_check.values()),
            self.thumbnail_grace,
        )
        queued: list[asyncpg.Record] = []
        local: list[asyncpg.Record] = []
        remote: list[asyncpg.Record] = []
        thumbnails: list[asyncpg.Record] = []
        done: list[UUID] = []
        polling = self.providers.polling
        for r in rows:  # one pass: a tick's rows are sorted by kind
            status = r["status"]
            if status == Status.QUEUED:
                queued.append(r)
            elif status in _EXTENDED_FROM:
                (remote if r["provider"] in polling else local).append(r)
            elif status == Status.COMPLETED and r["thumbnail_key"] is None:
                thumbnails.append(r)
            else:
                done.append(r["id"])
        # Side by side: no kind waits for another's round trips, local rows not for polls.
        requeued, settled_local, settled_remote, thumbnailed, _ = await asyncio.gather(
            self._requeue(queued),
            self._settle_local(local),
            self._settle_remote(remote),
            self._thumbnails(thumbnails),
            self._forget(done),
        )
        counts = settled_local + settled_remote
        counts["requeue"] = requeued
        counts["thumbnail"] = thumbnailed
        return counts

    async def _forget(self, ids: list[UUID]) -> None:
        """Checks left by generations that finished anyway (rare: a race with a lease)."""
        if ids:
            await self.rt.pool.execute(_FORGET, ids)

    async def _requeue(self, rows: Sequence[asyncpg.Record]) -> int:
        """Queued rows (the common case after Redis lost its streams): one pipeline."""
        requeue = [
            GenerationRequested(generation_id=r["id"], attempt=r["attempt"], provider=r["provider"])
            for r in rows
        ]
        await self.rt.publisher.send_many(self.rt.settings.keys.requested, requeue)
        return len(requeue)

    async def _settle_local(self, rows: Sequence[asyncpg.Record]) -> Counter[str]:
        """Queue and worker jobs: each queue asked once (its backlog and its runners),
        then every runner's heartbeat in one Redis round trip."""
        if not rows:
            return Counter()
        submitted = [r for r in rows if r["status"] == Status.SUBMITTED]
        processing = [r for r in rows if r["status"] == Status.PROCESSING]
        queues = await self._queues({r["provider"] for r in submitted})
        # A submitted row's job may be in a runner's hands before its processing report
        # lands (reported after worker_processing_after_s, or late on a slow machine):
        # the queue's runners are asked too, not only the rows' own.
        runners = {r["runner"] for r in processing if r["runner"]}
        runners.update(name for q in queues.values() if not q.backlog for name in q.runners)
        held = await self._held(runners)
        plan = _Plan()
        for row in submitted:
            q = queues[row["provider"]]
            if q.backlog or any(
                heartbeats.covers(held[name], row["id"], row["attempt"]) for name in q.runners
            ):
                plan.extend.append(row)  # waiting its turn in the queue, or just taken
            else:
                plan.retry.append((row, "job_lost"))
        for row in processing:
            runner = row["runner"]
            if runner and heartbeats.covers(held[runner], row["id"], row["attempt"]):
                plan.extend.append(row)  # a long job on a live worker
            else:
                plan.retry.append((row, "runner_gone"))
        await self._unless_reported(plan)
        return await self._carry_out(plan)

    async def _unless_reported(self, plan: _Plan) -> None:
        """A local job no runner holds may have finished with its report still on its
        way: in the status stream, not yet applied (the status consumers slow, or down
        for a while). Such a job is retried only once every report that was in the
        stream when it was first found gone has been applied; until then it is looked at
        again every ``reconcile_interval_s``. Otherwise a consumers outage would have
        every job that finished meanwhile run again, and its result dropped as stale."""
        if not plan.retry:
            return
        applied = await self._status_applied()
        now = self._clock()
        gone: list[tuple[asyncpg.Record, str]] = []
        for row, why in plan.retry:
            ref = (row["id"], row["attempt"])
            since = self._suspects.get(ref, (applied.tip, now))[0]
            if applied.through(since):
                gone.append((row, why))
                self._suspects.pop(ref, None)
            else:
                self._suspects[ref] = (since, now)  # seen now: kept while it waits
                plan.recheck.append(row)
        plan.retry = gone
        if plan.recheck:
            # The status consumers are behind or down: say so, retries are held back.
            log.info("reconciler.waiting_for_reports", count=len(plan.recheck))
        # Rows that moved on are never seen again here: forget them after a while.
        stale = now - _SUSPECT_FOR_S
        for ref in [ref for ref, (_, at) in self._suspects.items() if at < stale]:
            del self._suspects[ref]

    async def _status_applied(self) -> _Applied:
        """How far the status consumers have applied the status stream: one round trip."""
        stream = self.rt.settings.keys.job_status
        async with self.rt.redis.pipeline(transaction=False) as pipe:
            pipe.xinfo_stream(stream)
            pipe.xinfo_groups(stream)
            pipe.xpending(stream, GROUP_STATUS)
            info, groups, pending = await pipe.execute(raise_on_error=False)
        if isinstance(info, ResponseError):  # no stream: no report on its way
            return _Applied(tip=_NO_ID, delivered=_NO_ID, oldest_pending=None)
        delivered = _NO_ID  # no group yet: nothing was applied
        for g in () if isinstance(groups, ResponseError) else groups:
            if _text(g["name"]) == GROUP_STATUS:
                delivered = _stream_id(g["last-delivered-id"])
        oldest = None
        if not isinstance(pending, ResponseError) and pending["pending"]:
            oldest = _stream_id(pending["min"])
        return _Applied(
            tip=_stream_id(info["last-generated-id"]), delivered=delivered, oldest_pending=oldest
        )

    async def _settle_remote(self, rows: Sequence[asyncpg.Record]) -> Counter[str]:
        """RunPod/Replicate jobs: those that never got a provider id are settled
        together; the others are polled concurrently (see ``_poll``)."""
        if not rows:
            return Counter()
        with_id = [r for r in rows if r["provider_job_id"]]
        plan = _Plan()
        for row in (r for r in rows if not r["provider_job_id"]):
            # Never got an id: the submit failed or its process died. Give an in-flight
            # submit its full timeout before calling it gone.
            age = (datetime.now(UTC) - row["updated_at"]).total_seconds()
            if age < self.rt.settings.provider_timeout_s:
                plan.extend.append(row)
            else:
                plan.retry.append((row, "not_submitted"))
        polled, counts = await asyncio.gather(self._poll_all(with_id), self._carry_out(plan))
        counts.update(reason for reason in polled if reason)
        return counts

    async def _carry_out(self, plan: _Plan) -> Counter[str]:
        await self._extend(plan.extend)
        await self._recheck(plan.recheck)
        return await self._retry(plan.retry)

    async def _recheck(self, rows: Sequence[asyncpg.Record]) -> None:
        """Rows found gone whose report may still land: looked at again next tick."""
        if not rows:
            return
        due = lifecycle.due_in(timedelta(seconds=self.rt.settings.reconcile_interval_s))
        changes = [lifecycle.Change(r["id"], r["attempt"], {"next_check_at": due}) for r in rows]
        await lifecycle.reschedule(self.rt.pool, changes, _EXTENDED_FROM)

    async def _extend(self, rows: Sequence[asyncpg.Record]) -> None:
        """Rows left alone are looked at again after their provider's check interval.
        Queue and worker jobs of a known provider were leased for it: no second write."""
        rows = [r for r in rows if r["provider"] not in self._leased_for_check]
        if not rows:
            return
        due = {
            p: lifecycle.due_in(check_after(self.rt.settings, p))
            for p in {r["provider"] for r in rows}
        }
        changes = [
            lifecycle.Change(r["id"], r["attempt"], {"next_check_at": due[r["provider"]]})
            for r in rows
        ]
        # Fenced: a row that moved on since the lease (a result landed, another attempt
        # started) keeps the check that change left.
        await lifecycle.reschedule(self.rt.pool, changes, _EXTENDED_FROM)

    async def _queue(self, provider: str) -> _Queue:
        """A queue's backlog (entries no runner took yet: a slow queue, not a lost job)
        and its runners (the consumers of its group), in one round trip."""
        stream = self.rt.settings.keys.jobs(provider)
        group = runners_group(provider)
        async with self.rt.redis.pipeline(transaction=False) as pipe:
            pipe.xinfo_groups(stream)
            pipe.xinfo_consumers(stream, group)
            pipe.xlen(stream)
            groups, consumers, length = await pipe.execute(raise_on_error=False)
        if isinstance(groups, ResponseError):
            return _Queue(backlog=False, runners=())  # no stream: whatever was in it is gone
        # Only consumers with entries not acked yet can hold a job: not the many that
        # were restarted or stopped long ago.
        runners = (
            ()
            if isinstance(consumers, ResponseError)
            else tuple(_text(c["name"]) for c in consumers if c["pending"])
        )
        for g in groups:
            if _text(g["name"]) == group:
                lag = g.get("lag")
                return _Queue(backlog=bool(lag) if lag is not None else True, runners=runners)
        # No runner ever read it: anything in the stream is backlog.
        return _Queue(backlog=bool(length), runners=runners)

    async def _queues(self, providers: set[str]) -> dict[str, _Queue]:
        """``_queue`` of each queue, asked once per tick whatever its rows."""
        names = sorted(providers)
        return dict(zip(names, await asyncio.gather(*map(self._queue, names)), strict=True))

    async def _held(self, runners: set[str]) -> dict[str, frozenset[str] | None]:
        """The jobs each runner's heartbeat names as in hand (``core.heartbeats``): none
        for a runner whose heartbeat stopped. A few runners hold many jobs: one GET per
        runner, all in one round trip, each key parsed once."""
        names = sorted(runners)
        if not names:
            return {}
        keys = self.rt.settings.keys
        beats = await self.rt.redis.mget([keys.worker_heartbeat(name) for name in names])
        return {n: heartbeats.jobs_held(v) for n, v in zip(names, beats, strict=True)}

    async def _poll_all(self, leased: Sequence[asyncpg.Record]) -> list[str | None]:
        if not leased:
            return []
        attempts = {r["id"]: r["attempt"] for r in leased}
        rows = await self.rt.pool.fetch(_JOBS, list(attempts))
        # A row that started another attempt since the lease is not this lease's to poll.
        current = [row for row in rows if attempts[row["id"]] == row["attempt"]]
        return await asyncio.gather(*(self._poll(row) for row in current))

    async def _poll(self, row: asyncpg.Record) -> str | None:
        """Ask the provider about one job and apply what it says. A job still running is
        extended at once, not with the others: its lease is only the grace period, and
        the slowest of many polls may take longer than that."""
        name = row["provider"]
        try:
            async with self._polls:
                outcome = await self.providers.polling[name].poll(Job.from_row(row))
        except Exception as exc:
            failure = classify(exc)
            log.warning("reconciler.poll_failed", provider=name, code=failure.code)
            metrics.PROVIDER_ERRORS.labels(name, failure.code).inc()
            return None  # asked again after the lease (the grace period)
        done = await apply_outcome(
            self.rt,
            provider=name,
            generation_id=row["id"],
            attempt=row["attempt"],
            user_id=row["user_id"],
            outcome=outcome,
        )
        if done in ("waiting", "processing", "fetching"):
            await self._extend([row])
            return None
        return "polled"

    async def _retry(self, gone: Sequence[tuple[asyncpg.Record, str]]) -> Counter[str]:
        """Jobs that are gone: a new attempt each, or ``failed`` after the last one."""
        counts: Counter[str] = Counter()
        if not gone:
            return counts
        await self._cancel_at_providers([row for row, _ in gone])
        results = await asyncio.gather(*(self._retry_one(row, why) for row, why in gone))
        moved = [m for m in results if m is not None]
        await self._clear([row for reason, row in moved if reason == "exhausted"])
        notices: list[tuple[asyncpg.Record, UserEventType]] = [
            (row, "generation.failed" if reason == "exhausted" else "generation.queued")
            for reason, row in moved
        ]
        await notify_many(self.rt.publisher, notices)
        counts.update(reason for reason, _ in moved)
        return counts

    async def _retry_one(self, row: asyncpg.Record, why: str) -> tuple[str, asyncpg.Record] | None:
        """The CAS for one gone job: ``(reason, new row)``, or None when it moved on."""
        rt = self.rt
        gid, attempt = row["id"], row["attempt"]
        # Fenced by the status the job was found gone in, not only its attempt: a
        # submitted job whose processing report landed since the lease is not lost.
        seen = frozenset({Status(row["status"])})
        if attempt >= rt.settings.max_attempts:
            failed = await lifecycle.transition(
                rt.pool,
                gid,
                attempt=attempt,
                to=Status.FAILED,
                allowed_from=seen,
                error_code="no_result",
                error_message=f"no result after {attempt} attempts",
                detail={"reason": why},
            )
            return ("exhausted", failed) if failed is not None else None
        # The new attempt waits out its backoff as a queued row; the requeue path
        # publishes it when due, so a retry survives losing the stream too.
        retried = await lifecycle.retry(
            rt.pool,
            gid,
            attempt=attempt,
            allowed_from=seen,
            detail={"reason": why},
            next_check_at=next_attempt_due(attempt, rt.settings),
        )
        return ("retry", retried) if retried is not None else None

    async def _cancel_at_providers(self, rows: Sequence[Any]) -> None:
        """Remote jobs we give up on are stopped at the provider (best effort, queued)."""
        cancels = [
            ProviderCancel(
                generation_id=row["id"],
                attempt=row["attempt"],
                provider=row["provider"],
                provider_job_id=row["provider_job_id"],
            )
            for row in rows
            if row["provider_job_id"]
        ]
        await self.rt.publisher.send_many(self.rt.settings.keys.cancels, cancels)

    async def _clear(self, failed: Sequence[asyncpg.Record]) -> None:
        """Failed generations keep no image (one whose report was lost, a partial)."""
        await asyncio.gather(
            *(clear_generation(self.rt.storage, row["user_id"], row["id"]) for row in failed)
        )

    async def _deadlines(self) -> int:
        rows = await self.rt.pool.fetch(_PAST_DEADLINE, BATCH)
        timed_out = {
            "error_code": "timed_out",
            "error_message": "the generation did not finish before its deadline",
        }
        changes = [lifecycle.Change(row["id"], row["attempt"], timed_out) for row in rows]
        moved = await lifecycle.transition_many(self.rt.pool, Status.FAILED, changes)
        by_id = {row["id"]: row for row in rows}
        ended = [(by_id[failed["id"]], failed) for failed in moved]
        await self._cancel_at_providers([row for row, _ in ended])
        await self._clear([failed for _, failed in ended])
        await notify_many(self.rt.publisher, [(failed, "generation.failed") for _, failed in ended])
        return len(ended)

    async def _thumbnails(self, rows: Sequence[asyncpg.Record]) -> int:
        """Completed generations whose thumbnail never came: asked again."""
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
