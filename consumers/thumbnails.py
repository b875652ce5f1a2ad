"""Thumbnails: a completed generation's image -> a 128 px WebP beside it.

Decoding and resizing run in a thread (CPU work must not stall the event loop). The
key is written with a CAS on the image it was made from, so a thumbnail of an image
that is no longer the generation's image is deleted instead of attached.

A read is handled as a batch (``handle_batch``): its images are made ``CPU_SLOTS`` at a
time, each local file's read, resize and write in one thread hop; the files are made
durable by one shared sync; every thumbnail is attached by one ``UPDATE ... FROM
unnest``, the partial files of the batch's generations discarded in one call, and the
``thumbnail.ready`` notices go out with the batch's XACK. One at a time, as before,
each thumbnail waited on its own sync, transaction and script call: 720 a second on
the bench machine where the rest of the pipeline did 2,500 (bench/README.md); ``handle``
is now the batch path for one request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg
import structlog

from core import lifecycle
from core.events import ThumbnailRequested
from core.imaging import ImageRejected, make_thumbnail
from core.logging import get_logger
from core.notify import Outbox
from core.runtime import Runtime
from core.storage import LocalStorage, ObjectNotFound, generation_prefix, thumbnail_key

log = get_logger(__name__)


# Each thumbnail (generation, image it was made from, thumbnail key) attached, and with
# it the generation whole: no check is left, the reconciler has nothing more to ask for.
_ATTACH = f"""
    WITH v AS (
        SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[]) AS v(id, image_key, thumb)
    ), upd AS (
        UPDATE generations g SET thumbnail_key = v.thumb, updated_at = now()
          FROM v
         WHERE g.id = v.id AND g.image_key = v.image_key AND g.status = 'completed'
     RETURNING g.*
    ){lifecycle.check_cte(None)}
    SELECT * FROM upd
"""

# Images made at once: decoding and resizing are CPU work, one core each.
CPU_SLOTS = 2
_MISSING, _REJECTED = "missing", "rejected"


@dataclass(frozen=True)
class _Made:
    request: ThumbnailRequested
    key: str
    path: str | None  # a local file, not durable yet


class Thumbnailer:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self._cpu = asyncio.Semaphore(CPU_SLOTS)

    async def handle_batch(
        self, requests: Sequence[ThumbnailRequested], outbox: Outbox | None = None
    ) -> list[ThumbnailRequested]:
        """Makes and attaches the thumbnails of a whole read; returns the requests whose
        image is missing, for ``handle`` to tell a stale request from a real error.
        Notices go into ``outbox`` when given (sent with the batch's ack), else here."""
        unique = {(r.generation_id, r.image_key): r for r in requests}  # redeliveries
        results = await asyncio.gather(*(self._make(r) for r in unique.values()))
        missing = [
            r for r, result in zip(unique.values(), results, strict=True) if result == _MISSING
        ]
        rows = await self._attach([m for m in results if isinstance(m, _Made)])
        own = outbox is None
        if outbox is None:
            outbox = Outbox(self.rt.publisher)
        for row in rows:
            log.info("thumbnail.ready", generation_id=str(row["id"]), attempt=row["attempt"])
            outbox.notify(row, "thumbnail.ready")
        if own:
            await outbox.flush()
        return missing

    async def _make(self, req: ThumbnailRequested) -> _Made | str:
        """The request's thumbnail stored, or ``_MISSING`` (its image is not there) or
        ``_REJECTED`` (the image is not one we thumbnail: logged, not retried)."""
        storage = self.rt.storage
        key = thumbnail_key(req.user_id, req.generation_id, req.attempt)
        px = self.rt.settings.thumbnail_px
        try:
            if isinstance(storage, LocalStorage):
                local = storage

                def render() -> str:  # one thread hop: read, resize, write
                    source = local.local_path(req.image_key)
                    assert source is not None
                    return local.write_file(key, make_thumbnail(source.read_bytes(), px))

                async with self._cpu:
                    return _Made(req, key, await asyncio.to_thread(render))
            # A remote store: its transfers do not hold a CPU slot.
            data = await storage.get(req.image_key)
            async with self._cpu:
                thumb = await asyncio.to_thread(make_thumbnail, data, px)
            await storage.put(key, thumb, "image/webp")
            return _Made(req, key, None)
        except (ObjectNotFound, FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return _MISSING
        except ImageRejected as exc:
            log.error("thumbnail.rejected", code=exc.code, generation_id=str(req.generation_id))
            return _REJECTED

    async def _attach(self, made: list[_Made]) -> list[asyncpg.Record]:
        """Made durable together, then attached in one statement; a thumbnail whose
        image is no longer its generation's is deleted. Returns the rows attached."""
        if not made:
            return []
        storage = self.rt.storage
        if isinstance(storage, LocalStorage):
            await asyncio.gather(*(storage.durable(m.path) for m in made if m.path is not None))
        rows = await self.rt.pool.fetch(
            _ATTACH,
            [m.request.generation_id for m in made],
            [m.request.image_key for m in made],
            [m.key for m in made],
        )
        # By key, not generation: a batch may hold a stale attempt's request beside the
        # current one's for the same generation.
        attached = {(row["id"], row["thumbnail_key"]) for row in rows}
        stale = [m.key for m in made if (m.request.generation_id, m.key) not in attached]
        await asyncio.gather(*(storage.delete(key) for key in stale))
        # The generations are whole now: a thumbnailer or worker killed mid-write
        # earlier left partial files nothing else will clear. A writer still running
        # loses its rename and is retried, which finds the thumbnail in place.
        prefixes = [generation_prefix(row["user_id"], row["id"]) for row in rows]
        partials = await storage.discard_partials(*prefixes)
        if partials:
            log.info("thumbnail.partials_discarded", count=partials)
        return list(rows)

    async def handle(self, msg: ThumbnailRequested) -> None:
        """One request (one the batch left, or each of a batch that failed): the batch
        path for it alone; an image that is missing is a stale request (the generation
        has another image now) or an error, raised so the request is tried again."""
        structlog.contextvars.bind_contextvars(
            generation_id=str(msg.generation_id), attempt=msg.attempt
        )
        if not await self.handle_batch([msg]):
            return
        current = await self.rt.pool.fetchval(
            "SELECT image_key FROM generations WHERE id = $1", msg.generation_id
        )
        if current != msg.image_key:
            return  # stale request: that image is gone for good reason
        raise ObjectNotFound(msg.image_key)
