"""HTTP plumbing shared by every route: JSON in and out, errors, request ids, auth."""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import orjson
import structlog
from aiohttp import web
from pydantic import BaseModel, ValidationError

from core.auth import Principal, authenticate
from core.errors import GenguiError, InvalidInput, NotFound, Unauthorized
from core.logging import get_logger
from core.runtime import Runtime

log = get_logger("gengui.api")

runtime_key = web.AppKey("runtime", Runtime)
principal_key = web.RequestKey("principal", Principal)

B = TypeVar("B", bound=BaseModel)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_response(
    data: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(data), status=status, content_type="application/json", headers=headers
    )


def error_response(exc: GenguiError) -> web.Response:
    return json_response(exc.to_json(), status=exc.status)


async def parse_body(request: web.Request, model: type[B]) -> B:
    if request.content_type != "application/json":
        raise InvalidInput(
            "send a JSON body with Content-Type: application/json", code="unsupported_media_type"
        )
    raw = await request.read()
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput("the body is not valid JSON", code="invalid_json") from exc
    if not isinstance(data, dict):
        raise InvalidInput("the body must be a JSON object", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        details = [
            {"field": ".".join(str(p) for p in e["loc"]), "message": e["msg"], "type": e["type"]}
            for e in exc.errors(include_url=False, include_input=False)
        ]
        raise InvalidInput("the request body is not valid", details=details) from exc


_HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
}


@web.middleware
async def request_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request id, one access log line, and every error in the documented JSON shape."""
    request_id = request.headers.get("X-Request-ID", "")[:128] or uuid.uuid4().hex
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(request_id=request_id)
    started = time.perf_counter()
    try:
        response = await handler(request)
    except GenguiError as exc:
        response = error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _HTTP_CODES.get(exc.status, "http_error")
        response = json_response(
            {"error": {"code": code, "message": exc.reason, "details": None}}, status=exc.status
        )
    except Exception:
        log.exception("api.unhandled_error", path=request.path)
        response = error_response(GenguiError("internal error"))
    if not response.prepared:
        response.headers["X-Request-ID"] = request_id
    log.info(
        "api.request",
        method=request.method,
        path=request.path,
        status=response.status,
        duration_ms=round((time.perf_counter() - started) * 1000, 2),
    )
    return response


async def require_user(request: web.Request) -> Principal:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized()
    principal = await authenticate(request.app[runtime_key].pool, token.strip())
    if principal is None:
        raise Unauthorized("the bearer token is not valid", code="invalid_token")
    structlog.contextvars.bind_contextvars(user_id=str(principal.user_id))
    return principal


def parse_uuid(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        # Not a valid id is the same answer as "not yours": nothing to learn.
        raise NotFound() from None
