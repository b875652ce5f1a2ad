"""HTTP plumbing shared by every route: JSON in and out, errors, request ids, auth."""

from __future__ import annotations

import hmac
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import orjson
import structlog
from aiohttp import web
from pydantic import BaseModel, ValidationError

from core import metrics
from core.accounts import Accounts, csrf_token
from core.auth import Principal, authenticate
from core.errors import (
    Forbidden,
    GenguiError,
    InvalidInput,
    NotFound,
    TooManyRequests,
    Unauthorized,
)
from core.logging import get_logger
from core.runtime import Runtime

log = get_logger("gengui.api")

runtime_key = web.AppKey("runtime", Runtime)
accounts_key = web.AppKey("accounts", Accounts)
principal_key = web.RequestKey("principal", Principal)
# Set when the session cookie authenticated the request (not a bearer token).
session_key = web.RequestKey("session_id", uuid.UUID)
CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
request_id_key = web.RequestKey("request_id", str)

B = TypeVar("B", bound=BaseModel)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_response(
    data: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(data), status=status, content_type="application/json", headers=headers
    )


def error_response(exc: GenguiError) -> web.Response:
    headers = {"Retry-After": str(exc.retry_after_s)} if isinstance(exc, TooManyRequests) else None
    return json_response(exc.to_json(), status=exc.status, headers=headers)


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
    request_id = request.headers.get("X-Request-ID", "")[:128] or secrets.token_hex(16)
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(request_id=request_id)
    request[request_id_key] = request_id
    started = time.perf_counter()
    try:
        response = await handler(request)
    except GenguiError as exc:
        response = error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            _observe(request, exc.status, started)  # redirects are raised, not returned
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
    _observe(request, response.status, started)
    return response


def _observe(request: web.Request, status: int, started: float) -> None:
    """Latency by route template: ``/api/v1/generations/{id}``, never the raw path, so
    ids and junk URLs cannot mint series. Streams a handler writes itself count their
    whole lifetime."""
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    metrics.observe_request(route, request.method, status, time.perf_counter() - started)


async def add_request_id_header(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: every response carries ``X-Request-ID``, also those a
    handler prepares itself (files, event streams) before the middleware sees them."""
    request_id = request.get(request_id_key)
    if request_id:
        response.headers["X-Request-ID"] = request_id


async def require_user(request: web.Request) -> Principal:
    """The signed-in user, from ``Authorization: Bearer <API token>`` or, without that
    header, the session cookie. A cookie is sent by the browser on its own, so an
    unsafe method authenticated by it must also carry ``X-CSRF-Token`` (see
    ``core.accounts.csrf_token``); a bearer token is never sent implicitly and needs
    none. Every authenticated request takes one from the user's per-minute budget."""
    cached = request.get(principal_key)
    if cached is not None:  # a handler that asks twice is counted once
        return cached
    accounts = request.app.get(accounts_key)
    header = request.headers.get("Authorization")
    if header is not None or accounts is None:
        scheme, _, token = (header or "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized()
        rt = request.app[runtime_key]
        principal = await authenticate(rt.pool, token.strip(), cache_s=rt.settings.auth_cache_s)
        if principal is None:
            raise Unauthorized("the bearer token is not valid", code="invalid_token")
    else:
        principal = await _session_user(request, accounts)
    structlog.contextvars.bind_contextvars(user_id=str(principal.user_id))
    if accounts is not None:
        per_minute = request.app[runtime_key].settings.requests_per_minute
        await accounts.limiter.check_user(principal.user_id, per_minute)
    request[principal_key] = principal
    return principal


async def _session_user(request: web.Request, accounts: Accounts) -> Principal:
    settings = request.app[runtime_key].settings
    token = request.cookies.get(settings.session_cookie)
    if not token:
        raise Unauthorized("sign in, or send Authorization: Bearer <API token>")
    found = await accounts.authenticate_session(token)
    if found is None:
        raise Unauthorized("the session has ended: sign in again", code="invalid_session")
    principal, session_id = found
    if request.method not in SAFE_METHODS:
        sent = request.headers.get(CSRF_HEADER, "")
        if not hmac.compare_digest(sent.encode(), csrf_token(token).encode()):
            raise Forbidden(
                f"a signed-in browser request must send the {CSRF_HEADER} header "
                f"(the value of the {settings.csrf_cookie} cookie)",
                code="csrf_failed",
            )
    request[session_key] = session_id
    return principal


def client_ip(request: web.Request) -> str:
    """The client's address, for per-IP limits. Behind ``proxy_hops`` reverse proxies
    it is the entry that many from the right of X-Forwarded-For: each proxy appends
    the address it saw, so entries further left are whatever the client sent."""
    hops = request.app[runtime_key].settings.proxy_hops
    if hops:
        forwarded = ",".join(request.headers.getall("X-Forwarded-For", []))
        entries = [e.strip() for e in forwarded.split(",") if e.strip()]
        if len(entries) >= hops:
            return entries[-hops][:64]
    return request.remote or "unknown"


def parse_uuid(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        # Not a valid id is the same answer as "not yours": nothing to learn.
        raise NotFound() from None
