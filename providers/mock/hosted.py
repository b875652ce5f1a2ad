"""The synchronous APIs: Gemini (Imagen ``:predict``, Gemini ``:generateContent``) and
OpenAI (``/v1/images/generations``). The request is held for the latency and answered
with the image inline, or with the provider's own error body."""

from __future__ import annotations

import re
import time
import zlib
from typing import Any, Final

from aiohttp import web

from providers.mock.common import b64, json, note, read_json, state_of
from providers.mock.config import Directives
from providers.mock.state import NOT_AN_IMAGE, MockState, bearer_token, check_key, png

routes = web.RouteTableDef()

_ASPECT: Final = re.compile(r"^(\d+):(\d+)$")
_GPT_IMAGE_SIZES: Final = frozenset({"1024x1024", "1536x1024", "1024x1536", "auto"})
_DALLE3_SIZES: Final = frozenset({"1024x1024", "1792x1024", "1024x1792"})
_DALLE2_SIZES: Final = frozenset({"256x256", "512x512", "1024x1024"})


def _image(state: MockState, d: Directives, width: int, height: int, seed: int) -> bytes:
    return NOT_AN_IMAGE if d.badimage else png(width, height, seed, state.config.max_side)


def _obj(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _aspect_size(aspect: Any) -> tuple[int, int]:
    match = _ASPECT.match(str(aspect or "1:1"))
    if not match:
        return 1024, 1024
    w, h = int(match[1]), int(match[2])
    return (1024, 1024 * h // w) if w >= h else (1024 * w // h, 1024)


async def _delay(state: MockState, d: Directives) -> bool:
    """Hold the request for the latency; True when the server is stopping."""
    return await state.pause(state.latency_s(d))


# -- Gemini ---------------------------------------------------------------------------


def _google_error(status: int, state_name: str, message: str) -> web.Response:
    return json({"error": {"code": status, "message": message, "status": state_name}}, status)


@routes.post("/v1beta/models/{target}")
async def gemini(request: web.Request) -> web.Response:
    state = state_of(request)
    model, _, method = request.match_info["target"].rpartition(":")
    note(request, provider="gemini", model=model, method=method)
    key = request.headers.get("x-goog-api-key") or request.query.get("key")
    ok = check_key(state.config, key)
    note(request, auth=ok)
    if not ok:
        return _google_error(403, "PERMISSION_DENIED", "Method doesn't allow unregistered callers")
    if method not in ("predict", "generateContent"):
        return _google_error(404, "NOT_FOUND", f"unknown method {method}")
    body = await read_json(request)
    note(request, body=body)
    prompt = _gemini_prompt(body, method)
    if prompt is None:
        return _google_error(400, "INVALID_ARGUMENT", "Invalid JSON payload received.")
    d = state.directives(prompt)
    note(request, directives=d.active())
    if d.hang or d.timeout or d.stuck:
        return await state.hang()
    if await _delay(state, d):
        return _google_error(503, "UNAVAILABLE", "mock: shutting down")
    if d.ratelimit:
        return _google_error(429, "RESOURCE_EXHAUSTED", "mock: quota exceeded, retry later")
    if d.invalid:
        return _google_error(400, "INVALID_ARGUMENT", "mock: the request is invalid")
    if d.retryable:
        return _google_error(503, "UNAVAILABLE", "mock: the model is overloaded")
    seed = zlib.crc32(prompt.encode())
    assert isinstance(body, dict)  # a prompt was found in it
    if method == "predict":
        params = _obj(body.get("parameters"))
        if d.fail:
            reason = "mock: the image was filtered by the safety filter (support code 39322892)"
            return json({"predictions": [{"raiFilteredReason": reason}]})
        image = _image(state, d, *_aspect_size(params.get("aspectRatio")), seed)
        return json({"predictions": [{"bytesBase64Encoded": b64(image), "mimeType": "image/png"}]})
    if d.fail:
        return json({"promptFeedback": {"blockReason": "SAFETY"}, "modelVersion": model})
    image_config = _obj(_obj(body.get("generationConfig")).get("imageConfig"))
    image = _image(state, d, *_aspect_size(image_config.get("aspectRatio")), seed)
    parts = [
        {"text": "Here is the image."},
        {"inlineData": {"mimeType": "image/png", "data": b64(image)}},
    ]
    return json(
        {
            "candidates": [
                {"content": {"role": "model", "parts": parts}, "finishReason": "STOP", "index": 0}
            ],
            "modelVersion": model,
        }
    )


def _gemini_prompt(body: Any, method: str) -> str | None:
    if not isinstance(body, dict):
        return None
    if method == "predict":
        instances = body.get("instances")
        if isinstance(instances, list) and instances and isinstance(instances[0], dict):
            prompt = instances[0].get("prompt")
            return prompt if isinstance(prompt, str) else None
        return None
    contents = body.get("contents")
    if not isinstance(contents, list):
        return None
    texts = [
        part["text"]
        for content in contents
        if isinstance(content, dict)
        for part in content.get("parts") or []
        if isinstance(part, dict) and isinstance(part.get("text"), str)
    ]
    return " ".join(texts) if texts else None


# -- OpenAI ---------------------------------------------------------------------------


def _openai_error(
    status: int, message: str, type_: str, code: str | None, headers: dict[str, str] | None = None
) -> web.Response:
    return json(
        {"error": {"message": message, "type": type_, "param": None, "code": code}}, status, headers
    )


def _sizes(model: str) -> frozenset[str]:
    if model.startswith("dall-e-2"):
        return _DALLE2_SIZES
    if model.startswith("dall-e"):
        return _DALLE3_SIZES
    return _GPT_IMAGE_SIZES


@routes.post("/v1/images/generations")
async def openai_images(request: web.Request) -> web.Response:
    state = state_of(request)
    note(request, provider="openai")
    ok = check_key(state.config, bearer_token(request))
    note(request, auth=ok)
    if not ok:
        return _openai_error(
            401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key"
        )
    body = await read_json(request)
    note(request, body=body)
    if not isinstance(body, dict) or not isinstance(body.get("prompt"), str):
        return _openai_error(
            400, "'prompt' is required", "invalid_request_error", "missing_required_parameter"
        )
    model = str(body.get("model") or "dall-e-2")
    size = str(body.get("size") or "1024x1024")
    dalle = model.startswith("dall-e")
    if size not in _sizes(model):
        return _openai_error(
            400, f"Invalid size {size!r} for {model}", "invalid_request_error", "invalid_value"
        )
    if "response_format" in body and not dalle:
        return _openai_error(
            400,
            "Unknown parameter: 'response_format'.",
            "invalid_request_error",
            "unknown_parameter",
        )
    d = state.directives(body["prompt"])
    note(request, directives=d.active())
    if d.hang or d.timeout or d.stuck:
        return await state.hang()
    if await _delay(state, d):
        return _openai_error(503, "mock: shutting down", "server_error", None)
    if d.ratelimit:
        return _openai_error(
            429, "mock: rate limit reached", "requests", "rate_limit_exceeded", {"Retry-After": "1"}
        )
    if d.invalid:
        return _openai_error(400, "mock: invalid request", "invalid_request_error", "invalid_value")
    if d.retryable:
        return _openai_error(
            500, "The server had an error processing your request.", "server_error", None
        )
    if d.fail:
        if dalle:
            return _openai_error(
                400,
                "Your request was rejected as a result of our safety system.",
                "invalid_request_error",
                "content_policy_violation",
            )
        return _openai_error(
            400,
            "Your request was rejected by the safety system.",
            "image_generation_user_error",
            "moderation_blocked",
        )
    width, height = (1024, 1024) if size == "auto" else map(int, size.split("x"))
    image = _image(state, d, width, height, zlib.crc32(body["prompt"].encode()))
    fmt = body.get("response_format", "url" if dalle else "b64_json")
    if fmt != "b64_json":
        return _openai_error(
            400, "the mock serves b64_json only", "invalid_request_error", "invalid_value"
        )
    return json({"created": int(time.time()), "data": [{"b64_json": b64(image)}]})
