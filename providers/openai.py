"""OpenAI image generation (``POST /v1/images/generations``), called by the hosted runner.

Our width/height become the nearest size the model accepts (closest aspect ratio,
then closest area). GPT image models always answer with ``b64_json``; DALL-E models
answer with a URL unless asked for ``response_format: b64_json``, which we do, so
the bytes come back in the answer and are stored by us.

Errors are ``{"error": {"code", "message", "type"}}``. A moderation refusal
(``moderation_blocked``, ``content_policy_violation``) is permanent
``content_rejected``; an exhausted quota (``insufficient_quota``, a 429) is
permanent too, since no retry within a generation's deadline will fix it; other 429s
are retryable ``rate_limited``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Final

import aiohttp

from core.errors import ProviderError, ProviderRejected
from providers.base import Job, Outcome, Submission
from providers.http import (
    bad_output,
    bearer,
    content_rejected,
    decode_image_b64,
    error_message,
    request_json,
)

Size = tuple[int, int]

_GPT_IMAGE_SIZES: Final[tuple[Size, ...]] = ((1024, 1024), (1536, 1024), (1024, 1536))
_DALLE3_SIZES: Final[tuple[Size, ...]] = ((1024, 1024), (1792, 1024), (1024, 1792))
_DALLE2_SIZES: Final[tuple[Size, ...]] = ((256, 256), (512, 512), (1024, 1024))
_REFUSALS: Final = frozenset({"moderation_blocked", "content_policy_violation"})


def model_sizes(model: str) -> tuple[Size, ...]:
    if model.startswith("dall-e-2"):
        return _DALLE2_SIZES
    if model.startswith("dall-e"):
        return _DALLE3_SIZES
    return _GPT_IMAGE_SIZES


def nearest_size(width: int, height: int, sizes: tuple[Size, ...]) -> str:
    """``"WxH"``: the size with the closest aspect ratio, then the closest area."""
    want_ratio, want_area = math.log(width / height), math.log(width * height)

    def distance(size: Size) -> tuple[float, float]:
        w, h = size
        return (round(abs(math.log(w / h) - want_ratio), 6), abs(math.log(w * h) - want_area))

    w, h = min(sizes, key=distance)
    return f"{w}x{h}"


class OpenAIProvider:
    """One OpenAI image model. Implements ``SyncProvider``."""

    name = "openai"

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        api_key: str,
        model: str,
        timeout_s: float,
    ) -> None:
        self.session = session
        self.url = f"{base_url.rstrip('/')}/v1/images/generations"
        self.model = model
        self._headers = bearer(api_key)
        self.timeout_s = timeout_s
        self.sizes = model_sizes(model)

    async def submit(self, job: Job, *, webhook_url: str | None = None) -> Submission:
        raise TypeError("sync providers are run by the hosted runner")

    async def cancel(self, job: Job) -> None:
        # The call is the job: nothing runs at OpenAI once our request is gone.
        return None

    def _body(self, job: Job) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "prompt": job.prompt,
            "n": 1,
            "size": nearest_size(job.width, job.height, self.sizes),
        }
        if self.model.startswith("dall-e"):
            body["response_format"] = "b64_json"
        return body

    async def generate(self, job: Job) -> Outcome:
        """One call; a completed Outcome with the image bytes, or a ProviderError."""
        resp = await request_json(
            self.session,
            "POST",
            self.url,
            what="openai images",
            headers=self._headers,
            timeout_s=self.timeout_s,
            json=self._body(job),
            describe=_describe,
        )
        data = resp.data.get("data") if isinstance(resp.data, dict) else None
        first = data[0] if isinstance(data, list) and data else None
        if not isinstance(first, dict) or not first.get("b64_json"):
            raise bad_output("openai images: no b64_json in the answer")
        raw, content_type = decode_image_b64(first["b64_json"], what="openai images")
        return Outcome(state="completed", image=raw, content_type=content_type)


def _describe(status: int, payload: Any, headers: Mapping[str, str]) -> ProviderError | None:
    err = payload.get("error") if isinstance(payload, dict) else None
    code = err.get("code") if isinstance(err, dict) else None
    message = error_message(payload, "no detail")
    if code in _REFUSALS:
        return content_rejected(f"openai: {message}")
    if code == "insufficient_quota":
        return ProviderRejected(f"openai: {message}", code="provider_quota_exhausted")
    return None
