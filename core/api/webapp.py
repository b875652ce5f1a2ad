"""The built-in web client: plain HTML, CSS and JavaScript in ``core/static/app``, no
build step and no CDN, so ``make dev`` shows the whole product in a browser.

- ``GET /``: the app's page;
- ``GET /verify-email`` and ``GET /reset-password``: the same page, where the mailed
  links land (``{app_url}/verify-email#token=...``); the script reads the token from
  the fragment, which never reaches a server log;
- ``GET /app/{name}``: its script and style, from a fixed list.

The page talks to the API with the session cookie and ``X-CSRF-Token``. Its policy
allows this origin only (``default-src 'self'``): no inline script, no other host, so
an injected string cannot run or send anything elsewhere. These routes are
``@internal``: the page is not part of the API.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from core.api.http import runtime_key
from core.api.openapi import internal

routes = web.RouteTableDef()

STATIC = Path(__file__).resolve().parent.parent / "static" / "app"
_ASSETS = {"app.js": "text/javascript", "app.css": "text/css"}

_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
        "frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",  # the verify link's token must not leak onwards
    "Cache-Control": "no-cache",
}


def setup_webapp(app: web.Application) -> None:
    app.add_routes(routes)


def _page(request: web.Request) -> web.Response:
    # The CSRF cookie's name is a setting (``[A-Za-z0-9_-]``: safe in an attribute).
    cookie = request.app[runtime_key].settings.csrf_cookie
    html = (STATIC / "index.html").read_text().replace("{{csrf_cookie}}", cookie)
    return web.Response(text=html, content_type="text/html", headers=_HEADERS)


@routes.get("/")
@internal
async def index(request: web.Request) -> web.Response:
    return _page(request)


@routes.get("/verify-email")
@internal
async def verify_email_page(request: web.Request) -> web.Response:
    return _page(request)


@routes.get("/reset-password")
@internal
async def reset_password_page(request: web.Request) -> web.Response:
    return _page(request)


@routes.get("/app/{name}")
@internal
async def asset(request: web.Request) -> web.Response:
    content_type = _ASSETS.get(request.match_info["name"])
    if content_type is None:  # a fixed list: no path ever reaches the filesystem
        raise web.HTTPNotFound()
    return web.Response(
        body=(STATIC / request.match_info["name"]).read_bytes(),
        content_type=content_type,
        headers=_HEADERS,
    )
