"""The API's own documentation, served by gengui itself (no CDN):

- ``GET /api/openapi.json``: OpenAPI 3.1, built from the routes' ``@doc`` declarations;
- ``GET /docs``: a small page that renders it (``core/static/docs``);
- ``GET /docs/asyncapi.json`` and ``GET /docs/events``: the same for the streams.

Both documents are built once per app, on first request: the routes do not change
after start-up, and the build walks every model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from core.api.http import json_response, runtime_key
from core.api.openapi import Body, build_openapi, doc, internal
from core.asyncapi import build_asyncapi

routes = web.RouteTableDef()

STATIC = Path(__file__).resolve().parent.parent / "static" / "docs"
_ASSETS = {"docs.js": "text/javascript", "docs.css": "text/css"}


@dataclass
class _Documents:
    openapi: dict[str, Any] | None = None
    asyncapi: dict[str, Any] | None = None


documents_key = web.AppKey("documents", _Documents)


def setup_docs(app: web.Application) -> None:
    """Add the docs routes; the documents are built on first request."""
    app[documents_key] = _Documents()
    app.add_routes(routes)


# The pages load only their own script and style, and the documents from this origin.
_PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}

JSON_DOCUMENT = Body("application/json", {"type": "object"})
HTML = Body("text/html")


def openapi_document(app: web.Application) -> dict[str, Any]:
    cache = app[documents_key]
    if cache.openapi is None:
        cache.openapi = build_openapi(app)
    return cache.openapi


@routes.get("/api/openapi.json")
@doc(
    "This API's OpenAPI 3.1 document",
    responses={200: JSON_DOCUMENT},
    tags=["docs"],
    auth=False,
)
async def openapi_json(request: web.Request) -> web.Response:
    return json_response(openapi_document(request.app))


@routes.get("/docs/asyncapi.json")
@doc(
    "The AsyncAPI 3.0 document of the streams and the user channel",
    responses={200: JSON_DOCUMENT},
    tags=["docs"],
    auth=False,
)
async def asyncapi_json(request: web.Request) -> web.Response:
    cache = request.app[documents_key]
    if cache.asyncapi is None:
        cache.asyncapi = build_asyncapi(request.app[runtime_key].settings.keys)
    return json_response(cache.asyncapi)


def _page(title: str, spec_url: str, kind: str) -> web.Response:
    html = (STATIC / "index.html").read_text()
    html = html.replace("{{title}}", title).replace("{{spec}}", spec_url).replace("{{kind}}", kind)
    return web.Response(text=html, content_type="text/html", headers=_PAGE_HEADERS)


@routes.get("/docs")
@doc("API reference (HTML)", responses={200: HTML}, tags=["docs"], auth=False)
async def docs_page(request: web.Request) -> web.Response:
    return _page("gengui API", "/api/openapi.json", "openapi")


@routes.get("/docs/events")
@doc("Events reference (HTML)", responses={200: HTML}, tags=["docs"], auth=False)
async def events_page(request: web.Request) -> web.Response:
    return _page("gengui events", "/docs/asyncapi.json", "asyncapi")


@routes.get("/docs/assets/{name}")
@internal
async def docs_asset(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    content_type = _ASSETS.get(name)
    if content_type is None:  # a fixed list: no path ever reaches the filesystem
        raise web.HTTPNotFound()
    return web.Response(
        body=(STATIC / name).read_bytes(),
        content_type=content_type,
        headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"},
    )
