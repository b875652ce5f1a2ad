"""Cancel and retry over the API: authoritative cancel, clear 409s, new attempts."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime

import pytest

from consumers.status import StatusProcessor
from core.events import GenerationRequested, JobStatus, UserEvent
from core.runtime import Runtime
from core.storage import original_key
from tests.conftest import UserAuth
from tests.integration.test_reconciler import check_of

BODY = {"prompt": "cancel me", "width": 256, "height": 256}


async def _create(client, user: UserAuth) -> str:  # type: ignore[no-untyped-def]
    resp = await client.post("/api/v1/generations", json=BODY, headers=user.headers)
    return str((await resp.json())["id"])


async def test_cancel_a_generation_waiting_for_a_worker_then_again(
    client, alice: UserAuth, rt: Runtime
) -> None:
    gid = await _create(client, alice)  # submitted: its job is on the workers' queue
    first = await client.post(f"/api/v1/generations/{gid}/cancel", headers=alice.headers)
    assert first.status == 200 and (await first.json())["status"] == "cancelled"
    again = await client.post(f"/api/v1/generations/{gid}/cancel", headers=alice.headers)
    assert again.status == 200
    assert await check_of(rt, uuid.UUID(gid)) is None  # finished: never looked at again
    events = await rt.pool.fetchval(
        "SELECT count(*) FROM generation_events WHERE generation_id = $1 AND status = 'cancelled'",
        uuid.UUID(gid),
    )
    assert events == 1


async def test_cancel_of_a_completed_generation_is_409(
    client, alice: UserAuth, rt: Runtime
) -> None:
    gid = await _create(client, alice)
    await rt.pool.execute(
        "UPDATE generations SET status = 'completed' WHERE id = $1", uuid.UUID(gid)
    )
    resp = await client.post(f"/api/v1/generations/{gid}/cancel", headers=alice.headers)
    assert resp.status == 409
    err = (await resp.json())["error"]
    assert err["code"] == "invalid_state" and err["details"] == {"status": "completed"}


async def test_cancel_and_retry_of_another_users_generation_is_404(
    client, alice: UserAuth, bob: UserAuth, rt: Runtime
) -> None:
    gid = await _create(client, alice)
    for action in ("cancel", "retry"):
        resp = await client.post(f"/api/v1/generations/{gid}/{action}", headers=bob.headers)
        assert resp.status == 404
    assert (
        await rt.pool.fetchval("SELECT status FROM generations WHERE id = $1", uuid.UUID(gid))
        == "submitted"
    )


async def test_retry_of_a_failed_generation_starts_a_new_attempt(
    client, alice: UserAuth, rt: Runtime
) -> None:
    gid = await _create(client, alice)
    # As a failure leaves it: finished, without a check.
    await rt.pool.execute(
        """WITH f AS (
               UPDATE generations SET status = 'failed', error_code = 'x', error_message = 'y'
                WHERE id = $1 RETURNING id)
           DELETE FROM generation_checks c USING f WHERE c.generation_id = f.id""",
        uuid.UUID(gid),
    )
    resp = await client.post(f"/api/v1/generations/{gid}/retry", headers=alice.headers)
    assert resp.status == 202
    body = await resp.json()
    assert (body["status"], body["attempt"], body["error"]) == ("queued", 2, None)
    # Looked at after the grace period, should its request be lost too.
    due = await check_of(rt, uuid.UUID(gid))
    grace = rt.settings.dispatch_grace_s
    assert due is not None and grace - 10 < (due - datetime.now(UTC)).total_seconds() <= grace
    entries = await rt.redis.xrange(rt.settings.keys.requested)
    last = GenerationRequested.model_validate_json(entries[-1][1][b"__data__"])
    assert (str(last.generation_id), last.attempt) == (gid, 2)
    notices = await rt.redis.xrange(rt.settings.keys.user_events(alice.user_id))
    queued = UserEvent.model_validate_json(notices[-1][1][b"__data__"])
    assert (queued.type, queued.generation["attempt"]) == ("generation.queued", 2)


@pytest.mark.parametrize("status", ["queued", "processing", "completed", "cancelled"])
async def test_retry_of_a_generation_that_has_not_failed_is_409(
    client, alice: UserAuth, rt: Runtime, status: str
) -> None:
    gid = await _create(client, alice)
    await rt.pool.execute(
        "UPDATE generations SET status = $2 WHERE id = $1", uuid.UUID(gid), status
    )
    resp = await client.post(f"/api/v1/generations/{gid}/retry", headers=alice.headers)
    assert resp.status == 409
    assert (await resp.json())["error"]["code"] == "invalid_state"
    assert (
        await rt.pool.fetchval("SELECT attempt FROM generations WHERE id = $1", uuid.UUID(gid)) == 1
    )


async def test_cancel_racing_with_completion_is_consistent_and_leaves_no_stray_image(
    client, alice: UserAuth, rt: Runtime
) -> None:
    """Run the race many times: either it completed (cancel says 409), or it is
    cancelled and no image is left."""
    processor = StatusProcessor(rt)
    for _ in range(20):
        gid = uuid.UUID(await _create(client, alice))  # submitted
        key = original_key(alice.user_id, gid, 1, "png")
        await rt.storage.put(key, b"img", "image/png")
        done = JobStatus(
            generation_id=gid, attempt=1, state="completed", image_key=key, content_type="image/png"
        )
        cancel, _ = await asyncio.gather(
            client.post(f"/api/v1/generations/{gid}/cancel", headers=alice.headers),
            processor.handle(done),
        )
        row = await rt.pool.fetchrow("SELECT status, image_key FROM generations WHERE id = $1", gid)
        if cancel.status == 200:
            assert row["status"] == "cancelled" and row["image_key"] is None
            assert not await rt.storage.exists(key)
        else:
            assert cancel.status == 409
            assert row["status"] == "completed" and row["image_key"] == key
            assert await rt.storage.exists(key)


async def test_cancel_clears_an_image_whose_report_was_lost(
    client, alice: UserAuth, rt: Runtime
) -> None:
    gid = uuid.UUID(await _create(client, alice))  # submitted
    # The worker stored its image, but its "completed" report never arrived.
    await rt.storage.put(original_key(alice.user_id, gid, 1, "png"), b"img", "image/png")
    resp = await client.post(f"/api/v1/generations/{gid}/cancel", headers=alice.headers)
    assert resp.status == 200
    assert await rt.storage.list_keys(f"users/{alice.user_id}/") == []
