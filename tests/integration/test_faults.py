"""Named faults on the real pipeline: whatever Redis loses, Postgres still finishes."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer

from consumers.runner import consumer_loops
from core.api.app import create_app
from core.runtime import Runtime
from core.streams import Publisher
from providers.local.engines import load_engine
from providers.local.worker import worker_loops
from reconciler.loop import Reconciler
from tests.conftest import UserAuth, running


@pytest_asyncio.fixture
async def fast_rt(rt: Runtime) -> Runtime:
    # Short recovery bounds so the test sees the backup path act within seconds.
    settings = rt.settings.model_copy(
        update={"dispatch_grace_s": 0.5, "local_check_s": 1.0, "thumbnail_grace_s": 1.0}
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
    originals = [k for k in stored if "/original." in k]
    thumbs = [k for k in stored if k.endswith("thumb-128.webp")]
    assert len(originals) == 40 and len(thumbs) == 40, stored
    referenced = await fast_rt.pool.fetch(
        "SELECT image_key, thumbnail_key FROM generations WHERE user_id = $1", alice.user_id
    )
    assert {r["image_key"] for r in referenced} | {r["thumbnail_key"] for r in referenced} == set(
        stored
    )
