"""Replicate predictions over its HTTP API (``https://api.replicate.com/v1``).

``submit`` creates a prediction with our webhook URL and ``webhook_events_filter:
["completed"]``: one call when the prediction ends (Replicate retries it), signed in
the Standard Webhooks format that ``verify_webhook`` checks. ``poll`` is
``GET /v1/predictions/{id}``. Output is a URL (or a list of them); the result
fetchers download it through ``providers.download`` (host allowlist, size cap).

``model`` is ``owner/name`` (an official model: ``POST /v1/models/{owner}/{name}/
predictions``) or ``owner/name:version`` (``POST /v1/predictions`` with ``version``).

Statuses -> outcomes::

    starting -> queued          processing -> processing     succeeded -> completed
    canceled -> cancelled       aborted -> failed (retryable, provider_timeout)
    failed -> failed: content refusals (NSFW, safety) are permanent content_rejected;
              anything else is retryable provider_failed (model crashes, interrupted
              workers; the attempt budget bounds a model that always fails)

The input is the common subset of text-to-image models (``prompt``, ``seed``,
``width``/``height`` and ``aspect_ratio``, ``output_format``); Cog ignores inputs a
model does not declare.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import time
from collections.abc import Mapping
from typing import Any, Final

import aiohttp
import orjson

from core.errors import ProviderError, ProviderRejected, ProviderRetryable
from core.logging import get_logger
from providers.base import Failure, Job, Outcome, Submission
from providers.http import JsonApi, bad_output, bearer, nearest_aspect

log = get_logger(__name__)

# Standard Webhooks: a delivery older or newer than this is refused (replays).
WEBHOOK_TOLERANCE_S: Final = 5 * 60

_ASPECTS: Final = ("1:1", "16:9", "21:9", "3:2", "2:3", "4:5", "5:4", "3:4", "4:3", "9:16", "9:21")
_REFUSAL: Final = re.compile(r"nsfw|safety|sensitive|content polic|flagged", re.IGNORECASE)
_STATES: Final[Mapping[str, Any]] = {"starting": "queued", "processing": "processing"}


class ReplicateProvider(JsonApi):
    """One Replicate model. Implements ``PollingProvider``."""

    name = "replicate"

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        api_token: str,
        model: str,
        webhook_secret: str | None,
        timeout_s: float,
    ) -> None:
        self.session = session
        self._label = "replicate"
        self._base_url = f"{base_url.rstrip('/')}/v1"
        self._headers = bearer(api_token)
        self.model = model
        self._webhook_key = _signing_key(webhook_secret) if webhook_secret else None
        self.timeout_s = timeout_s
        name, _, version = model.partition(":")
        if name.count("/") != 1 or not all(name.split("/")):
            raise ValueError(f"replicate model must be owner/name[:version], not {model!r}")
        self._create_path = "predictions" if version else f"models/{name}/predictions"
        self._version = version or None

    def _input(self, job: Job) -> dict[str, Any]:
        data: dict[str, Any] = {
            "prompt": job.prompt,
            "seed": job.seed,
            "width": job.width,
            "height": job.height,
            "aspect_ratio": nearest_aspect(job.width, job.height, _ASPECTS),
            "num_outputs": 1,
            "output_format": "png",
        }
        if job.negative_prompt:
            data["negative_prompt"] = job.negative_prompt
        return data

    async def submit(self, job: Job, *, webhook_url: str | None = None) -> Submission:
        body: dict[str, Any] = {"input": self._input(job)}
        if self._version:
            body["version"] = self._version
        if webhook_url:
            body["webhook"] = webhook_url
            body["webhook_events_filter"] = ["completed"]
        _, data = await self._call("POST", self._create_path, "create", json=body)
        prediction_id = data.get("id") if isinstance(data, dict) else None
        if not isinstance(prediction_id, str) or not prediction_id:
            raise bad_output("replicate create: the answer has no prediction id")
        return Submission(provider_job_id=prediction_id)

    async def poll(self, job: Job) -> Outcome:
        if not job.provider_job_id:
            raise ProviderRetryable(
                "replicate: the job has no prediction id", code="provider_job_lost"
            )
        status, data = await self._call(
            "GET", f"predictions/{job.provider_job_id}", "get", accept=frozenset({404})
        )
        if status == 404:
            failure = Failure(True, "provider_job_lost", "Replicate does not know the prediction")
            return Outcome(state="failed", failure=failure, provider_job_id=job.provider_job_id)
        return outcome_from_prediction(data)

    async def cancel(self, job: Job) -> None:
        """``POST /v1/predictions/{id}/cancel``; unknown or finished is not an error."""
        if not job.provider_job_id:
            return
        await self._call(
            "POST",
            f"predictions/{job.provider_job_id}/cancel",
            "cancel",
            accept=frozenset({404, 409}),
        )

    def verify_webhook(self, headers: Mapping[str, str], body: bytes) -> bool:
        """Replicate's Standard Webhooks signature. Without a configured secret the
        URL's own HMAC (checked by the route) is the only proof, and this says True."""
        if self._webhook_key is None:
            return True
        return verify_standard_webhook(self._webhook_key, headers, body)

    def parse_webhook(self, body: bytes) -> Outcome:
        """The webhook body is the prediction object. Raises ``ProviderRejected``."""
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise ProviderRejected("replicate webhook: not JSON", code="invalid_payload") from exc
        try:
            return outcome_from_prediction(data)
        except ProviderError as exc:
            raise ProviderRejected(exc.message, code="invalid_payload") from exc


def outcome_from_prediction(data: Any) -> Outcome:
    """A prediction object -> an Outcome. Raises ``ProviderRetryable``
    (``provider_bad_output``) when it is not one."""
    if not isinstance(data, dict) or not isinstance(data.get("status"), str):
        raise bad_output("replicate: the prediction has no status")
    pid = data.get("id") if isinstance(data.get("id"), str) else None
    status: str = data["status"]
    if status in _STATES:
        return Outcome(state=_STATES[status], provider_job_id=pid)
    if status == "canceled":
        return Outcome(state="cancelled", provider_job_id=pid)
    if status == "aborted":
        failure = Failure(True, "provider_timeout", "the prediction passed its deadline unstarted")
        return Outcome(state="failed", failure=failure, provider_job_id=pid)
    if status == "failed":
        error = data.get("error")
        message = (error if isinstance(error, str) and error else "the prediction failed")[:500]
        if _REFUSAL.search(message):
            return Outcome(
                state="failed",
                failure=Failure(False, "content_rejected", message),
                provider_job_id=pid,
            )
        return Outcome(
            state="failed", failure=Failure(True, "provider_failed", message), provider_job_id=pid
        )
    if status != "succeeded":
        raise bad_output(f"replicate: unknown prediction status {status[:40]!r}")
    output = data.get("output")
    url = output[0] if isinstance(output, list) and output else output
    if not isinstance(url, str) or not url.startswith(("https://", "http://")):
        failure = Failure(True, "provider_bad_output", "the prediction has no output URL")
        return Outcome(state="failed", failure=failure, provider_job_id=pid)
    return Outcome(state="completed", image_url=url, provider_job_id=pid)


def _signing_key(secret: str) -> bytes:
    """``whsec_<base64>`` -> the HMAC key (the base64-decoded part)."""
    try:
        return base64.b64decode(secret.removeprefix("whsec_"), validate=True)
    except (binascii.Error, ValueError) as exc:
        # A config error: fail at start-up, not on the first webhook.
        raise ValueError("the Replicate webhook secret is not whsec_<base64>") from exc


def verify_standard_webhook(
    key: bytes,
    headers: Mapping[str, str],
    body: bytes,
    *,
    now: float | None = None,
    tolerance_s: float = WEBHOOK_TOLERANCE_S,
) -> bool:
    """Standard Webhooks: HMAC-SHA256 over ``"{webhook-id}.{webhook-timestamp}.{body}"``
    under ``key``; ``webhook-signature`` is space-separated ``v1,<base64>`` entries, any
    one of which may match (key rotation). A timestamp further than ``tolerance_s``
    from now is refused, so a captured delivery cannot be replayed later."""
    lower = {k.lower(): v for k, v in headers.items()}
    msg_id = lower.get("webhook-id")
    timestamp = lower.get("webhook-timestamp")
    signatures = lower.get("webhook-signature")
    if not msg_id or not timestamp or not signatures:
        return False
    try:
        sent_at = int(timestamp)
    except ValueError:
        return False
    if abs((time.time() if now is None else now) - sent_at) > tolerance_s:
        log.info("webhook.signature_stale", skew_s=int((now or time.time()) - sent_at))
        return False
    signed = f"{msg_id}.{timestamp}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest())
    for entry in signatures.split():
        version, _, signature = entry.partition(",")
        if version == "v1" and hmac.compare_digest(signature.encode(), expected):
            return True
    return False
