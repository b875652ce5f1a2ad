"""``/api/v1/generations``: create, list, read, image, thumbnail."""

from __future__ import annotations

from datetime import timedelta

import asyncpg
from aiohttp import web

from core import generations as gens
from core import lifecycle
from core.api.http import json_response, parse_body, parse_uuid, require_user, runtime_key
from core.auth import Principal
from core.errors import Conflict, InvalidInput, NotFound
from core.events import GenerationRequested, ProviderCancel
from core.lifecycle import Status
from core.logging import get_logger
from core.notify import notify
from core.runtime import Runtime
from core.storage import ObjectNotFound, clear_generation

log = get_logger("gengui.api")
routes = web.RouteTableDef()

MAX_PAGE = 100


async def _request_dispatch(rt: Runtime, row: asyncpg.Record) -> None:
    try:
        await rt.publisher.send(
            rt.settings.keys.requested,
            GenerationRequested(generation_id=row["id"], attempt=row["attempt"]),
        )
    except Exception as exc:
        # The row is committed: the reconciler publishes it again after the grace period.
        log.warning("api.publish_failed", generation_id=str(row["id"]), error=repr(exc))


@routes.post("/api/v1/generations")
async def create_generation(request: web.Request) -> web.Response:
    principal = await require_user(request)
    rt = request.app[runtime_key]
    key = request.headers.get("Idempotency-Key")
    if key is not None and not (1 <= len(key) <= 255 and key.isprintable()):
        raise InvalidInput(
            "Idempotency-Key must be 1..255 printable characters", code="invalid_idempotency_key"
        )
    body = await parse_body(request, gens.CreateGeneration)
    s = rt.settings
    row, created = await gens.create(
        rt.pool,
        principal.user_id,
        body,
        provider=s.default_provider,
        idempotency_key=key,
        dispatch_grace=timedelta(seconds=s.dispatch_grace_s),
        deadline=timedelta(seconds=s.generation_deadline_s),
    )
    if created:
        await _request_dispatch(rt, row)
        log.info("generation.created", generation_id=str(row["id"]))
    headers = {"Location": f"/api/v1/generations/{row['id']}"}
    if not created:
        headers["Idempotent-Replayed"] = "true"
    return json_response(gens.resource(row), status=202, headers=headers)


@routes.get("/api/v1/generations")
async def list_generations(request: web.Request) -> web.Response:
    principal = await require_user(request)
    q = request.query
    try:
        limit = int(q.get("limit", "20"))
    except ValueError:
        raise InvalidInput("limit must be an integer", code="invalid_limit") from None
    if not 1 <= limit <= MAX_PAGE:
        raise InvalidInput(f"limit must be 1..{MAX_PAGE}", code="invalid_limit")
    status = None
    if "status" in q:
        try:
            status = Status(q["status"])
        except ValueError:
            raise InvalidInput(
                "status must be one of " + ", ".join(s.value for s in Status), code="invalid_status"
            ) from None
    rows, next_cursor = await gens.list_page(
        request.app[runtime_key].pool,
        principal.user_id,
        limit=limit,
        cursor=q.get("cursor") or None,
        status=status,
    )
    return json_response({"items": [gens.resource(r) for r in rows], "next_cursor": next_cursor})


@routes.get("/api/v1/generations/latest")
async def latest_generation(request: web.Request) -> web.Response:
    principal = await require_user(request)
    row = await gens.latest(request.app[runtime_key].pool, principal.user_id)
    if row is None:
        raise NotFound("no generations yet")
    return json_response(gens.resource(row))


async def _owned(request: web.Request) -> tuple[Principal, asyncpg.Record]:
    """The signed-in user and the generation in the path; 404 unless it is theirs."""
    principal = await require_user(request)
    row = await gens.get(
        request.app[runtime_key].pool, principal.user_id, parse_uuid(request.match_info["id"])
    )
    if row is None:
        raise NotFound()
    return principal, row


@routes.get("/api/v1/generations/{id}")
async def get_generation(request: web.Request) -> web.Response:
    _, row = await _owned(request)
    return json_response(gens.resource(row))


async def _serve_object(
    request: web.Request, column: str, content_type_column: str | None
) -> web.StreamResponse:
    _, row = await _owned(request)
    rt = request.app[runtime_key]
    key = row[column]
    if key is None:
        raise NotFound("not ready yet", code="not_ready")
    content_type = row[content_type_column] if content_type_column else "image/webp"
    path = rt.storage.local_path(key)
    if path is not None:
        if not path.exists():
            raise NotFound("the stored object is missing", code="object_missing")
        return web.FileResponse(
            path,
            headers={
                "Content-Type": content_type or "application/octet-stream",
                "Cache-Control": "private, max-age=31536000, immutable",
            },
        )
    url = await rt.storage.presigned_url(key, rt.settings.image_url_ttl_s)
    if url is None:
        try:
            data = await rt.storage.get(key)
        except ObjectNotFound:
            raise NotFound("the stored object is missing", code="object_missing") from None
        return web.Response(body=data, content_type=content_type or "application/octet-stream")
    raise web.HTTPFound(url)


@routes.get("/api/v1/generations/{id}/image")
async def generation_image(request: web.Request) -> web.StreamResponse:
    return await _serve_object(request, "image_key", "image_content_type")


@routes.get("/api/v1/generations/{id}/thumbnail")
async def generation_thumbnail(request: web.Request) -> web.StreamResponse:
    return await _serve_object(request, "thumbnail_key", None)


@routes.post("/api/v1/generations/{id}/cancel")
async def cancel_generation(request: web.Request) -> web.Response:
    """Authoritative: once cancelled, a late result is refused and its image deleted."""
    principal, row = await _owned(request)
    rt = request.app[runtime_key]
    cancelled = await lifecycle.transition(
        rt.pool, row["id"], attempt=row["attempt"], to=Status.CANCELLED, detail={"by": "user"}
    )
    if cancelled is None:
        current = await gens.get(rt.pool, principal.user_id, row["id"])
        assert current is not None
        if current["status"] == Status.CANCELLED:
            return json_response(gens.resource(current))  # cancelling twice is fine
        raise Conflict(
            f"a {current['status']} generation cannot be cancelled",
            code="invalid_state",
            details={"status": current["status"]},
        )
    await clear_generation(rt.storage, principal.user_id, cancelled["id"])
    if cancelled["provider_job_id"]:
        # Stop the remote job too; the row is authoritative whatever the provider says.
        await rt.publisher.send(
            rt.settings.keys.cancels,
            ProviderCancel(
                generation_id=cancelled["id"],
                attempt=cancelled["attempt"],
                provider=cancelled["provider"],
                provider_job_id=cancelled["provider_job_id"],
            ),
        )
    await notify(rt.publisher, cancelled, "generation.cancelled")
    return json_response(gens.resource(cancelled))


@routes.post("/api/v1/generations/{id}/retry")
async def retry_generation(request: web.Request) -> web.Response:
    """A failed generation starts a new attempt; results of the old one stay ignored."""
    _, row = await _owned(request)
    rt = request.app[runtime_key]
    s = rt.settings
    retried = await lifecycle.retry(
        rt.pool,
        row["id"],
        attempt=row["attempt"],
        allowed_from=frozenset({Status.FAILED}),
        detail={"by": "user"},
        error_code=None,
        error_message=None,
        next_check_at=lifecycle.due_in(timedelta(seconds=s.dispatch_grace_s)),
        deadline_at=lifecycle.due_in(timedelta(seconds=s.generation_deadline_s)),
    )
    if retried is None:
        raise Conflict(
            f"only a failed generation can be retried; this one is {row['status']}",
            code="invalid_state",
            details={"status": row["status"]},
        )
    await _request_dispatch(rt, retried)
    await notify(rt.publisher, retried, "generation.queued")
    return json_response(gens.resource(retried), status=202)
