"""Thumbnails: a completed generation's image -> a 128 px WebP beside it.

Decoding and resizing run in a thread (CPU work must not stall the event loop). The
key is written with a CAS on the image it was made from, so a thumbnail of an image
that is no longer the generation's image is deleted instead of attached.
"""

from __future__ import annotations

import asyncio

import structlog

from core import lifecycle
from core.events import ThumbnailRequested
from core.imaging import ImageRejected, make_thumbnail
from core.logging import get_logger
from core.notify import notify
from core.runtime import Runtime
from core.storage import ObjectNotFound, generation_prefix, thumbnail_key

log = get_logger(__name__)


# The thumbnail attached, and with it the generation whole: no check is left, the
# reconciler has nothing more to ask for.
_ATTACH = f"""
    WITH upd AS (
        UPDATE generations SET thumbnail_key = $3, updated_at = now()
         WHERE id = $1 AND image_key = $2 AND status = 'completed'
     RETURNING *
    ){lifecycle.check_cte(None)}
    SELECT * FROM upd
"""


class Thumbnailer:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    async def handle(self, msg: ThumbnailRequested) -> None:
        structlog.contextvars.bind_contextvars(
            generation_id=str(msg.generation_id), attempt=msg.attempt
        )
        rt = self.rt
        try:
            data = await rt.storage.get(msg.image_key)
        except ObjectNotFound:
            current = await rt.pool.fetchval(
                "SELECT image_key FROM generations WHERE id = $1", msg.generation_id
            )
            if current != msg.image_key:
                return  # stale request: that image is gone for good reason
            raise
        try:
            thumb = await asyncio.to_thread(make_thumbnail, data, rt.settings.thumbnail_px)
        except ImageRejected as exc:
            log.error("thumbnail.rejected", code=exc.code)
            return
        key = thumbnail_key(msg.user_id, msg.generation_id, msg.attempt)
        await rt.storage.put(key, thumb, "image/webp")
        row = await rt.pool.fetchrow(
            _ATTACH,
            msg.generation_id,
            msg.image_key,
            key,
        )
        if row is None:
            await rt.storage.delete(key)
            return
        # The generation is whole now: a thumbnailer or worker killed mid-write earlier
        # left a partial file nothing else will clear. A writer still running loses
        # its rename and is retried, which finds the thumbnail in place.
        partials = await rt.storage.discard_partials(generation_prefix(row["user_id"], row["id"]))
        log.info("thumbnail.ready", partials_discarded=partials)
        await notify(rt.publisher, row, "thumbnail.ready")
