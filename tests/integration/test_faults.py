"""Named faults on the real pipeline: whatever Redis loses, Postgres still finishes."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator

import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer

from consumers.runner import consumer_loops
from core.api.app import create_app
from core.events import LocalJob
from core.keys import GROUP_GPU_WORKERS
from core.runtime import Runtime
from core.streams import Publisher, StreamConsumer, dedicated_client
from providers.local.engines import load_engine
from providers.local.worker import Worker, worker_loops
from reconciler.loop import Reconciler
from tests.conftest import UserAuth, running


@pytest_asyncio.fixture
async def fast_rt(rt: Runtime) -> Runtime:
    # Short recovery bounds so the test sees the backup path act within seconds.
    settings = rt.settings.model_copy(
        update={
            "dispatch_grace_s": 0.5,
            "local_check_s": 1.0,
            "thumbnail_grace_s": 1.0,
            "retry_base_s": 0.2,
        }
    )
    return dataclasses.replace(rt, settings=settings, publisher=Publisher(rt.redis, settings.keys))


@pytest_asyncio.fixture
async def fast_client(fast_rt: Runtime) -> AsyncIterator[TestClient]:
    async with TestClient(TestServer(create_app(fast_rt.settings, fast_rt))) as c:
        yield c


async def _wipe_redis(rt: Runtime) -> int:
    """What FLUSHALL (or a restart without persistence) does to gengui's keys."""
    keys = [k async for k in rt.redis.scan_iter(match=f"{rt.settings.stream_prefix}:*")]
    if keys:
        await rt.redis.delete(*keys)
    return len(keys)


async def test_redis_losing_every_stream_mid_run_still_completes_everything(
    fast_client: TestClient, fast_rt: Runtime, alice: UserAuth
) -> None:
    loops = {
        **consumer_loops(fast_rt),
        **worker_loops(fast_rt, load_engine("placeholder")),
        "reconciler": Reconciler(fast_rt).run,
    }
    async with running(loops):
        ids = []
        for i in range(40):
            resp = await fast_client.post(
                "/api/v1/generations",
                json={"prompt": f"p{i}", "width": 256, "height": 256},
                headers=alice.headers,
            )
            ids.append((await resp.json())["id"])
            if i == 20:
                assert await _wipe_redis(fast_rt) > 0
        async with asyncio.timeout(30):
            while True:
                rows = await fast_rt.pool.fetch(
                    "SELECT status, thumbnail_key FROM generations WHERE user_id = $1",
                    alice.user_id,
                )
                if all(r["status"] == "completed" and r["thumbnail_key"] for r in rows):
                    break
                await asyncio.sleep(0.1)
    assert len(rows) == 40
    # Exactly one image and one thumbnail per generation, nothing orphaned.
    stored = await fast_rt.storage.list_keys(f"users/{alice.user_id}/")
    originals = [k for k in stored if "-original." in k]
    thumbs = [k for k in stored if k.endswith("thumb-128.webp")]
    assert len(originals) == 40 and len(thumbs) == 40, stored
    referenced = await fast_rt.pool.fetch(
        "SELECT image_key, thumbnail_key FROM generations WHERE user_id = $1", alice.user_id
    )
    assert {r["image_key"] for r in referenced} | {r["thumbnail_key"] for r in referenced} == set(
        stored
    )


async def test_job_of_a_dead_worker_is_finished_by_another_under_a_new_attempt(
    fast_client: TestClient, fast_rt: Runtime, alice: UserAuth
) -> None:
    """A worker says "processing" and dies; the reconciler starts attempt 2 and a live
    worker finishes it. The dead worker's attempt-1 job is never run again."""
    hung = asyncio.Event()
    reporter = Worker(fast_rt, load_engine("placeholder"))
    # In its own process it would have its own id (and heartbeat key), not the live one's.
    reporter.worker_id = "doomed-worker"

    async def dies_mid_job(job: LocalJob) -> None:
        await reporter._report(job, state="processing")
        hung.set()
        await asyncio.sleep(3600)

    reader = dedicated_client(fast_rt.redis_url)
    doomed = StreamConsumer(
        reader,
        fast_rt.redis,
        fast_rt.consumer_config(
            fast_rt.settings.keys.jobs_local, GROUP_GPU_WORKERS, "doomed", batch=1
        ),
        LocalJob,
        dies_mid_job,
    )
    async with running(consumer_loops(fast_rt)):
        doomed_task = asyncio.create_task(doomed.run(asyncio.Event()))
        resp = await fast_client.post(
            "/api/v1/generations",
            json={"prompt": "x", "width": 256, "height": 256},
            headers=alice.headers,
        )
        gid = uuid.UUID((await resp.json())["id"])
        await asyncio.wait_for(hung.wait(), 10)
        doomed_task.cancel()  # killed mid-job: no ack, no result
        await asyncio.gather(doomed_task, return_exceptions=True)
        await reader.aclose()

        live = {
            **worker_loops(fast_rt, load_engine("placeholder")),
            "reconciler": Reconciler(fast_rt).run,
        }
        async with running(live), asyncio.timeout(20):
            while True:
                row = await fast_rt.pool.fetchrow(
                    "SELECT status, attempt, image_key, thumbnail_key FROM generations"
                    " WHERE id = $1",
                    gid,
                )
                if row["thumbnail_key"]:
                    break
                await asyncio.sleep(0.05)
    assert (row["status"], row["attempt"]) == ("completed", 2)
    stored = await fast_rt.storage.list_keys(f"users/{alice.user_id}/")
    assert [k for k in stored if "-original." in k] == [row["image_key"]]
    assert f"/{gid}/2-" in row["image_key"]
