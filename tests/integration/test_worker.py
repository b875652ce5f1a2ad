"""The local worker on real Redis and a real image directory: jobs in, reports and
images out, with engines that stand in for a GPU model."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from redis.exceptions import ResponseError

from core.events import JobStatus, LocalJob
from core.keys import GROUP_GPU_WORKERS
from core.notify import OutboxQueue
from core.runtime import Runtime
from providers.local.engines import Engine, ProgressFn
from providers.local.engines.placeholder import render_placeholder
from providers.local.worker import worker_loops
from tests.conftest import running

Step = Callable[[LocalJob, ProgressFn], None]


@pytest.fixture
def rt(rt: Runtime) -> Runtime:
    """``processing`` as soon as a job is taken, which most tests here follow; the tests
    of ``worker_processing_after_s`` set their own."""
    return processing_after(rt, 0)


def processing_after(rt: Runtime, seconds: float) -> Runtime:
    return dataclasses.replace(
        rt, settings=rt.settings.model_copy(update={"worker_processing_after_s": seconds})
    )


class Drawing:
    """The placeholder's picture, after ``before(job, progress)``."""

    name = "drawing"

    def __init__(self, before: Step | None = None) -> None:
        self.before = before

    def generate(self, job: LocalJob, progress: ProgressFn) -> bytes:
        if self.before is not None:
            self.before(job, progress)
        return render_placeholder(job.prompt, None, job.width, job.height, job.seed)


def with_concurrency(rt: Runtime, n: int) -> Runtime:
    return dataclasses.replace(
        rt, settings=rt.settings.model_copy(update={"worker_concurrency": n})
    )


def make_jobs(n: int, **fields: Any) -> list[LocalJob]:
    user_id = uuid.uuid4()
    return [
        LocalJob(
            generation_id=uuid.uuid4(),
            attempt=1,
            user_id=user_id,
            prompt=f"job {i}",
            width=256,
            height=256,
            seed=i,
            **fields,
        )
        for i in range(n)
    ]


async def reports(rt: Runtime) -> list[JobStatus]:
    """The status stream, oldest first."""
    entries = await rt.redis.xrange(rt.settings.keys.job_status)
    return [JobStatus.model_validate_json(fields[b"__data__"]) for _, fields in entries]


async def pending(rt: Runtime) -> int:
    summary = await rt.redis.xpending(rt.settings.keys.jobs_local, GROUP_GPU_WORKERS)
    return int(summary["pending"])


async def run_jobs(
    rt: Runtime,
    engine: Engine,
    jobs: Sequence[LocalJob],
    *,
    finishing: Sequence[LocalJob] | None = None,
    left_pending: int = 0,
) -> list[JobStatus]:
    """Queue ``jobs`` and run a worker until each of ``finishing`` (all by default) has
    its final report and ``left_pending`` entries are still pending; the status stream."""
    waited = {job.generation_id for job in (jobs if finishing is None else finishing)}
    await rt.publisher.send_many(rt.settings.keys.jobs_local, jobs)
    async with running(worker_loops(rt, engine)), asyncio.timeout(30):
        while True:
            found = await reports(rt)
            final = {r.generation_id for r in found if r.state in ("completed", "failed")}
            if waited <= final and await pending(rt) == left_pending:
                return found
            await asyncio.sleep(0.02)


def states_by_job(found: list[JobStatus]) -> dict[uuid.UUID, list[str]]:
    states: dict[uuid.UUID, list[str]] = {}
    for report in found:
        states.setdefault(report.generation_id, []).append(report.state)
    return states


async def test_n_jobs_run_at_once_and_each_reports_processing_then_completed(
    rt: Runtime,
) -> None:
    """With concurrency 8, eight jobs are in the engine at the same time (each on a
    thread of its own: the loop's default pool has fewer on a small machine); each
    job's reports reach the stream in order, its image stored under the reported key."""
    n = 8
    all_in = threading.Barrier(n, timeout=10)
    jobs = make_jobs(2 * n)
    found = await run_jobs(
        with_concurrency(rt, n), Drawing(lambda job, progress: all_in.wait()), jobs
    )
    assert states_by_job(found) == {job.generation_id: ["processing", "completed"] for job in jobs}
    for report in found:
        if report.state == "completed":
            assert report.image_key is not None and report.content_type == "image/png"
            assert (await rt.storage.get(report.image_key)).startswith(b"\x89PNG")


async def test_progress_is_reported_between_processing_and_completed(rt: Runtime) -> None:
    def halfway(job: LocalJob, progress: ProgressFn) -> None:
        progress(0.5)

    found = await run_jobs(with_concurrency(rt, 2), Drawing(halfway), make_jobs(4))
    assert {tuple(states) for states in states_by_job(found).values()} == {
        ("processing", "progress", "completed")
    }
    assert {r.progress for r in found if r.state == "progress"} == {0.5}


async def test_engine_error_is_reported_as_a_retryable_failure(rt: Runtime) -> None:
    def out_of_memory(job: LocalJob, progress: ProgressFn) -> None:
        raise MemoryError("CUDA out of memory")

    (job,) = make_jobs(1)
    found = await run_jobs(rt, Drawing(out_of_memory), [job])
    assert [r.state for r in found] == ["processing", "failed"]
    assert (found[1].error_code, found[1].retryable) == ("engine_error", True)
    assert "CUDA out of memory" in (found[1].error_message or "")
    assert await rt.storage.list_keys(f"users/{job.user_id}/") == []


async def test_bytes_that_are_no_image_are_refused_for_good(rt: Runtime) -> None:
    class Garbage:
        name = "garbage"

        def generate(self, job: LocalJob, progress: ProgressFn) -> bytes:
            return b"<html>not an image</html>"

    (job,) = make_jobs(1)
    found = await run_jobs(rt, Garbage(), [job])
    assert [(r.state, r.error_code, r.retryable) for r in found] == [
        ("processing", None, False),
        ("failed", "image_unsupported", False),
    ]
    assert await rt.storage.list_keys(f"users/{job.user_id}/") == []


async def test_job_past_its_deadline_fails_without_running(rt: Runtime) -> None:
    def never(job: LocalJob, progress: ProgressFn) -> None:
        raise AssertionError("a job past its deadline was run")

    jobs = make_jobs(2, deadline_at=datetime.now(UTC) - timedelta(seconds=1))
    found = await run_jobs(rt, Drawing(never), jobs)
    assert [(r.state, r.error_code) for r in found] == [("failed", "timed_out")] * 2


async def test_image_that_cannot_be_stored_is_not_reported_and_its_job_stays_pending(
    rt: Runtime,
) -> None:
    """A storage error is not the engine's: no failed report (the reconciler starts a
    new attempt once the row has been silent), and the entry is not acked. One job at
    a time, so once the next job has finished the broken one is surely done."""
    (broken,) = make_jobs(1)
    (fine,) = make_jobs(1)
    user_dir = rt.settings.images_dir / "users" / str(broken.user_id)
    user_dir.parent.mkdir(parents=True)
    user_dir.write_bytes(b"")  # a file where its directory should be made

    found = await run_jobs(rt, Drawing(), [broken, fine], finishing=[fine], left_pending=1)
    assert states_by_job(found) == {
        broken.generation_id: ["processing"],
        fine.generation_id: ["processing", "completed"],
    }


def progress_report(i: int) -> JobStatus:
    return JobStatus(generation_id=uuid.uuid4(), attempt=1, state="progress", progress=i / 100)


def _sender(rt: Runtime) -> Callable[[JobStatus], asyncio.Future[None]]:
    """What the worker sends its reports with: a shared ``OutboxQueue``."""
    queue, stream = OutboxQueue(rt.publisher), rt.settings.keys.job_status
    return lambda report: queue.add(lambda outbox: outbox.send(stream, report))


async def test_sender_keeps_queue_order_across_sends(rt: Runtime) -> None:
    """Reports queued in one turn, then more while that send is in flight, reach the
    stream in the order they were queued."""
    send = _sender(rt)
    first = [send(progress_report(i)) for i in range(50)]
    await asyncio.sleep(0)  # the first send is on its way
    later = [send(progress_report(50 + i)) for i in range(50)]
    await asyncio.gather(*first, *later)
    assert [r.progress for r in await reports(rt)] == [i / 100 for i in range(100)]


async def test_sender_fails_the_reports_of_a_failed_send_and_goes_on(rt: Runtime) -> None:
    send = _sender(rt)
    stream = rt.settings.keys.job_status
    await rt.redis.set(stream, "not a stream")
    outcomes = await asyncio.gather(
        send(progress_report(1)), send(progress_report(2)), return_exceptions=True
    )
    assert all(isinstance(o, ResponseError) and "WRONGTYPE" in str(o) for o in outcomes)
    await rt.redis.delete(stream)
    await send(progress_report(3))
    assert [r.progress for r in await reports(rt)] == [0.03]


@pytest.mark.parametrize("concurrency", [1, 4])
async def test_stopped_worker_finishes_the_jobs_in_hand(rt: Runtime, concurrency: int) -> None:
    """Stop asked while jobs are in the engine: they complete and are acked; the jobs
    not started stay in the stream for the next worker."""
    rt = with_concurrency(rt, concurrency)
    started = asyncio.Event()
    release = threading.Event()
    loop = asyncio.get_running_loop()

    def hold(job: LocalJob, progress: ProgressFn) -> None:
        loop.call_soon_threadsafe(started.set)
        assert release.wait(10)

    jobs = make_jobs(3 * concurrency)
    await rt.publisher.send_many(rt.settings.keys.jobs_local, jobs)
    async with running(worker_loops(rt, Drawing(hold))) as stop:
        await asyncio.wait_for(started.wait(), 10)
        stop.set()  # while the jobs are held: the consumer reads nothing more
        release.set()
    found = await reports(rt)
    completed = [r.generation_id for r in found if r.state == "completed"]
    assert len(completed) == concurrency
    assert states_by_job(found) == {g: ["processing", "completed"] for g in completed}
    assert await pending(rt) == 0
    groups = await rt.redis.xinfo_groups(rt.settings.keys.jobs_local)
    assert groups[0]["lag"] == len(jobs) - concurrency


async def test_a_job_done_within_the_delay_reports_only_its_outcome(rt: Runtime) -> None:
    found = await run_jobs(processing_after(with_concurrency(rt, 4), 5.0), Drawing(), make_jobs(8))
    assert set(map(tuple, states_by_job(found).values())) == {("completed",)}


async def test_a_job_still_running_after_the_delay_reports_processing_first(rt: Runtime) -> None:
    """The render does not wait for the report: it is sent while the job runs."""
    seen_processing = threading.Event()
    loop = asyncio.get_running_loop()

    def until_processing_is_on_the_stream(job: LocalJob, progress: ProgressFn) -> None:
        async def watch() -> None:
            while not any(r.state == "processing" for r in await reports(rt)):
                await asyncio.sleep(0.01)
            seen_processing.set()

        asyncio.run_coroutine_threadsafe(watch(), loop)
        assert seen_processing.wait(10), "processing was not reported while the job ran"

    (job,) = make_jobs(1)
    found = await run_jobs(
        processing_after(rt, 0.05), Drawing(until_processing_is_on_the_stream), [job]
    )
    assert states_by_job(found) == {job.generation_id: ["processing", "completed"]}


async def test_progress_within_the_delay_sends_processing_before_it(rt: Runtime) -> None:
    """Progress is applied only to a processing row: its processing goes first."""

    def early_progress(job: LocalJob, progress: ProgressFn) -> None:
        progress(0.25)

    (job,) = make_jobs(1)
    found = await run_jobs(processing_after(rt, 5.0), Drawing(early_progress), [job])
    assert states_by_job(found) == {job.generation_id: ["processing", "progress", "completed"]}
