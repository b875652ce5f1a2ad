"""``/api/v1/generations``: create, list, read, image, thumbnail."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from uuid import UUID

import asyncpg
from aiohttp import web
from pydantic import BaseModel, Field

from core import generations as gens
from core import lifecycle
from core.api.http import json_response, parse_body, parse_uuid, require_user, runtime_key
from core.api.openapi import Body, Error, Param, Returns, doc
from core.auth import Principal
from core.errors import Conflict, Forbidden, InvalidInput, NotFound
from core.events import GenerationRequested, ProviderCancel
from core.flags import selector_key
from core.lifecycle import Status
from core.limits import GenerationLimits
from core.logging import get_logger
from core.metrics import API_PUBLISH_BATCH
from core.notify import Outbox, OutboxQueue, notify
from core.storage import ObjectNotFound, clear_generation
from core.streams import Publisher
from providers.registry import QueueProvider

log = get_logger("gengui.api")
routes = web.RouteTableDef()

MAX_PAGE = 100


# ---- documented shapes (what ``gens.resource`` returns; checked by tests/integration/
# test_openapi.py against real responses) -------------------------------------------


class GenerationError(BaseModel):
    code: str
    message: str | None


class Generation(BaseModel):
    """A generation as the API returns it."""

    id: UUID
    status: Status
    attempt: int = Field(description="1 for the first try; each retry starts a new attempt.")
    provider: str
    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    seed: int
    progress: float | None = Field(description="0..1 while processing, when the engine says.")
    error: GenerationError | None
    image_url: str | None = Field(description="Set once completed.")
    thumbnail_url: str | None = Field(description="Set shortly after completed.")
    created_at: datetime
    updated_at: datetime
    completed_at: datetime | None


class GenerationPage(BaseModel):
    """Newest first; pass ``next_cursor`` as ``cursor`` for the next page."""

    items: list[Generation]
    next_cursor: str | None


class ListQuery(BaseModel):
    limit: int = Field(20, ge=1, le=MAX_PAGE, description="Page size.")
    cursor: str | None = Field(None, description="`next_cursor` of the previous page.")
    status: Status | None = Field(None, description="Only generations in this status.")


GENERATION_ID = Param("id", "path", {"type": "string", "format": "uuid"}, "The generation's id.")
IDEMPOTENCY_KEY = Param(
    "Idempotency-Key",
    "header",
    {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[\\x20-\\x7E]+$"},
    "Replaying a request with the same key returns the original generation "
    "(`Idempotent-Replayed: true`); the same key with another body is a 409.",
)
IMAGE = Body("image/*", description="The image bytes, or a redirect to a short-lived URL.")
REDIRECT = Returns(
    None, "Redirect to a short-lived presigned URL (S3 storage).", {"Location": "The URL."}
)


class Announcer:
    """Sends each new attempt's notice, then its job or its dispatch request.

    A row the create wrote ``submitted`` (a queue provider's, ``Settings.api_dispatch``)
    gets ``generation.submitted`` and its job on the provider's queue, as the dispatcher
    would have sent them; a ``queued`` row gets ``generation.queued`` and a
    ``generation:requested`` for the dispatchers. The creates of one loop turn (or of
    the time a send is in flight) share one script call (``core.notify.OutboxQueue``):
    under load the Redis call, which costs the API more CPU than its INSERT, is paid per
    batch instead of per request. Each notice goes before its own job or request, so the
    next stage's notice cannot overtake it.

    The rows are committed either way: a failure is logged, never raised. A client that
    missed the notice reads the resource; a lost request is published again by the
    reconciler after the dispatch grace period, a lost job retried after its provider's
    check interval (as after a dispatcher's crash between its claim and its send).
    """

    def __init__(
        self,
        publisher: Publisher,
        stream: str,
        queues: Mapping[str, QueueProvider] | None = None,
    ) -> None:
        self._stream = stream
        self._queues = dict(queues or {})
        self._queue = OutboxQueue(publisher, observe=API_PUBLISH_BATCH.observe)

    async def announce(self, row: asyncpg.Record) -> None:
        queue = self._queues.get(row["provider"]) if row["status"] == Status.SUBMITTED else None
        if queue is not None:

            def fill(outbox: Outbox) -> None:
                queue.dispatch_in(outbox, row)

        else:
            request = GenerationRequested(
                generation_id=row["id"], attempt=row["attempt"], provider=row["provider"]
            )

            def fill(outbox: Outbox) -> None:
                outbox.notify(row, "generation.queued")
                outbox.send(self._stream, request)

        try:
            await self._queue.add(fill)
        except Exception as exc:
            log.warning("api.publish_failed", generation_id=str(row["id"]), error=repr(exc))

    async def aclose(self) -> None:
        """Wait for the send in flight (shutdown)."""
        await self._queue.aclose()


announcer_key = web.AppKey("announcer", Announcer)
creator_key = web.AppKey("creator", gens.Creator)


@routes.post("/api/v1/generations")
@doc(
    "Create a generation",
    request=gens.CreateGeneration,
    params=[IDEMPOTENCY_KEY],
    responses={
        202: Returns(
            Generation,
            "Accepted: `submitted` (its job is on its provider's queue: local workers, "
            "hosted runners) or `queued` for dispatch (remote providers).",
            {"Location": "The generation's URL.", "Idempotent-Replayed": "`true` on a replay."},
        ),
        403: Returns(
            Error, "`email_unverified`, or `csrf_failed` (a session without X-CSRF-Token)."
        ),
        409: None,
        429: Returns(
            Error,
            "`too_many_active`, `daily_quota` or `rate_limited`.",
            {"Retry-After": "Seconds to wait."},
        ),
    },
    tags=["generations"],
)
async def create_generation(request: web.Request) -> web.Response:
    """Needs a verified e-mail address. Limits: generations queued or running at once,
    and per UTC day by plan (``GET /api/v1/auth/me`` shows them); a replay with the
    same Idempotency-Key is never refused by them, nor counted."""
    principal = await require_user(request)
    if not principal.email_verified:
        raise Forbidden(
            "verify your e-mail address to create images (POST /api/v1/auth/verify/resend "
            "sends the link again)",
            code="email_unverified",
        )
    key = request.headers.get("Idempotency-Key")
    if key is not None and not (1 <= len(key) <= 255 and key.isprintable()):
        raise InvalidInput(
            "Idempotency-Key must be 1..255 printable characters", code="invalid_idempotency_key"
        )
    body = await parse_body(request, gens.CreateGeneration)
    # In memory, no I/O: GrowthBook being slow or down cannot slow or fail this.
    choice = await request.app[selector_key].choose(principal)
    # Batched with the creates in flight; the new row is announced before this returns.
    row, created = await request.app[creator_key].create(
        principal.user_id,
        body,
        provider=choice.provider,
        flag_rule=choice.rule,
        idempotency_key=key,
        limits=GenerationLimits.for_plan(request.app[runtime_key].settings, principal.plan),
    )
    resource = gens.resource(row)
    headers = {"Location": f"/api/v1/generations/{resource['id']}"}
    if created:
        log.info(
            "generation.created",
            generation_id=resource["id"],
            provider=row["provider"],
            flag_rule=row["flag_rule"],
        )
    else:
        headers["Idempotent-Replayed"] = "true"
    return json_response(resource, status=202, headers=headers)


@routes.get("/api/v1/generations")
@doc(
    "List your generations",
    query=ListQuery,
    responses={200: GenerationPage},
    tags=["generations"],
)
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
@doc(
    "Your most recent generation",
    responses={200: Generation, 404: None},
    tags=["generations"],
)
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
@doc(
    "Read a generation",
    params=[GENERATION_ID],
    responses={200: Generation, 404: None},
    tags=["generations"],
)
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
@doc(
    "Download the image",
    params=[GENERATION_ID],
    responses={200: IMAGE, 302: REDIRECT, 404: None},
    tags=["generations"],
)
async def generation_image(request: web.Request) -> web.StreamResponse:
    return await _serve_object(request, "image_key", "image_content_type")


@routes.get("/api/v1/generations/{id}/thumbnail")
@doc(
    "Download the thumbnail (WebP)",
    params=[GENERATION_ID],
    responses={200: IMAGE, 302: REDIRECT, 404: None},
    tags=["generations"],
)
async def generation_thumbnail(request: web.Request) -> web.StreamResponse:
    return await _serve_object(request, "thumbnail_key", None)


@routes.post("/api/v1/generations/{id}/cancel")
@doc(
    "Cancel a generation",
    params=[GENERATION_ID],
    responses={200: Generation, 404: None, 409: None},
    tags=["generations"],
)
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
@doc(
    "Retry a failed generation",
    params=[GENERATION_ID],
    responses={202: Generation, 404: None, 409: None},
    tags=["generations"],
)
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
    await request.app[announcer_key].announce(retried)
    return json_response(gens.resource(retried), status=202)
