"""Hosted runners: ``gengui:jobs:{gemini,openai}`` -> a synchronous API call -> our storage.

A hosted call takes seconds, so it never runs on the dispatch loop. Each sync
provider has its own stream and consumer, so a slow provider cannot take the slots of
another; ``provider_concurrency`` bounds calls in flight per provider per process and
the shared token bucket (``provider_rate_limits``) bounds them across replicas. A job
over the rate limit waits for its token (bounded by its deadline); none is dropped.
Slots are refilled as calls end (``ConsumerConfig.continuous``): one slow call holds its
own slot, not the ``provider_concurrency - 1`` others read with it.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import structlog

from consumers.results import apply_outcome, report, report_failure
from core import heartbeats, metrics
from core.events import LocalJob
from core.keys import GROUP_HOSTED
from core.logging import get_logger
from core.ratelimit import RateLimiter
from core.runtime import Runtime, consumer_name
from core.service import Loop, with_companions
from core.streams import StreamConsumer, dedicated_client
from providers.base import Failure, Job, SyncProvider, classify

log = get_logger(__name__)


class HostedRunner:
    def __init__(self, rt: Runtime, provider: SyncProvider, limiter: RateLimiter) -> None:
        self.rt = rt
        self.provider = provider
        self.limiter = limiter
        self.runner_id = consumer_name(f"hosted-{provider.name}")
        self.in_hand = heartbeats.InHand()

    async def _wait_for_token(self, job: LocalJob) -> bool:
        """Wait for the provider's rate limit; False when the deadline comes first."""
        while True:
            wait_s = await self.limiter.take(self.provider.name)
            if wait_s <= 0:
                return True
            if job.deadline_at is not None:
                left = (job.deadline_at - datetime.now(UTC)).total_seconds()
                if left <= wait_s:
                    return False
            await asyncio.sleep(wait_s)

    async def handle(self, job: LocalJob) -> None:
        structlog.contextvars.bind_contextvars(
            generation_id=str(job.generation_id), attempt=job.attempt
        )
        with self.in_hand.holding(job.generation_id, job.attempt):
            await self._run(job)

    async def _run(self, job: LocalJob) -> None:
        name, gid, attempt = self.provider.name, job.generation_id, job.attempt
        if job.deadline_at is not None and job.deadline_at <= datetime.now(UTC):
            failure = Failure(False, "timed_out", "deadline passed before the call started")
            await report_failure(self.rt, gid, attempt, self.runner_id, failure)
            return
        if not await self._wait_for_token(job):
            failure = Failure(False, "timed_out", "rate limited until the deadline")
            await report_failure(self.rt, gid, attempt, self.runner_id, failure)
            return
        await report(self.rt, gid, attempt, self.runner_id, state="processing")
        try:
            async with asyncio.timeout(self.rt.settings.provider_timeout_s):
                outcome = await self.provider.generate(
                    Job(
                        generation_id=gid,
                        attempt=attempt,
                        user_id=job.user_id,
                        prompt=job.prompt,
                        negative_prompt=job.negative_prompt,
                        width=job.width,
                        height=job.height,
                        seed=job.seed,
                        deadline_at=job.deadline_at,
                    )
                )
        except Exception as exc:
            failure = classify(exc)
            log.warning("hosted.call_failed", provider=name, code=failure.code)
            metrics.PROVIDER_ERRORS.labels(name, failure.code).inc()
            await report_failure(self.rt, gid, attempt, name, failure)
            return
        await apply_outcome(
            self.rt,
            provider=name,
            generation_id=gid,
            attempt=attempt,
            user_id=job.user_id,
            outcome=outcome,
        )


def hosted_loops(
    rt: Runtime, providers: dict[str, SyncProvider], limiter: RateLimiter
) -> dict[str, Loop]:
    loops: dict[str, Loop] = {}
    for name, provider in providers.items():
        runner = HostedRunner(rt, provider, limiter)
        n = rt.settings.provider_concurrency
        consumer = StreamConsumer(
            dedicated_client(rt.redis_url),
            rt.redis,
            rt.consumer_config(
                rt.settings.keys.jobs(name),
                GROUP_HOSTED,
                f"hosted-{name}",
                batch=n,
                concurrency=n,
                continuous=True,  # a finished job's slot takes the next one
                # Like GPU workers: a job of a dead runner is retried by the
                # reconciler as attempt + 1, never re-run under its old attempt.
                reclaim_idle_ms=int(rt.settings.provider_timeout_s * 2000),
                drop_idle=True,
            ),
            LocalJob,
            runner.handle,
            publisher=rt.publisher,  # its acks go out together
        )

        async def beat(stop: asyncio.Event, runner: HostedRunner = runner) -> None:
            await heartbeats.beat(rt, runner.runner_id, runner.in_hand, stop)

        # The heartbeat outlives the stop request until the calls in flight are done.
        loops[f"hosted:{name}"] = with_companions(consumer.run, beat)
    return loops
