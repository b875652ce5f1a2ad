"""The aiohttp application: routes, middleware, and the runtime it owns."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta

from aiohttp import web
from pydantic import BaseModel

from core.api.auth import setup_accounts
from core.api.docs import setup_docs
from core.api.events import setup_events
from core.api.generations import Announcer, announcer_key, creator_key
from core.api.generations import routes as generation_routes
from core.api.http import add_request_id_header, json_response, request_middleware, runtime_key
from core.api.metrics import setup_metrics
from core.api.openapi import Returns, doc
from core.api.webapp import setup_webapp
from core.api.webhooks import providers_key, webhook_secret_key
from core.api.webhooks import routes as webhook_routes
from core.flags import ProviderSelector, selector_key
from core.generations import Creator
from core.metrics import API_CREATE_BATCH
from core.runtime import Runtime, open_runtime
from core.settings import Settings
from providers.registry import QueueProvider, check_after

health_routes = web.RouteTableDef()


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    status: str
    checks: dict[str, str]


@health_routes.get("/healthz")
@doc("Liveness: the process answers", responses={200: Health}, tags=["operations"], auth=False)
async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


@health_routes.get("/readyz")
@doc(
    "Readiness: Postgres and Redis answer",
    responses={200: Readiness, 503: Returns(Readiness, "A dependency does not answer.")},
    tags=["operations"],
    auth=False,
)
async def readyz(request: web.Request) -> web.Response:
    rt = request.app[runtime_key]
    checks: dict[str, str] = {}
    try:
        async with asyncio.timeout(2):
            await rt.pool.fetchval("SELECT 1")
        checks["postgres"] = "ok"
    except Exception as exc:
        checks["postgres"] = f"error: {type(exc).__name__}"
    try:
        async with asyncio.timeout(2):
            await rt.redis.ping()
        checks["redis"] = "ok"
    except Exception as exc:
        checks["redis"] = f"error: {type(exc).__name__}"
    ok = all(v == "ok" for v in checks.values())
    return json_response(
        {"status": "ok" if ok else "unavailable", "checks": checks}, status=200 if ok else 503
    )


def create_app(settings: Settings, runtime: Runtime | None = None) -> web.Application:
    """Build the app. With ``runtime`` given (tests, ``gengui dev``) the caller owns it."""
    app = web.Application(middlewares=[request_middleware], client_max_size=64 * 1024)
    app.add_routes(health_routes)
    app.add_routes(generation_routes)
    app.add_routes(webhook_routes)
    setup_docs(app)
    setup_webapp(app)
    setup_metrics(app)
    # Also on responses a handler prepares itself (files, streams), after the middleware.
    app.on_response_prepare.append(add_request_id_header)

    async def runtime_ctx(app: web.Application) -> AsyncIterator[None]:
        if runtime is not None:
            app[runtime_key] = runtime
            yield
            return
        async with open_runtime(settings) as rt:
            app[runtime_key] = rt
            yield

    app.cleanup_ctx.append(runtime_ctx)

    async def providers_ctx(app: web.Application) -> AsyncIterator[None]:
        # Webhooks parse and verify with the providers' own code; cancels are queued.
        from core.webhooks import webhook_secret
        from providers.registry import open_providers

        rt = app[runtime_key]
        app[webhook_secret_key] = webhook_secret(rt.settings)
        async with open_providers(rt.settings, rt.publisher) as providers:
            app[providers_key] = providers
            yield

    app.cleanup_ctx.append(providers_ctx)

    async def announcer_ctx(app: web.Application) -> AsyncIterator[None]:
        rt = app[runtime_key]
        s = rt.settings
        # Queue providers' jobs go out from here (Settings.api_dispatch).
        queues = (
            {
                name: p
                for name, p in app[providers_key].dispatch.items()
                if isinstance(p, QueueProvider)
            }
            if s.api_dispatch
            else {}
        )
        announcer = Announcer(rt.publisher, s.keys.requested, queues)
        app[announcer_key] = announcer
        creator = Creator(
            rt.pool,
            dispatch_grace=timedelta(seconds=s.dispatch_grace_s),
            deadline=timedelta(seconds=s.generation_deadline_s),
            concurrency=s.api_create_concurrency,
            direct={name: check_after(s, name) for name in queues},
            on_created=announcer.announce,
            observe=API_CREATE_BATCH.observe,
        )
        app[creator_key] = creator
        yield
        await creator.aclose()
        await announcer.aclose()

    app.cleanup_ctx.append(announcer_ctx)
    setup_accounts(app, settings)  # needs the runtime: after runtime_ctx

    async def flags_ctx(app: web.Application) -> AsyncIterator[None]:
        # One selector per process: features refresh in the background, requests
        # only evaluate the cached ones.
        async with ProviderSelector(app[runtime_key].settings) as selector:
            app[selector_key] = selector
            yield

    app.cleanup_ctx.append(flags_ctx)
    # Real-time streams: the hub needs the runtime, so it is registered after it.
    setup_events(app)
    return app
