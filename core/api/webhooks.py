"""Provider webhooks: ``POST /api/v1/webhooks/{provider}/{generation_id}``.

Checks, in order, each failing with nothing changed: the provider is one we call
(404); the URL's HMAC over (provider, generation, attempt) is ours (401); the
provider's own signature, where it has one (Replicate's Standard Webhooks headers,
401); the body parses (400). Then the report is applied through the same path as a
poll (``consumers.results.apply_outcome``) and the answer is 200 — also for a
duplicate or an old attempt, which are recognised and ignored, so the provider
stops redelivering.

The route answers fast: an inline image is decoded and stored (milliseconds); an
image at a URL is only queued for the result fetchers.
"""

from __future__ import annotations

from uuid import UUID

import structlog
from aiohttp import web
from pydantic import BaseModel

from consumers.results import apply_outcome
from core.api.http import json_response, parse_uuid, runtime_key
from core.api.openapi import Body, Param, doc
from core.errors import InvalidInput, NotFound, ProviderError, Unauthorized
from core.logging import get_logger
from core.webhooks import verify
from providers.registry import ProviderSet

log = get_logger(__name__)

providers_key = web.AppKey("providers", ProviderSet)
webhook_secret_key = web.AppKey("webhook_secret", bytes)

routes = web.RouteTableDef()


async def _read_capped(request: web.Request, limit: int) -> bytes:
    """The body, up to ``limit`` bytes: webhook bodies may carry an image, far above the
    API's JSON limit, but not without bound."""
    if request.content_length is not None and request.content_length > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=request.content_length)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > limit:
            raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=size)
        chunks.append(chunk)
    return b"".join(chunks)


def _attempt(request: web.Request) -> int:
    try:
        attempt = int(request.query.get("attempt", ""))
    except ValueError:
        raise Unauthorized("the webhook signature is not valid", code="invalid_signature") from None
    if attempt < 1:
        raise Unauthorized("the webhook signature is not valid", code="invalid_signature")
    return attempt


class WebhookAck(BaseModel):
    """``ignored`` for a duplicate, an old attempt or an ended generation; else what was
    done with the report (``completed``, ``failed``, ``processing``, ``fetching``...)."""

    status: str


@routes.post("/api/v1/webhooks/{provider}/{generation_id}")
@doc(
    "Provider webhook (signed URL)",
    request=Body("application/json", {"type": "object"}, "The provider's own payload."),
    params=[
        Param("provider", "path", {"type": "string"}, "The provider we gave this URL to."),
        Param("generation_id", "path", {"type": "string", "format": "uuid"}),
        Param("attempt", "query", {"type": "integer", "minimum": 1}, required=True),
        Param(
            "sig",
            "query",
            {"type": "string"},
            "HMAC-SHA256 of (provider, generation, attempt) under the webhook secret.",
            required=True,
        ),
    ],
    responses={200: WebhookAck, 401: None, 404: None, 413: None},
    tags=["webhooks"],
    auth=False,
)
async def provider_webhook(request: web.Request) -> web.Response:
    rt = request.app[runtime_key]
    name = request.match_info["provider"]
    provider = request.app[providers_key].polling.get(name)
    if provider is None:
        raise NotFound("no such webhook", code="not_found")
    generation_id: UUID = parse_uuid(request.match_info["generation_id"])
    attempt = _attempt(request)
    structlog.contextvars.bind_contextvars(generation_id=str(generation_id), attempt=attempt)
    secret = request.app[webhook_secret_key]
    if not verify(secret, name, generation_id, attempt, request.query.get("sig", "")):
        raise Unauthorized("the webhook signature is not valid", code="invalid_signature")
    # Base64 inflates by 4/3; the JSON around it is small.
    body = await _read_capped(request, rt.settings.download_max_bytes * 4 // 3 + 64 * 1024)
    if not provider.verify_webhook(request.headers, body):
        raise Unauthorized("the webhook signature is not valid", code="invalid_signature")
    try:
        outcome = provider.parse_webhook(body)
    except ProviderError as exc:
        raise InvalidInput(exc.message, code="invalid_payload") from exc
    row = await rt.pool.fetchrow(
        "SELECT user_id, attempt, status, provider FROM generations WHERE id = $1", generation_id
    )
    if (
        row is None
        or row["provider"] != name
        or row["attempt"] != attempt
        or row["status"] not in ("submitted", "processing")
    ):
        # Signed by us, so it was real once: a duplicate, an old attempt, or a
        # generation that ended. Acknowledge it so the provider stops sending.
        log.info("webhook.ignored", provider=name, state=outcome.state)
        return json_response({"status": "ignored"})
    done = await apply_outcome(
        rt,
        provider=name,
        generation_id=generation_id,
        attempt=attempt,
        user_id=row["user_id"],
        outcome=outcome,
    )
    log.info("webhook.applied", provider=name, state=outcome.state, result=done)
    return json_response({"status": done})
