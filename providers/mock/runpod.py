"""RunPod serverless, as ``/v2/{endpoint}/...``: run, runsync, status, cancel, retry, health.

Jobs go IN_QUEUE -> IN_PROGRESS -> a terminal status after the latency, and the
``/status`` JSON is posted to the job's webhook (not for cancels). A finished job
carries our handler's output ``{"image_base64", "content_type"}``, or, refused
(``[mock:fail]``), is FAILED with ``error = "invalid_input: ..."`` as the RunPod SDK
reports a handler's ``{"error"}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from typing import Any

from aiohttp import web

from providers.mock.common import b64, json, note, read_json, state_of
from providers.mock.state import NOT_AN_IMAGE, MockJob, MockState, bearer_token, check_key, png

routes = web.RouteTableDef()

_RUNSYNC_WAIT_S = 90.0  # RunPod answers /runsync within 90 s, finished or not


class RunPodFlavor:
    running = "IN_PROGRESS"
    webhook_on_cancel = False

    def finish(self, state: MockState, job: MockJob) -> None:
        d = job.directives
        if d.fail:
            # What the RunPod SDK makes of our handler's {"error": "invalid_input: ..."}.
            job.status, job.error = "FAILED", "invalid_input: mock: the handler refused the job"
        elif d.retryable:
            job.status, job.error = "FAILED", "mock: the worker exited unexpectedly"
        elif d.timeout:
            job.status = "TIMED_OUT"
        else:
            inp = job.input
            job.status = "COMPLETED"
            job.image = (
                NOT_AN_IMAGE
                if d.badimage
                else png(
                    _int(inp.get("width"), 512),
                    _int(inp.get("height"), 512),
                    _int(inp.get("seed"), 0),
                    state.config.max_side,
                )
            )

    def body(self, job: MockJob) -> dict[str, Any]:
        out: dict[str, Any] = {"id": job.id, "status": job.status}
        if job.started_at is not None:
            out["delayTime"] = int((job.started_at - job.created_at) * 1000)
            out["workerId"] = "mock-worker"
        if job.completed_at is not None and job.started_at is not None:
            out["executionTime"] = int((job.completed_at - job.started_at) * 1000)
        if job.output is not None:
            out["output"] = job.output
        elif job.image is not None:
            # Encoded per answer, not kept: the bytes are shared by the PNG cache.
            out["output"] = {"image_base64": b64(job.image), "content_type": "image/png"}
        if job.error:
            out["error"] = job.error
        return out

    def webhook_headers(self, state: MockState, job: MockJob, body: bytes) -> dict[str, str]:
        return {}


FLAVOR = RunPodFlavor()


def _int(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return json({"error": message}, status=status, headers=headers)


def _authorized(request: web.Request) -> bool:
    note(request, provider="runpod")
    ok = check_key(state_of(request).config, bearer_token(request))
    note(request, auth=ok)
    return ok


async def _create(request: web.Request) -> MockJob | web.Response:
    state = state_of(request)
    if not _authorized(request):
        return _error(401, "Unauthorized")
    body = await read_json(request)
    note(request, body=body)
    if not isinstance(body, dict) or not isinstance(body.get("input"), dict):
        return _error(400, "the request must be a JSON object with an input object")
    d = state.directives(str(body["input"].get("prompt", "")))
    note(request, directives=d.active())
    if d.hang:
        return await state.hang()
    if d.ratelimit:
        return _error(429, "mock: too many requests", {"Retry-After": "1"})
    if d.invalid:
        return _error(400, "mock: invalid input")
    webhook = body.get("webhook")
    job = MockJob(
        id=f"{uuid.uuid4()}-u1",
        provider="runpod",
        target=request.match_info["endpoint"],
        input=body["input"],
        directives=d,
        webhook_url=webhook if isinstance(webhook, str) and webhook else None,
        status="IN_QUEUE",
    )
    state.start(job, FLAVOR)
    note(request, job_id=job.id)
    return job


@routes.post("/v2/{endpoint}/run")
async def run(request: web.Request) -> web.Response:
    job = await _create(request)
    if isinstance(job, web.Response):
        return job
    return json({"id": job.id, "status": job.status})


@routes.post("/v2/{endpoint}/runsync")
async def runsync(request: web.Request) -> web.Response:
    job = await _create(request)
    if isinstance(job, web.Response):
        return job
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(job.done.wait(), _RUNSYNC_WAIT_S)
    return json(FLAVOR.body(job))


def _job(request: web.Request) -> MockJob | None:
    job_id = request.match_info["job_id"]
    note(request, job_id=job_id)
    job = state_of(request).jobs.get(job_id)
    return job if job is not None and job.provider == "runpod" else None


@routes.get("/v2/{endpoint}/status/{job_id}")
async def status(request: web.Request) -> web.Response:
    if not _authorized(request):
        return _error(401, "Unauthorized")
    job = _job(request)
    if job is None:
        return _error(404, "request does not exist")
    return json(FLAVOR.body(job))


@routes.post("/v2/{endpoint}/cancel/{job_id}")
async def cancel(request: web.Request) -> web.Response:
    if not _authorized(request):
        return _error(401, "Unauthorized")
    job = _job(request)
    if job is None:
        return _error(404, "request does not exist")
    state_of(request).cancel(job, "CANCELLED", FLAVOR)
    return json({"id": job.id, "status": job.status})


@routes.post("/v2/{endpoint}/retry/{job_id}")
async def retry(request: web.Request) -> web.Response:
    """FAILED / TIMED_OUT jobs run again under the same id. The rerun drops the
    transient directives (retryable, timeout) and the random failure, so it succeeds
    the way a real retry of a transient failure usually does."""
    state = state_of(request)
    if not _authorized(request):
        return _error(401, "Unauthorized")
    job = _job(request)
    if job is None:
        return _error(404, "request does not exist")
    if job.status not in ("FAILED", "TIMED_OUT"):
        return _error(400, f"only FAILED or TIMED_OUT jobs can be retried, not {job.status}")
    job.directives.retryable = job.directives.timeout = False
    job.retries += 1
    job.status, job.output, job.error, job.image = "IN_QUEUE", None, None, None
    job.created_at, job.started_at, job.completed_at = time.time(), None, None
    job.done = asyncio.Event()
    state.start(job, FLAVOR)
    return json({"id": job.id, "status": job.status})


@routes.get("/v2/{endpoint}/health")
async def health(request: web.Request) -> web.Response:
    if not _authorized(request):
        return _error(401, "Unauthorized")
    endpoint = request.match_info["endpoint"]
    jobs = [
        j
        for j in state_of(request).jobs.values()
        if j.provider == "runpod" and j.target == endpoint
    ]

    def count(*statuses: str) -> int:
        return sum(1 for j in jobs if j.status in statuses)

    running = count("IN_PROGRESS")
    return json(
        {
            "jobs": {
                "completed": count("COMPLETED"),
                "failed": count("FAILED", "TIMED_OUT"),
                "inProgress": running,
                "inQueue": count("IN_QUEUE"),
                "retried": sum(j.retries for j in jobs),
            },
            "workers": {"idle": 1, "running": running, "initializing": 0, "ready": 1},
        }
    )
