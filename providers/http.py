"""What every HTTP provider adapter shares: one JSON request helper, one mapping from
HTTP statuses and aiohttp errors to ``ProviderRetryable`` / ``ProviderRejected``, and
the check that inline output really is an image.

The mapping (reason codes are what the row's ``error_code`` ends up saying):

    408, timeouts of ours           retryable  provider_timeout
    429                             retryable  rate_limited
    5xx                             retryable  provider_unavailable
    connection errors, cut bodies   retryable  provider_unreachable
    400, 413, 422                   permanent  provider_invalid_request
    401                             permanent  provider_unauthorized
    403                             permanent  provider_forbidden
    404                             permanent  provider_not_found
    other 4xx                       permanent  provider_rejected
    content-policy refusals         permanent  content_rejected
    output that is no image         retryable  provider_bad_output

Output that is no image is retryable because a second run of the same prompt
usually works (a truncated upload, a worker bug on one node); the attempt budget
bounds it. Adapters turn their provider's own error bodies into ``content_rejected``
(or another code) through the ``describe`` hook of ``request_json``.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import aiohttp
import orjson

from core.errors import ProviderError, ProviderRejected, ProviderRetryable
from core.imaging import ImageRejected, sniff_image

# A JSON answer may carry a base64 image (4/3 of a 30 MB image is 40 MB); anything
# bigger than this is not an answer we want to hold in memory.
MAX_RESPONSE_BYTES: Final = 64 * 1024 * 1024

_MESSAGE_CHARS: Final = 300

_STATUS_CODES: Final[Mapping[int, str]] = {
    400: "provider_invalid_request",
    401: "provider_unauthorized",
    403: "provider_forbidden",
    404: "provider_not_found",
    408: "provider_timeout",
    413: "provider_invalid_request",
    422: "provider_invalid_request",
    429: "rate_limited",
}

CONTENT_REJECTED: Final = "content_rejected"
BAD_OUTPUT: Final = "provider_bad_output"


def is_retryable_status(status: int) -> bool:
    """429, 408, 425 and 5xx are worth another try; other 4xx will fail the same way."""
    return status in (408, 425, 429) or status >= 500


def status_code(status: int) -> str:
    """The reason code for an HTTP error status."""
    if status in _STATUS_CODES:
        return _STATUS_CODES[status]
    return "provider_unavailable" if status >= 500 else "provider_rejected"


def error_for_status(
    status: int, message: str, *, code: str | None = None, details: Any = None
) -> ProviderError:
    """The exception for an HTTP error answer; ``code`` overrides the status's code.

    ``content_rejected`` is permanent whatever the status (some APIs refuse a prompt
    with a 400, others with a 200 and an empty answer)."""
    code = code or status_code(status)
    details = {"status": status, **(details or {})}
    if code != CONTENT_REJECTED and is_retryable_status(status):
        return ProviderRetryable(message, code=code, details=details)
    return ProviderRejected(message, code=code, details=details)


def content_rejected(message: str) -> ProviderRejected:
    return ProviderRejected(message, code=CONTENT_REJECTED)


def bad_output(message: str) -> ProviderRetryable:
    return ProviderRetryable(message, code=BAD_OUTPUT)


def error_message(payload: Any, fallback: str) -> str:
    """The human part of a provider's error body, whatever its shape, kept short.

    Shapes seen: ``{"error": {"message": ...}}`` (OpenAI, Google), ``{"error": "..."}``
    (RunPod), ``{"detail": ..., "title": ...}`` (Replicate, RFC 7807)."""
    text: Any = None
    if isinstance(payload, dict):
        err = payload.get("error")
        if isinstance(err, dict):
            text = err.get("message")
        elif isinstance(err, str):
            text = err
        if not text:
            text = payload.get("detail") or payload.get("message") or payload.get("title")
    elif isinstance(payload, str):
        text = payload
    if not isinstance(text, str) or not text.strip():
        text = fallback
    return text.strip()[:_MESSAGE_CHARS]


def retry_after_s(headers: Mapping[str, str]) -> float | None:
    """A ``Retry-After`` in seconds, when the provider gives one as a number."""
    value = headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: rare from APIs, and the backoff covers it


@dataclass(frozen=True)
class JsonResponse:
    status: int
    data: Any
    headers: Mapping[str, str]


# (status, parsed body or text, headers) -> the exception to raise, or None for the
# default mapping. Lets an adapter read its provider's error codes.
Describe = Callable[[int, Any, Mapping[str, str]], ProviderError | None]


async def read_capped(resp: aiohttp.ClientResponse, max_bytes: int) -> bytes:
    """The body, refusing more than ``max_bytes`` (declared or actually sent)."""
    if resp.content_length is not None and resp.content_length > max_bytes:
        raise bad_output(f"the answer is {resp.content_length} bytes, over {max_bytes}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_chunked(256 * 1024):
        size += len(chunk)
        if size > max_bytes:
            raise bad_output(f"the answer is over {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _parse(body: bytes) -> Any:
    if not body:
        return None
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return body[:_MESSAGE_CHARS].decode("utf-8", "replace")


async def request_json(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    *,
    what: str,
    headers: Mapping[str, str],
    timeout_s: float,
    json: Any = None,
    accept: frozenset[int] = frozenset(),
    describe: Describe | None = None,
    max_bytes: int = MAX_RESPONSE_BYTES,
) -> JsonResponse:
    """One HTTP call whose answer is JSON. Raises ``ProviderError`` subclasses only.

    ``what`` names the call in messages (``"runpod run"``); it never includes the URL's
    query or headers, which can carry credentials. A status in ``accept`` is returned
    instead of raised (RunPod's 404 for a lost job is an answer, not an error). A 2xx
    body that is not JSON is ``provider_bad_output``. Redirects are not followed: an
    API that redirects a POST is misconfigured, and following one could hand our
    credentials to another host.
    """
    try:
        async with session.request(
            method,
            url,
            headers=headers,
            json=json,
            timeout=aiohttp.ClientTimeout(total=timeout_s),
            allow_redirects=False,
        ) as resp:
            body = await read_capped(resp, max_bytes)
            status, resp_headers = resp.status, resp.headers
    except ProviderError:
        raise
    except TimeoutError as exc:
        # aiohttp's ServerTimeoutError and ConnectionTimeoutError are TimeoutErrors too.
        raise ProviderRetryable(
            f"{what}: no answer within {timeout_s:g} s", code="provider_timeout"
        ) from exc
    except (aiohttp.ClientError, OSError) as exc:
        raise ProviderRetryable(
            f"{what}: {type(exc).__name__}: {exc}"[:_MESSAGE_CHARS], code="provider_unreachable"
        ) from exc
    payload = _parse(body)
    if 200 <= status < 300 or status in accept:
        if 200 <= status < 300 and body and isinstance(payload, str):
            raise bad_output(f"{what}: the answer is not JSON")
        return JsonResponse(status, payload, resp_headers)
    if describe is not None:
        described = describe(status, payload, resp_headers)
        if described is not None:
            raise described
    raise error_for_status(
        status,
        f"{what}: HTTP {status}: {error_message(payload, 'no detail')}",
        details=_retry_details(resp_headers),
    )


def _retry_details(headers: Mapping[str, str]) -> dict[str, Any] | None:
    after = retry_after_s(headers)
    return {"retry_after_s": after} if after is not None else None


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def decode_image_b64(data: Any, *, what: str) -> tuple[bytes, str]:
    """Base64 image bytes from a provider -> (bytes, content type sniffed from them).

    The declared type is not trusted: the bytes are stored and served as what they
    are. A ``data:`` URL prefix is accepted (some RunPod handlers send one). Raises
    ``ProviderRetryable(provider_bad_output)``."""
    if not isinstance(data, str) or not data:
        raise bad_output(f"{what}: no image data")
    if data.startswith("data:"):
        _, _, data = data.partition(",")
    try:
        raw = base64.b64decode(data, validate=False)
    except (binascii.Error, ValueError) as exc:
        raise bad_output(f"{what}: the image is not valid base64") from exc
    try:
        _, content_type = sniff_image(raw)
    except ImageRejected as exc:
        raise bad_output(f"{what}: {exc}") from exc
    return raw, content_type


def nearest_aspect(width: int, height: int, choices: tuple[str, ...]) -> str:
    """The ``"W:H"`` among ``choices`` closest to ``width/height`` (in log ratio, so
    2:1 and 1:2 are equally far from 1:1)."""
    want = math.log(width / height)

    def distance(choice: str) -> float:
        w, _, h = choice.partition(":")
        return abs(math.log(int(w) / int(h)) - want)

    return min(choices, key=distance)


class JsonApi:
    """What RunPod and Replicate share: calls to one base URL with the provider's auth
    headers and timeout. Subclasses set ``session``, ``_base_url``, ``_label``,
    ``_headers`` and ``timeout_s``."""

    session: aiohttp.ClientSession
    _base_url: str
    _label: str
    _headers: Mapping[str, str]
    timeout_s: float

    async def _call(
        self,
        method: str,
        path: str,
        what: str,
        *,
        json: Any = None,
        accept: frozenset[int] = frozenset(),
    ) -> tuple[int, Any]:
        resp = await request_json(
            self.session,
            method,
            f"{self._base_url}/{path}",
            what=f"{self._label} {what}",
            headers=self._headers,
            timeout_s=self.timeout_s,
            json=json,
            accept=accept,
        )
        return resp.status, resp.data
