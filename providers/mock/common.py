"""Keys and helpers every mock route module shares."""

from __future__ import annotations

import base64
from typing import Any

import orjson
from aiohttp import web

from providers.mock.state import MockState

STATE = web.AppKey("mock_state", MockState)
ENTRY = web.RequestKey("mock_entry", dict)  # this request's line in /_mock/requests


def state_of(request: web.Request) -> MockState:
    return request.app[STATE]


def note(request: web.Request, **fields: Any) -> None:
    """Add fields to this request's entry in the request log."""
    entry = request.get(ENTRY)
    if entry is not None:
        entry.update(fields)


async def read_json(request: web.Request) -> Any:
    """The JSON body, or None when there is none or it does not parse."""
    raw = await request.read()
    if not raw:
        return None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None


def json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=orjson.dumps(data), status=status, content_type="application/json", headers=headers
    )


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def base_url(request: web.Request) -> str:
    """Where clients reach this server (for output URLs we hand out)."""
    configured = state_of(request).config.public_url
    return (configured or str(request.url.origin())).rstrip("/")
