"""The whole path on real Postgres + Redis: API (-> dispatch) -> worker -> status -> thumbnail."""

from __future__ import annotations

import dataclasses
import io
import uuid

from aiohttp.test_utils import TestClient, TestServer
from PIL import Image

from core import lifecycle
from core.api.app import create_app
from core.events import JobStatus
from core.lifecycle import Status
from core.runtime import Runtime
from core.storage import original_key
from tests.conftest import HeldEngine, UserAuth, wait_for_status
from tests.integration.test_reconciler import check_of

BODY = {"prompt": "a lighthouse at dusk", "width": 512, "height": 384, "seed": 7}


async def test_generation_reaches_completed_with_image_and_thumbnail(
    client, alice: UserAuth, rt: Runtime, pipeline
) -> None:
    resp = await client.post("/api/v1/generations", json=BODY, headers=alice.headers)
    assert resp.status == 202
    created = await resp.json()
    assert created["status"] == "submitted"  # the API sent the job itself
    assert created["seed"] == 7 and created["attempt"] == 1 and created["provider"] == "local"

    done = await wait_for_status(client, alice, created["id"], {"completed"}, need_thumbnail=True)
    assert done["error"] is None and done["completed_at"] is not None
    assert done["image_url"] == f"/api/v1/generations/{created['id']}/image"

    image = await client.get(done["image_url"], headers=alice.headers)
    assert image.status == 200 and image.content_type == "image/png"
    assert Image.open(io.BytesIO(await image.read())).size == (512, 384)

    thumb = await client.get(done["thumbnail_url"], headers=alice.headers)
    assert thumb.status == 200
    im = Image.open(io.BytesIO(await thumb.read()))
    assert im.format == "WEBP" and max(im.size) == 128

    history = await rt.pool.fetch(
        "SELECT status FROM generation_events WHERE generation_id = $1 ORDER BY id",
        uuid.UUID(created["id"]),
    )
    # A placeholder job is done long before worker_processing_after_s: no processing.
    assert [r["status"] for r in history] == ["submitted", "completed"]
    # Whole: the reconciler has nothing left to look at.
    assert await check_of(rt, uuid.UUID(created["id"])) is None


async def test_with_api_dispatch_off_the_dispatchers_send_the_job(
    alice: UserAuth, rt: Runtime, pipeline
) -> None:
    settings = rt.settings.model_copy(update={"api_dispatch": False})
    app = create_app(settings, dataclasses.replace(rt, settings=settings))
    async with TestClient(TestServer(app)) as client:
        resp = await client.post("/api/v1/generations", json=BODY, headers=alice.headers)
        created = await resp.json()
        assert created["status"] == "queued"
        await wait_for_status(client, alice, created["id"], {"completed"}, need_thumbnail=True)
    history = await rt.pool.fetch(
        "SELECT status FROM generation_events WHERE generation_id = $1 ORDER BY id",
        uuid.UUID(created["id"]),
    )
    assert [r["status"] for r in history] == ["queued", "submitted", "completed"]
    assert await check_of(rt, uuid.UUID(created["id"])) is None


async def test_a_long_job_is_processing_until_its_image_is_stored(
    client, alice: UserAuth, rt: Runtime, held_pipeline: HeldEngine
) -> None:
    resp = await client.post("/api/v1/generations", json=BODY, headers=alice.headers)
    gid = (await resp.json())["id"]
    running = await wait_for_status(client, alice, gid, {"processing"})
    assert running["image_url"] is None
    held_pipeline.release.set()
    await wait_for_status(client, alice, gid, {"completed"}, need_thumbnail=True)
    history = await rt.pool.fetch(
        "SELECT status, detail FROM generation_events WHERE generation_id = $1 ORDER BY id",
        uuid.UUID(gid),
    )
    assert [r["status"] for r in history] == ["submitted", "processing", "completed"]
    assert history[1]["detail"]["source"].startswith("worker-")  # who runs it


async def _queued_generation(rt: Runtime, user: UserAuth) -> uuid.UUID:
    gid: uuid.UUID = await rt.pool.fetchval(
        """INSERT INTO generations (id, user_id, status, provider, prompt, width, height, seed)
           VALUES (gen_random_uuid(), $1, 'queued', 'local', 'p', 512, 512, 1) RETURNING id""",
        user.user_id,
    )
    return gid


async def test_duplicated_status_message_changes_nothing(rt: Runtime, alice: UserAuth) -> None:
    from consumers.status import StatusProcessor

    gid = await _queued_generation(rt, alice)
    assert await lifecycle.transition(rt.pool, gid, attempt=1, to=Status.SUBMITTED)
    key = original_key(alice.user_id, gid, 1, "png")
    await rt.storage.put(key, b"\x89PNG fake", "image/png")
    done = JobStatus(
        generation_id=gid, attempt=1, state="completed", image_key=key, content_type="image/png"
    )
    processor = StatusProcessor(rt)
    await processor.handle(done)
    first = await rt.pool.fetchrow("SELECT * FROM generations WHERE id = $1", gid)
    await processor.handle(done)
    await processor.handle(JobStatus(generation_id=gid, attempt=1, state="processing"))
    again = await rt.pool.fetchrow("SELECT * FROM generations WHERE id = $1", gid)
    assert first["status"] == "completed"
    assert dict(again) == dict(first)
    assert await rt.storage.exists(key), "a duplicate must not delete the generation's own image"
    events = await rt.pool.fetchval(
        "SELECT count(*) FROM generation_events WHERE generation_id = $1", gid
    )
    assert events == 2  # submitted, completed — nothing from the duplicates
    thumbs = await rt.redis.xlen(rt.settings.keys.thumbnails)
    assert thumbs == 1


async def test_status_for_older_attempt_is_ignored_and_its_image_deleted(
    rt: Runtime, alice: UserAuth
) -> None:
    from consumers.status import StatusProcessor

    gid = await _queued_generation(rt, alice)
    assert await lifecycle.transition(rt.pool, gid, attempt=1, to=Status.SUBMITTED)
    assert await lifecycle.retry(rt.pool, gid, attempt=1)  # attempt 2 now, queued
    assert await lifecycle.transition(rt.pool, gid, attempt=2, to=Status.SUBMITTED)
    stale_key = original_key(alice.user_id, gid, 1, "png")
    await rt.storage.put(stale_key, b"old", "image/png")
    await StatusProcessor(rt).handle(
        JobStatus(
            generation_id=gid,
            attempt=1,
            state="completed",
            image_key=stale_key,
            content_type="image/png",
        )
    )
    row = await rt.pool.fetchrow(
        "SELECT status, attempt, image_key FROM generations WHERE id = $1", gid
    )
    assert (row["status"], row["attempt"], row["image_key"]) == ("submitted", 2, None)
    assert not await rt.storage.exists(stale_key)


async def test_late_result_for_cancelled_generation_leaves_no_image(
    rt: Runtime, alice: UserAuth
) -> None:
    from consumers.status import StatusProcessor

    gid = await _queued_generation(rt, alice)
    assert await lifecycle.transition(rt.pool, gid, attempt=1, to=Status.SUBMITTED)
    assert await lifecycle.transition(rt.pool, gid, attempt=1, to=Status.CANCELLED)
    key = original_key(alice.user_id, gid, 1, "png")
    await rt.storage.put(key, b"late", "image/png")
    await StatusProcessor(rt).handle(
        JobStatus(
            generation_id=gid, attempt=1, state="completed", image_key=key, content_type="image/png"
        )
    )
    assert (
        await rt.pool.fetchval("SELECT status FROM generations WHERE id = $1", gid) == "cancelled"
    )
    assert await rt.storage.list_keys(f"users/{alice.user_id}/") == []


async def test_retryable_failure_starts_a_new_attempt_then_fails_after_the_last(
    rt: Runtime, alice: UserAuth
) -> None:
    from consumers.status import StatusProcessor

    gid = await _queued_generation(rt, alice)
    processor = StatusProcessor(rt)
    for attempt in range(1, rt.settings.max_attempts + 1):
        assert await lifecycle.transition(rt.pool, gid, attempt=attempt, to=Status.SUBMITTED)
        await processor.handle(
            JobStatus(
                generation_id=gid, attempt=attempt, state="failed", error_code="oom", retryable=True
            )
        )
    row = await rt.pool.fetchrow(
        "SELECT status, attempt, error_code FROM generations WHERE id = $1", gid
    )
    assert (row["status"], row["attempt"], row["error_code"]) == (
        "failed",
        rt.settings.max_attempts,
        "oom",
    )
    # Retries are not published at once: they wait out a backoff as queued rows.
    assert await rt.redis.exists(rt.settings.keys.requested) == 0


async def test_completion_of_a_later_attempt_sweeps_an_earlier_attempts_unreported_image(
    rt: Runtime, alice: UserAuth
) -> None:
    from consumers.status import StatusProcessor

    gid = await _queued_generation(rt, alice)
    assert await lifecycle.transition(rt.pool, gid, attempt=1, to=Status.SUBMITTED)
    # Attempt 1 stored its image, but its report was lost; the reconciler retried.
    lost = original_key(alice.user_id, gid, 1, "png")
    await rt.storage.put(lost, b"lost", "image/png")
    assert await lifecycle.retry(rt.pool, gid, attempt=1)
    assert await lifecycle.transition(rt.pool, gid, attempt=2, to=Status.SUBMITTED)
    key = original_key(alice.user_id, gid, 2, "png")
    await rt.storage.put(key, b"new", "image/png")
    other_user_key = original_key(uuid.uuid4(), uuid.uuid4(), 1, "png")
    await rt.storage.put(other_user_key, b"other", "image/png")
    await StatusProcessor(rt).handle(
        JobStatus(
            generation_id=gid, attempt=2, state="completed", image_key=key, content_type="image/png"
        )
    )
    assert await rt.storage.list_keys(f"users/{alice.user_id}/") == [key]
    assert await rt.storage.exists(other_user_key)


async def test_dispatch_fails_a_generation_whose_provider_is_not_configured(
    rt: Runtime, alice: UserAuth
) -> None:
    from consumers.dispatch import Dispatcher
    from core.events import GenerationRequested
    from core.ratelimit import RateLimiter
    from providers.registry import ProviderSet

    gid = await _queued_generation(rt, alice)
    await rt.pool.execute("UPDATE generations SET provider = 'nope' WHERE id = $1", gid)
    limiter = RateLimiter(rt.redis, rt.settings.keys, {})
    await Dispatcher(rt, ProviderSet(), limiter).handle(
        GenerationRequested(generation_id=gid, attempt=1)
    )
    row = await rt.pool.fetchrow("SELECT status, error_code FROM generations WHERE id = $1", gid)
    assert (row["status"], row["error_code"]) == ("failed", "provider_unknown")


async def test_thumbnail_clears_a_partial_write_left_by_a_killed_writer(
    rt: Runtime, alice: UserAuth
) -> None:
    """A thumbnailer killed mid-write leaves a temp file; the next one's success clears it."""
    from consumers.status import StatusProcessor
    from consumers.thumbnails import Thumbnailer
    from core.events import ThumbnailRequested
    from core.storage import generation_prefix

    gid = await _queued_generation(rt, alice)
    assert await lifecycle.transition(rt.pool, gid, attempt=1, to=Status.SUBMITTED)
    key = original_key(alice.user_id, gid, 1, "png")
    buf = io.BytesIO()
    Image.new("RGB", (256, 256), (9, 9, 9)).save(buf, "PNG")
    await rt.storage.put(key, buf.getvalue(), "image/png")
    await StatusProcessor(rt).handle(
        JobStatus(generation_id=gid, attempt=1, state="completed", image_key=key)
    )
    # The killed writer's leftover, after the completion already cleared partials.
    leftover = rt.storage.local_path(key).parent / ".tmp-killed"  # type: ignore[union-attr]
    leftover.write_bytes(b"half a thumbnail")
    await Thumbnailer(rt).handle(
        ThumbnailRequested(generation_id=gid, attempt=1, user_id=alice.user_id, image_key=key)
    )
    assert not leftover.exists()
    keys = await rt.storage.list_keys(generation_prefix(alice.user_id, gid))
    assert sorted(k.rsplit("/", 1)[1] for k in keys) == ["1-original.png", "1-thumb-128.webp"]
