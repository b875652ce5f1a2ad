"""``gengui mock-providers``: the app, its control endpoints, and the serve loop.

Control endpoints (under ``/_mock/``, never logged as provider requests)::

    GET  /_mock/health              {"ok": true}
    GET  /_mock/config              the server-wide knobs (no secrets)
    POST /_mock/config              change latency_s, failure_rate, seed (re-seeds),
                                    webhook_retries, webhook_retry_delay_s, hang_s, public_url
    GET  /_mock/jobs[?provider=]    RunPod jobs and Replicate predictions, with their
                                    directives, cancels, retries and webhook deliveries
    GET  /_mock/jobs/{id}           one of them
    GET  /_mock/requests[?provider=]  every provider request received (method, path,
                                    provider, auth ok, JSON body, job id, answer status)
    POST /_mock/reset               forget jobs and requests, re-seed
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from core.logging import get_logger
from providers.mock import hosted, replicate, runpod
from providers.mock.common import ENTRY, STATE, json, read_json, state_of
from providers.mock.config import MockConfig
from providers.mock.state import Handler, MockState

log = get_logger("gengui.mock")

control = web.RouteTableDef()


@web.middleware
async def _record(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Log each provider request for ``/_mock/requests`` (no headers: they hold keys)."""
    if request.path.startswith("/_mock/"):
        return await handler(request)
    entry = state_of(request).record(
        {"at": time.time(), "method": request.method, "path": request.path, "provider": None}
    )
    request[ENTRY] = entry
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        entry["status"] = exc.status
        raise
    entry["status"] = response.status
    return response


@control.get("/_mock/health")
async def _health(request: web.Request) -> web.Response:
    return json({"ok": True})


@control.get("/_mock/config")
async def _get_config(request: web.Request) -> web.Response:
    return json(state_of(request).config.public())


@control.post("/_mock/config")
async def _set_config(request: web.Request) -> web.Response:
    state = state_of(request)
    values = await read_json(request)
    if not isinstance(values, dict):
        return json({"error": "a JSON object of settings is required"}, 400)
    try:
        state.config.update(values)
    except (TypeError, ValueError) as exc:
        return json({"error": str(exc)}, 400)
    if "seed" in values:
        state.reseed(state.config.seed)
    log.info("mock.config_changed", **{k: v for k, v in values.items()})
    return json(state.config.public())


@control.get("/_mock/jobs")
async def _jobs(request: web.Request) -> web.Response:
    provider = request.query.get("provider")
    jobs = [
        j.summary()
        for j in state_of(request).jobs.values()
        if provider is None or j.provider == provider
    ]
    return json({"jobs": jobs})


@control.get("/_mock/jobs/{job_id}")
async def _job(request: web.Request) -> web.Response:
    job = state_of(request).jobs.get(request.match_info["job_id"])
    if job is None:
        return json({"error": "no such job"}, 404)
    return json(job.summary())


@control.get("/_mock/requests")
async def _requests(request: web.Request) -> web.Response:
    provider = request.query.get("provider")
    entries = [
        e for e in state_of(request).requests if provider is None or e.get("provider") == provider
    ]
    return json({"requests": entries})


@control.post("/_mock/reset")
async def _reset(request: web.Request) -> web.Response:
    await state_of(request).reset()
    return json({"ok": True})


def create_mock_app(config: MockConfig | None = None) -> web.Application:
    """The mock as an aiohttp app (tests run it on a real port with ``AppRunner``)."""
    config = config or MockConfig()
    app = web.Application(middlewares=[_record], client_max_size=16 * 1024 * 1024)
    app[STATE] = MockState(config)
    app.add_routes(control)
    app.add_routes(runpod.routes)
    app.add_routes(replicate.routes)
    app.add_routes(hosted.routes)
    app.cleanup_ctx.append(_webhook_session)
    app.on_shutdown.append(_stop)
    return app


async def _webhook_session(app: web.Application) -> AsyncIterator[None]:
    """The client that sends webhooks: owned by the app, closed with it."""
    state = app[STATE]
    async with aiohttp.ClientSession() as session:
        state.session = session
        yield
        await state.close()
        state.session = None


async def _stop(app: web.Application) -> None:
    # Runs before the server waits for in-flight handlers: hung requests and pending
    # jobs let go now instead of holding shutdown for their full hang.
    await app[STATE].close()


async def serve(config: MockConfig, host: str, port: int, stop: asyncio.Event) -> None:
    """Run the mock until ``stop`` is set."""
    runner = web.AppRunner(create_mock_app(config), access_log=None, shutdown_timeout=5)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    log.info(
        "mock.listening",
        url=f"http://{host}:{port}",
        runpod=f"http://{host}:{port}/v2",
        latency_s=config.latency_s,
        failure_rate=config.failure_rate,
    )
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
