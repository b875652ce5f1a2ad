"""Google's Gemini API image models, called synchronously by the hosted runner.

Two wire shapes, picked by model name:

- Imagen (``imagen-*``): ``POST /v1beta/models/{model}:predict`` with
  ``{"instances": [{"prompt"}], "parameters": {"sampleCount": 1, "aspectRatio"}}``;
  the image is ``predictions[0].bytesBase64Encoded``. Imagen drops images its safety
  filter catches, so an answer without one is a refusal.
- Gemini image models (``gemini-*``): ``POST /v1beta/models/{model}:generateContent``;
  the image is an ``inlineData`` part of the first candidate. A blocked prompt comes
  back as ``promptFeedback.blockReason``, a blocked image as a safety
  ``finishReason`` or a candidate with no image part.

Refusals are ``ProviderRejected(content_rejected)``: the same prompt will be refused
again. The key goes in the ``x-goog-api-key`` header, never in the URL.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import aiohttp

from core.errors import ProviderError
from providers.base import Job, Outcome, Submission
from providers.http import (
    bad_output,
    content_rejected,
    decode_image_b64,
    error_message,
    nearest_aspect,
    request_json,
)

_IMAGEN_ASPECTS: Final = ("1:1", "3:4", "4:3", "9:16", "16:9")
_GEMINI_ASPECTS: Final = ("1:1", "2:3", "3:2", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9", "21:9")
# Finish reasons that mean "stopped early", not "refused".
_CUT_SHORT: Final = frozenset({"MAX_TOKENS", "MALFORMED_FUNCTION_CALL"})
# Google's words for "the safety filter refused this prompt" in a 400.
_REFUSAL_WORDS: Final = ("responsible ai", "safety", "sensitive words", "prohibited")


class GeminiProvider:
    """Imagen or a Gemini image model. Implements ``SyncProvider``."""

    name = "gemini"

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        api_key: str,
        model: str,
        timeout_s: float,
    ) -> None:
        self.session = session
        self.model_url = f"{base_url.rstrip('/')}/v1beta/models/{model}"
        self.model = model
        self._headers = {"x-goog-api-key": api_key}
        self.timeout_s = timeout_s
        self.imagen = model.startswith("imagen")

    async def submit(self, job: Job, *, webhook_url: str | None = None) -> Submission:
        raise TypeError("sync providers are run by the hosted runner")

    async def cancel(self, job: Job) -> None:
        # The call is the job: nothing runs at Google once our request is gone.
        return None

    async def generate(self, job: Job) -> Outcome:
        """One call; a completed Outcome with the image bytes, or a ProviderError."""
        if self.imagen:
            return await self._predict(job)
        return await self._generate_content(job)

    async def _post(self, method: str, body: dict[str, Any]) -> Any:
        resp = await request_json(
            self.session,
            "POST",
            f"{self.model_url}:{method}",
            what=f"gemini {method}",
            headers=self._headers,
            timeout_s=self.timeout_s,
            json=body,
            describe=_describe,
        )
        return resp.data

    async def _predict(self, job: Job) -> Outcome:
        body = {
            "instances": [{"prompt": job.prompt}],
            "parameters": {
                "sampleCount": 1,
                "aspectRatio": nearest_aspect(job.width, job.height, _IMAGEN_ASPECTS),
            },
        }
        raw, content_type = image_from_predict(await self._post("predict", body))
        return Outcome(state="completed", image=raw, content_type=content_type)

    async def _generate_content(self, job: Job) -> Outcome:
        body = {
            "contents": [{"role": "user", "parts": [{"text": job.prompt}]}],
            "generationConfig": {
                "responseModalities": ["TEXT", "IMAGE"],
                "imageConfig": {
                    "aspectRatio": nearest_aspect(job.width, job.height, _GEMINI_ASPECTS)
                },
            },
        }
        raw, content_type = image_from_content(await self._post("generateContent", body))
        return Outcome(state="completed", image=raw, content_type=content_type)


def image_from_predict(data: Any) -> tuple[bytes, str]:
    """Imagen's answer -> (bytes, content type). Raises ``content_rejected`` when the
    safety filter took the image (Imagen then leaves it out, or says why)."""
    predictions = data.get("predictions") if isinstance(data, dict) else None
    if not isinstance(predictions, list):
        predictions = []
    for p in predictions:
        if isinstance(p, dict) and p.get("bytesBase64Encoded"):
            return decode_image_b64(p["bytesBase64Encoded"], what="gemini predict")
    reasons = [
        p["raiFilteredReason"]
        for p in predictions
        if isinstance(p, dict) and isinstance(p.get("raiFilteredReason"), str)
    ]
    raise content_rejected(
        "gemini: the image was filtered" + (f": {reasons[0][:200]}" if reasons else "")
    )


def image_from_content(data: Any) -> tuple[bytes, str]:
    """A ``generateContent`` answer -> (bytes, content type) of its first image part.

    A blocked prompt, a safety finish, or an answer in words only (the model
    declining) is ``content_rejected``; a finish that only means "cut short"
    (``MAX_TOKENS``) is a retryable ``provider_bad_output``."""
    if not isinstance(data, dict):
        raise bad_output("gemini: the answer is not an object")
    feedback = data.get("promptFeedback")
    if isinstance(feedback, dict) and feedback.get("blockReason"):
        raise content_rejected(f"gemini: prompt blocked ({str(feedback['blockReason'])[:40]})")
    candidates = data.get("candidates")
    candidate = candidates[0] if isinstance(candidates, list) and candidates else None
    if not isinstance(candidate, dict):
        raise content_rejected("gemini: no candidate in the answer")
    content = candidate.get("content")
    parts = content.get("parts") if isinstance(content, dict) else None
    for part in parts if isinstance(parts, list) else ():
        if not isinstance(part, dict):
            continue
        inline = part.get("inlineData") or part.get("inline_data")
        if isinstance(inline, dict) and inline.get("data"):
            return decode_image_b64(inline["data"], what="gemini generateContent")
    reason = str(candidate.get("finishReason") or "STOP")[:40]
    if reason in _CUT_SHORT:
        raise bad_output(f"gemini: no image ({reason})")
    raise content_rejected(f"gemini: no image ({reason})")


def _describe(status: int, payload: Any, headers: Mapping[str, str]) -> ProviderError | None:
    """Google's error body: ``{"error": {"code", "message", "status"}}``."""
    message = error_message(payload, "no detail")
    if status == 400 and any(word in message.lower() for word in _REFUSAL_WORDS):
        return content_rejected(f"gemini: {message}")
    return None
