"""RunPod serverless over its HTTP API (``https://api.runpod.ai/v2/{endpoint}/...``).

``submit`` is ``POST /run`` with an execution policy and our signed webhook URL;
RunPod posts the ``/status`` JSON to that URL when the job ends (and retries it
twice), and the reconciler's ``poll`` (``GET /status/{id}``) is the backup path.

Output contract, kept by our RunPod handler (``providers.runpod_handler``)::

    COMPLETED  output = {"image_base64": "<base64 PNG/JPEG/WebP>", "content_type": "image/png"}
    FAILED     error = "invalid_input: <why>"   the handler refused the input: permanent
                                                (the RunPod SDK turns a returned "error"
                                                into a FAILED job carrying that string)
    COMPLETED  output = {"error": "<why>"}      a handler that reports errors as output:
                                                permanent too

Statuses -> outcomes::

    IN_QUEUE -> queued       IN_PROGRESS -> processing      CANCELLED -> cancelled
    COMPLETED -> completed (image), or failed (permanent provider_failed: output.error)
    FAILED -> failed (retryable provider_failed; permanent provider_invalid_request
              when the error starts with "invalid_input:")
    TIMED_OUT -> failed (retryable provider_timeout)
    404 from /status -> failed (retryable provider_job_lost)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import aiohttp
import orjson

from core.errors import ProviderError, ProviderRejected, ProviderRetryable
from providers.base import Failure, Job, Outcome, Submission
from providers.http import JsonApi, bad_output, bearer, decode_image_b64

# Our handler's prefix for a job it refuses: the same input will always be refused.
INVALID_INPUT = "invalid_input:"

_QUEUED = {"IN_QUEUE": "queued", "IN_PROGRESS": "processing"}


class RunPodProvider(JsonApi):
    """One RunPod serverless endpoint. Implements ``PollingProvider``."""

    name = "runpod"

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        endpoint_id: str,
        api_key: str,
        execution_timeout_s: float,
        ttl_s: float,
        timeout_s: float,
    ) -> None:
        self.session = session
        self._label = "runpod"
        self._base_url = f"{base_url.rstrip('/')}/{endpoint_id}"
        self._headers = bearer(api_key)
        self.execution_timeout_ms = int(execution_timeout_s * 1000)
        self.ttl_ms = int(ttl_s * 1000)
        self.timeout_s = timeout_s

    async def submit(self, job: Job, *, webhook_url: str | None = None) -> Submission:
        body: dict[str, Any] = {
            "input": {
                "prompt": job.prompt,
                "negative_prompt": job.negative_prompt,
                "width": job.width,
                "height": job.height,
                "seed": job.seed,
                "generation_id": str(job.generation_id),
                "attempt": job.attempt,
            },
            "policy": {"executionTimeout": self.execution_timeout_ms, "ttl": self.ttl_ms},
        }
        if webhook_url:
            body["webhook"] = webhook_url
        _, data = await self._call("POST", "run", "run", json=body)
        job_id = data.get("id") if isinstance(data, dict) else None
        if not isinstance(job_id, str) or not job_id:
            raise bad_output("runpod run: the answer has no job id")
        return Submission(provider_job_id=job_id)

    async def poll(self, job: Job) -> Outcome:
        if not job.provider_job_id:
            raise ProviderRetryable("runpod: the job has no RunPod id", code="provider_job_lost")
        status, data = await self._call(
            "GET", f"status/{job.provider_job_id}", "status", accept=frozenset({404})
        )
        if status == 404:
            return _lost(job.provider_job_id)
        return outcome_from_status(data)

    async def cancel(self, job: Job) -> None:
        """``POST /cancel/{id}``; an unknown or finished job is not an error."""
        if not job.provider_job_id:
            return
        await self._call(
            "POST", f"cancel/{job.provider_job_id}", "cancel", accept=frozenset({400, 404})
        )

    async def retry(self, job: Job) -> Submission:
        """``POST /retry/{id}``: RunPod runs a FAILED or TIMED_OUT job again, same id."""
        if not job.provider_job_id:
            raise ProviderRetryable("runpod: the job has no RunPod id", code="provider_job_lost")
        _, data = await self._call("POST", f"retry/{job.provider_job_id}", "retry")
        job_id = data.get("id") if isinstance(data, dict) else None
        return Submission(
            provider_job_id=job_id if isinstance(job_id, str) else job.provider_job_id
        )

    async def health(self) -> dict[str, Any]:
        """``GET /health``: job counts by state and workers by state, as RunPod gives them."""
        _, data = await self._call("GET", "health", "health")
        if not isinstance(data, dict):
            raise bad_output("runpod health: the answer is not an object")
        return data

    def verify_webhook(self, headers: Mapping[str, str], body: bytes) -> bool:
        # RunPod signs nothing; our webhook URL carries the HMAC the route checks.
        return True

    def parse_webhook(self, body: bytes) -> Outcome:
        """RunPod posts the ``/status`` JSON. Raises ``ProviderRejected`` when malformed."""
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise ProviderRejected("runpod webhook: not JSON", code="invalid_payload") from exc
        try:
            return outcome_from_status(data)
        except ProviderError as exc:
            raise ProviderRejected(exc.message, code="invalid_payload") from exc


def _lost(job_id: str) -> Outcome:
    failure = Failure(True, "provider_job_lost", "RunPod does not know the job (expired or lost)")
    return Outcome(state="failed", failure=failure, provider_job_id=job_id)


def outcome_from_status(data: Any) -> Outcome:
    """A ``/status`` (or webhook) body -> an Outcome. Raises ``ProviderRetryable``
    (``provider_bad_output``) when the body is not a RunPod job.

    Bad image data in a COMPLETED job is an Outcome (failed, retryable), not an
    exception: the body itself was fine, the job's product was not."""
    if not isinstance(data, dict) or not isinstance(data.get("status"), str):
        raise bad_output("runpod: the job status is missing")
    job_id = data.get("id") if isinstance(data.get("id"), str) else None
    status: str = data["status"]
    if status in _QUEUED:
        return Outcome(state=_QUEUED[status], provider_job_id=job_id)  # type: ignore[arg-type]
    if status == "CANCELLED":
        return Outcome(state="cancelled", provider_job_id=job_id)
    if status == "FAILED":
        message = _text(data.get("error")) or "the RunPod job failed"
        if message.startswith(INVALID_INPUT):
            return _failed(job_id, False, "provider_invalid_request", message)
        return _failed(job_id, True, "provider_failed", message)
    if status == "TIMED_OUT":
        return _failed(job_id, True, "provider_timeout", "the RunPod job ran past its timeout")
    if status != "COMPLETED":
        raise bad_output(f"runpod: unknown job status {status[:40]!r}")
    output = data.get("output")
    if isinstance(output, dict) and output.get("error"):
        return _failed(job_id, False, "provider_failed", _text(output["error"]) or "refused")
    if not isinstance(output, dict):
        return _failed(job_id, True, "provider_bad_output", "the RunPod job has no output")
    try:
        image, content_type = decode_image_b64(output.get("image_base64"), what="runpod output")
    except ProviderRetryable as exc:
        return _failed(job_id, True, exc.code, exc.message)
    return Outcome(
        state="completed", image=image, content_type=content_type, provider_job_id=job_id
    )


def _failed(job_id: str | None, retryable: bool, code: str, message: str) -> Outcome:
    return Outcome(
        state="failed", failure=Failure(retryable, code, message[:500]), provider_job_id=job_id
    )


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    return orjson.dumps(value).decode()[:500]
