"""``gengui worker``: takes jobs from ``gengui:jobs:local``, runs an engine, stores the
image, reports ``processing`` then ``completed`` (or ``failed``) on ``gengui:job:status``.
A job that is done within ``worker_processing_after_s`` (50 ms) reports only its outcome:
``submitted -> completed`` is a transition of its own, and the report, the row write, the
history row and the notice that ``processing`` would cost tell nobody anything.

A worker needs Redis and the object store, never the database. It heartbeats a key
with a TTL that names the jobs in hand (``core.heartbeats``), so the reconciler can tell
a slow job from a dead worker or a lost report. On stop it finishes the job in hand;
entries it had not started stay pending and are reclaimed.

It runs ``GENGUI_WORKER_CONCURRENCY`` jobs at once, each on a thread of its own that
renders, checks and stores the image: one thread hop per job. On the local store the
thread only writes the file; the job's coroutine then awaits one ``syncfs`` shared with
the other jobs' files (``core.fsync``), so no thread waits on the disk. Reports go through one
ordered sender, so the reports of all the jobs in hand share round trips (a few per
batch of jobs, not two per job) and a job's ``processing`` (or ``progress``) is on the
stream before its ``completed``. The job does not wait for its ``processing`` to be sent:
the render starts at once.
"""

from __future__ import annotations

import asyncio
import functools
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import structlog

from core import heartbeats
from core.events import JobStatus, LocalJob
from core.handback import Handback
from core.imaging import ImageRejected, sniff_image
from core.keys import GROUP_GPU_WORKERS
from core.logging import get_logger
from core.notify import OutboxQueue
from core.runtime import Runtime, consumer_name
from core.service import Loop, with_companions
from core.storage import LocalStorage, original_key
from core.streams import StreamConsumer, dedicated_client
from providers.local.engines import Engine, ProgressFn

log = get_logger(__name__)


def _best_effort(sent: asyncio.Future[None]) -> None:
    # A lost progress report changes nothing that matters; read its error so asyncio
    # does not log it as never retrieved.
    if not sent.cancelled():
        sent.exception()


class Worker:
    def __init__(self, rt: Runtime, engine: Engine, *, concurrency: int = 1) -> None:
        self.rt = rt
        self.engine = engine
        self.worker_id = consumer_name("worker")
        self.in_hand = heartbeats.InHand()
        self.processing_after_s = rt.settings.worker_processing_after_s
        # All jobs' reports share round trips, in order: processing before completed.
        self._reports = OutboxQueue(rt.publisher)
        # One thread per job in hand: an engine holds its thread for the whole render
        # (and with GENGUI_STORAGE_SYNC=file for the fsyncs), so the loop's default pool
        # (cpu + 4 threads) would cap a larger concurrency.
        self._threads = ThreadPoolExecutor(concurrency, thread_name_prefix="engine")
        self._handback = Handback()

    def _status(self, job: LocalJob, **fields: Any) -> JobStatus:
        return JobStatus(
            generation_id=job.generation_id,
            attempt=job.attempt,
            source=self.worker_id,
            **fields,
        )

    def _send(self, job: LocalJob, **fields: Any) -> asyncio.Future[None]:
        stream, report = self.rt.settings.keys.job_status, self._status(job, **fields)
        return self._reports.add(lambda outbox: outbox.send(stream, report))

    async def _report(self, job: LocalJob, **fields: Any) -> None:
        await self._send(job, **fields)

    def _progress(self, job: LocalJob, fraction: float) -> None:
        self._send(job, state="progress", progress=fraction).add_done_callback(_best_effort)

    def _make_image(
        self, job: LocalJob, progress: ProgressFn, loop: asyncio.AbstractEventLoop
    ) -> dict[str, Any]:
        """On an engine thread: render, check and store the image; returns the fields of
        the final report, and for a local file its ``path``, not durable yet. An engine's
        error is reported (failed); a storage error is raised, as from ``Storage.put``:
        nothing is reported and the job is not acked."""
        try:
            data = self.engine.generate(job, progress)
            ext, content_type = sniff_image(data)
        except ImageRejected as exc:
            return {"state": "failed", "error_code": exc.code, "error_message": str(exc)}
        except Exception as exc:
            log.exception("worker.engine_failed")
            return {
                "state": "failed",
                "error_code": "engine_error",
                "error_message": repr(exc)[:500],
                "retryable": True,
            }
        key = original_key(job.user_id, job.generation_id, job.attempt, ext)
        storage = self.rt.storage
        report: dict[str, Any] = {
            "state": "completed",
            "image_key": key,
            "content_type": content_type,
        }
        if isinstance(storage, LocalStorage):
            # Made durable on the loop, with the other jobs' files (``_run``).
            report["path"] = storage.write_file(key, data)
        else:
            asyncio.run_coroutine_threadsafe(storage.put(key, data, content_type), loop).result()
        log.info("worker.job_done", engine=self.engine.name, bytes=len(data))
        return report

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
        with self.in_hand.holding(job.generation_id, job.attempt):
            await self._run(job)

    async def _run(self, job: LocalJob) -> None:
        loop = asyncio.get_running_loop()
        processing: list[asyncio.Future[None]] = []

        def report_processing() -> None:
            if not processing:  # once: after the delay, or before the first progress
                processing.append(self._send(job, state="processing"))
                # A lost one costs nothing: submitted -> completed is allowed too.
                processing[0].add_done_callback(_best_effort)

        def progress_on_loop(fraction: float) -> None:
            report_processing()  # progress is only applied to a processing row
            self._progress(job, fraction)

        def progress(fraction: float) -> None:
            # Called from the engine's thread; queued before the final report.
            loop.call_soon_threadsafe(progress_on_loop, fraction)

        if self.processing_after_s <= 0:
            report_processing()
            timer = None
        else:
            timer = loop.call_later(self.processing_after_s, report_processing)
        # On this worker's threads, the log context along (as asyncio.to_thread does);
        # the jobs that finish together wake the loop once (core.handback).
        try:
            outcome = await self._handback.run(self._threads, self._make_image, job, progress, loop)
        finally:
            if timer is not None:
                timer.cancel()
        path = outcome.pop("path", None)
        if path is not None:
            storage = self.rt.storage
            assert isinstance(storage, LocalStorage)
            await storage.durable(path)
        await self._report(job, **outcome)

    async def consume(self, consumer: StreamConsumer[LocalJob], stop: asyncio.Event) -> None:
        """Run ``consumer`` on this worker's threads, released when it returns."""
        try:
            await consumer.run(stop)
        finally:
            # A job cancelled by a hard stop may still hold its thread: do not wait for it.
            self._threads.shutdown(wait=False, cancel_futures=True)

    async def heartbeat(self, stop: asyncio.Event) -> None:
        await heartbeats.beat(self.rt, self.worker_id, self.in_hand, stop)


def worker_loops(rt: Runtime, engine: Engine) -> dict[str, Loop]:
    n = rt.settings.worker_concurrency
    worker = Worker(rt, engine, concurrency=n)
    consumer = StreamConsumer(
        dedicated_client(rt.redis_url),
        rt.redis,
        # Take only as many jobs as we run at once: the rest stay for other workers.
        # Batched, not ``continuous`` as hosted runners are: a GPU worker runs one job
        # at a time, where the two are the same, and for many instant jobs a read and
        # an XACK per batch cost less than per few jobs (bench/worker_drain.py: 5-14 %
        # more worker CPU per job continuous, bench/README.md).
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
    return {
        "worker:consume": with_companions(
            functools.partial(worker.consume, consumer), worker.heartbeat
        )
    }
