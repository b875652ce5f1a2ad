"""Thumbnail requests handled a read at a time: the outcomes of one at a time, with one
sync, one statement and one script call for the batch."""

from __future__ import annotations

import io
import uuid

import pytest
from PIL import Image

from consumers.thumbnails import Thumbnailer
from core.events import DATA_FIELD, ThumbnailRequested, UserEvent
from core.runtime import Runtime
from core.storage import ObjectNotFound, original_key, thumbnail_key
from tests.conftest import UserAuth


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (300, 200), (20, 120, 220)).save(buf, "PNG")
    return buf.getvalue()


async def _completed(rt: Runtime, user: UserAuth, attempt: int = 1) -> uuid.UUID:
    """A completed generation of ``attempt`` whose image key is set; its check due."""
    gid = uuid.uuid4()
    await rt.pool.execute(
        """WITH g AS (
               INSERT INTO generations (id, user_id, status, attempt, provider, prompt, width,
                                        height, seed, image_key)
               VALUES ($1, $2, 'completed', $3, 'local', 'p', 300, 200, 1, $4) RETURNING id
           ) INSERT INTO generation_checks (generation_id, due_at) SELECT id, now() FROM g""",
        gid,
        user.user_id,
        attempt,
        original_key(user.user_id, gid, attempt, "png"),
    )
    return gid


def _request(user: UserAuth, gid: uuid.UUID, attempt: int = 1) -> ThumbnailRequested:
    return ThumbnailRequested(
        generation_id=gid,
        attempt=attempt,
        user_id=user.user_id,
        image_key=original_key(user.user_id, gid, attempt, "png"),
    )


async def test_a_batch_attaches_each_thumbnail_and_tells_each_once(
    rt: Runtime, alice: UserAuth
) -> None:
    storage = rt.storage
    good = [await _completed(rt, alice) for _ in range(5)]
    for gid in good:
        await storage.put(original_key(alice.user_id, gid, 1, "png"), _png(), "image/png")
    # Attempt 2 won meanwhile: a request for attempt 1's image is stale, in the same batch
    # as attempt 2's own request.
    stale = await _completed(rt, alice, attempt=2)
    for attempt in (1, 2):
        await storage.put(original_key(alice.user_id, stale, attempt, "png"), _png(), "image/png")
    missing = await _completed(rt, alice)  # its image is not there (yet, or any more)
    rejected = await _completed(rt, alice)
    await storage.put(original_key(alice.user_id, rejected, 1, "png"), b"not an image", "x")
    # A killed writer's leftover in one of them: discarded once the generation is whole.
    leftover = storage.local_path(original_key(alice.user_id, good[0], 1, "png"))
    assert leftover is not None
    leftover = leftover.parent / ".tmp-killed"
    leftover.write_bytes(b"half a thumbnail")
    requests = [_request(alice, gid) for gid in [*good, stale, missing, rejected]]
    requests.append(_request(alice, stale, attempt=2))
    requests.append(_request(alice, good[1]))  # delivered twice

    left = await Thumbnailer(rt).handle_batch(requests)

    assert [r.generation_id for r in left] == [missing]  # for handle() to look at
    rows = {
        r["id"]: r
        for r in await rt.pool.fetch(
            "SELECT id, thumbnail_key FROM generations WHERE user_id = $1", alice.user_id
        )
    }
    for gid in good:
        assert rows[gid]["thumbnail_key"] == thumbnail_key(alice.user_id, gid, 1)
        with Image.open(io.BytesIO(await storage.get(rows[gid]["thumbnail_key"]))) as im:
            assert im.format == "WEBP" and max(im.size) == rt.settings.thumbnail_px
    assert rows[stale]["thumbnail_key"] == thumbnail_key(alice.user_id, stale, 2)
    assert all(rows[g]["thumbnail_key"] is None for g in (missing, rejected))
    assert not await storage.exists(thumbnail_key(alice.user_id, stale, 1))
    assert await storage.exists(thumbnail_key(alice.user_id, stale, 2))
    assert not leftover.exists()
    # The attached are whole: no check left; the others keep theirs.
    checked = {
        r["generation_id"]
        for r in await rt.pool.fetch("SELECT generation_id FROM generation_checks")
    }
    assert checked == {missing, rejected}
    entries = await rt.redis.xrange(rt.settings.keys.user_events(alice.user_id))
    told = [UserEvent.model_validate_json(f[DATA_FIELD]) for _, f in entries]
    assert sorted(str(e.generation["id"]) for e in told) == sorted(map(str, [*good, stale]))
    assert {e.type for e in told} == {"thumbnail.ready"}


async def test_one_request_whose_image_is_missing_is_stale_or_an_error(
    rt: Runtime, alice: UserAuth
) -> None:
    """``handle``: a missing image that is still the generation's raises (the request is
    tried again); one the generation no longer has is dropped."""
    gid = await _completed(rt, alice, attempt=2)
    await Thumbnailer(rt).handle(_request(alice, gid, attempt=1))  # stale: nothing raised
    with pytest.raises(ObjectNotFound):
        await Thumbnailer(rt).handle(_request(alice, gid, attempt=2))
    assert not await rt.storage.list_keys(f"users/{alice.user_id}/generations/{gid}/")
