"""Replicate predictions: create (by model or by version), get, cancel, and the output
files themselves at ``/files/{id}.png``.

Predictions go starting -> processing -> a terminal status after the latency; the
prediction object is posted to the webhook when it ends (also when cancelled: the
``completed`` event covers every terminal state), signed the Standard Webhooks way
with the configured ``whsec_`` secret. The signing below is written out on its own,
not borrowed from the adapter, so a mistake in one is caught by the other.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import re
import time
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from providers.mock.common import base_url, json, note, read_json, state_of
from providers.mock.state import NOT_AN_IMAGE, MockJob, MockState, bearer_token, check_key, png

routes = web.RouteTableDef()

_MAX_WAIT_S = 60.0  # ``Prefer: wait`` holds the request at most this long
_ASPECT = re.compile(r"^(\d+):(\d+)$")


def _iso(ts: float | None) -> str | None:
    return (
        None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")
    )


class ReplicateFlavor:
    running = "processing"
    webhook_on_cancel = True

    def finish(self, state: MockState, job: MockJob) -> None:
        d = job.directives
        if d.fail:
            job.status = "failed"
            job.error = "NSFW content detected. Try running it again, or try a different prompt."
        elif d.retryable:
            job.status, job.error = "failed", "Prediction interrupted; please retry (code: PA)"
        elif d.timeout:
            job.status = "aborted"
        else:
            width, height = _size(job.input)
            seed = job.input.get("seed", 0)
            job.image = (
                NOT_AN_IMAGE
                if d.badimage
                else png(width, height, seed if isinstance(seed, int) else 0, state.config.max_side)
            )
            job.status = "succeeded"
            job.output = [f"{job.base_url}/files/{job.id}.png"]

    def body(self, job: MockJob) -> dict[str, Any]:
        api = f"{job.base_url}/v1/predictions/{job.id}"
        return {
            "id": job.id,
            "model": job.target.partition(":")[0],
            "version": job.target.partition(":")[2] or "hidden",
            "input": job.input,
            "logs": "",
            "output": job.output,
            "data_removed": False,
            "error": job.error,
            "status": job.status,
            "source": "api",
            "created_at": _iso(job.created_at),
            "started_at": _iso(job.started_at),
            "completed_at": _iso(job.completed_at),
            "urls": {"get": api, "cancel": f"{api}/cancel", "web": f"{job.base_url}/p/{job.id}"},
            "metrics": (
                {"predict_time": round(job.completed_at - job.started_at, 3)}
                if job.completed_at and job.started_at
                else {}
            ),
        }

    def webhook_headers(self, state: MockState, job: MockJob, body: bytes) -> dict[str, str]:
        secret = state.config.replicate_webhook_secret
        key = base64.b64decode(secret.removeprefix("whsec_"))
        msg_id = f"msg_{job.id}"  # the same for a redelivery, as the spec says
        timestamp = str(int(time.time()))
        mac = hmac.new(
            key, msg_id.encode() + b"." + timestamp.encode() + b"." + body, hashlib.sha256
        )
        return {
            "webhook-id": msg_id,
            "webhook-timestamp": timestamp,
            "webhook-signature": "v1," + base64.b64encode(mac.digest()).decode(),
        }


FLAVOR = ReplicateFlavor()


def _size(inp: dict[str, Any]) -> tuple[int, int]:
    width, height = inp.get("width"), inp.get("height")
    if isinstance(width, int) and isinstance(height, int):
        return width, height
    match = _ASPECT.match(str(inp.get("aspect_ratio", "1:1")))
    if match:
        w, h = int(match[1]), int(match[2])
        return (1024, 1024 * h // w) if w >= h else (1024 * w // h, 1024)
    return 1024, 1024


def _problem(status: int, title: str, detail: str, **extra: Any) -> web.Response:
    headers = {"Retry-After": "1"} if status == 429 else None
    return json({"title": title, "detail": detail, "status": status, **extra}, status, headers)


def _authorized(request: web.Request) -> bool:
    note(request, provider="replicate")
    ok = check_key(state_of(request).config, bearer_token(request))
    note(request, auth=ok)
    return ok


_UNAUTHENTICATED = ("Unauthenticated", "You did not pass a valid authentication token")


async def _create(request: web.Request, target: str | None) -> web.Response:
    state = state_of(request)
    if not _authorized(request):
        return _problem(401, *_UNAUTHENTICATED)
    body = await read_json(request)
    note(request, body=body)
    if not isinstance(body, dict) or not isinstance(body.get("input"), dict):
        return _problem(422, "Input validation failed", "input is required")
    if target is None:
        version = body.get("version")
        if not isinstance(version, str) or not version:
            return _problem(422, "Invalid version or not permitted", "version is required")
        target = version if ":" in version else f"unknown/unknown:{version}"
    d = state.directives(str(body["input"].get("prompt", "")))
    note(request, directives=d.active())
    if d.hang:
        return await state.hang()
    if d.ratelimit:
        return _problem(429, "Request was throttled", "mock: too many requests")
    if d.invalid:
        return _problem(
            422,
            "Input validation failed",
            "mock: input is invalid",
            invalid_fields=[{"type": "invalid", "field": "prompt", "description": "mock"}],
        )
    webhook = body.get("webhook")
    job = MockJob(
        id=state.new_id(),
        provider="replicate",
        target=target,
        input=body["input"],
        directives=d,
        webhook_url=webhook if isinstance(webhook, str) and webhook else None,
        status="starting",
        base_url=base_url(request),
    )
    state.start(job, FLAVOR)
    note(request, job_id=job.id)
    wait_s = _prefer_wait(request.headers.get("Prefer", ""))
    if wait_s:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(job.done.wait(), wait_s)
    return json(FLAVOR.body(job), status=201)


def _prefer_wait(header: str) -> float:
    """``Prefer: wait`` (60 s) or ``Prefer: wait=N``: sync mode, held until done or N s."""
    for item in header.split(","):
        name, _, value = item.strip().partition("=")
        if name == "wait":
            try:
                return min(float(value), _MAX_WAIT_S) if value else _MAX_WAIT_S
            except ValueError:
                return 0.0
    return 0.0


@routes.post("/v1/predictions")
async def create_by_version(request: web.Request) -> web.Response:
    return await _create(request, None)


@routes.post("/v1/models/{owner}/{name}/predictions")
async def create_by_model(request: web.Request) -> web.Response:
    return await _create(request, f"{request.match_info['owner']}/{request.match_info['name']}")


def _job(request: web.Request) -> MockJob | None:
    job_id = request.match_info["prediction_id"]
    note(request, job_id=job_id)
    job = state_of(request).jobs.get(job_id)
    return job if job is not None and job.provider == "replicate" else None


@routes.get("/v1/predictions/{prediction_id}")
async def get(request: web.Request) -> web.Response:
    if not _authorized(request):
        return _problem(401, *_UNAUTHENTICATED)
    job = _job(request)
    if job is None:
        return _problem(404, "Not found", "prediction not found")
    return json(FLAVOR.body(job))


@routes.post("/v1/predictions/{prediction_id}/cancel")
async def cancel(request: web.Request) -> web.Response:
    if not _authorized(request):
        return _problem(401, *_UNAUTHENTICATED)
    job = _job(request)
    if job is None:
        return _problem(404, "Not found", "prediction not found")
    state_of(request).cancel(job, "canceled", FLAVOR)
    return json(FLAVOR.body(job))


@routes.get("/files/{prediction_id}.png")
async def output_file(request: web.Request) -> web.Response:
    """Delivery URLs need no token, as on replicate.delivery."""
    note(request, provider="replicate-files")
    job = _job(request)
    if job is None or job.image is None:
        return web.Response(status=404, text="not found")
    return web.Response(body=job.image, content_type="image/png")
