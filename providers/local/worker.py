"""``gengui worker``: takes jobs from ``gengui:jobs:local``, runs an engine, stores the
image, reports ``processing`` then ``completed`` (or ``failed``) on ``gengui:job:status``.

A worker needs Redis and the object store, never the database. It heartbeats a key
with a TTL so the reconciler can tell a slow job from a dead worker. On stop it
finishes the job in hand; entries it had not started stay pending and are reclaimed.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime
from typing import Any

import structlog

from core.events import JobStatus, LocalJob
from core.imaging import ImageRejected, sniff_image
from core.keys import GROUP_GPU_WORKERS
from core.logging import get_logger
from core.runtime import Runtime, consumer_name
from core.service import Loop, with_companions
from core.storage import original_key
from core.streams import StreamConsumer, dedicated_client
from providers.local.engines import Engine

log = get_logger(__name__)


class Worker:
    def __init__(self, rt: Runtime, engine: Engine) -> None:
        self.rt = rt
        self.engine = engine
        self.worker_id = consumer_name("worker")

    async def _report(self, job: LocalJob, **fields: Any) -> None:
        message = JobStatus(
            generation_id=job.generation_id,
            attempt=job.attempt,
            source=self.worker_id,
            **fields,
        )
        await self.rt.publisher.send(self.rt.settings.keys.job_status, message)

    async def handle(self, job: LocalJob) -> None:
        structlog.contextvars.bind_contextvars(
            generation_id=str(job.generation_id), attempt=job.attempt
        )
        if job.deadline_at is not None and job.deadline_at <= datetime.now(UTC):
            await self._report(
                job,
                state="failed",
                error_code="timed_out",
                error_message="deadline passed before the job started",
            )
            return
        await self._report(job, state="processing")
        loop = asyncio.get_running_loop()

        def progress(fraction: float) -> None:
            # Called from the engine's thread.
            asyncio.run_coroutine_threadsafe(
                self._report(job, state="progress", progress=fraction), loop
            )

        try:
            data = await asyncio.to_thread(self.engine.generate, job, progress)
            ext, content_type = sniff_image(data)
        except ImageRejected as exc:
            await self._report(job, state="failed", error_code=exc.code, error_message=str(exc))
            return
        except Exception as exc:
            log.exception("worker.engine_failed")
            await self._report(
                job,
                state="failed",
                error_code="engine_error",
                error_message=repr(exc)[:500],
                retryable=True,
            )
            return
        key = original_key(job.user_id, job.generation_id, job.attempt, ext)
        await self.rt.storage.put(key, data, content_type)
        await self._report(job, state="completed", image_key=key, content_type=content_type)
        log.info("worker.job_done", engine=self.engine.name, bytes=len(data))

    async def heartbeat(self, stop: asyncio.Event) -> None:
        await heartbeat(self.rt, self.worker_id, stop)


async def heartbeat(rt: Runtime, worker_id: str, stop: asyncio.Event) -> None:
    """Keep ``worker:{id}`` alive while this runner lives; the reconciler reads it to
    tell a long job from a dead runner. Removed on a clean stop."""
    key = rt.settings.keys.worker_heartbeat(worker_id)
    interval = rt.settings.worker_heartbeat_s
    while not stop.is_set():
        with contextlib.suppress(Exception):
            await rt.redis.set(key, datetime.now(UTC).isoformat(), ex=max(1, int(interval * 3)))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)
    with contextlib.suppress(Exception):
        await rt.redis.delete(key)


def worker_loops(rt: Runtime, engine: Engine) -> dict[str, Loop]:
    worker = Worker(rt, engine)
    n = rt.settings.worker_concurrency
    consumer = StreamConsumer(
        dedicated_client(rt.redis_url),
        rt.redis,
        # Take only as many jobs as we run at once: the rest stay for other workers.
        rt.consumer_config(
            rt.settings.keys.jobs_local,
            GROUP_GPU_WORKERS,
            "worker",
            batch=n,
            concurrency=n,
            # A job of a dead worker is not run again under its attempt: the reconciler
            # starts attempt + 1 once the row has been silent for local_check_s, and
            # the old entry is only cleared from the pending list after that.
            reclaim_idle_ms=int(rt.settings.local_check_s * 1000),
            drop_idle=True,
        ),
        LocalJob,
        worker.handle,
    )

    # The heartbeat outlives the stop request until the job in hand is finished.
    return {"worker:consume": with_companions(consumer.run, worker.heartbeat)}
