"""Log correlation: an incoming ``X-Request-ID`` is honoured and returned (a new one is
made otherwise), every API log line of the request carries it, and the consumers'
handler lines carry the generation id and attempt."""

from __future__ import annotations

import re
from typing import Any

import structlog
from structlog.testing import capture_logs

from core.api.events import hub_key
from core.runtime import Runtime
from tests.conftest import UserAuth, running, wait_for_status

BODY = {"prompt": "a teapot in the rain"}


def _lines(logs: list[dict[str, Any]], event: str) -> list[dict[str, Any]]:
    return [line for line in logs if line["event"] == event]


async def test_an_incoming_request_id_is_honoured_returned_and_logged(
    client, alice: UserAuth
) -> None:
    # The events hub logs its own connection from a background task: not a request line.
    await client.app[hub_key].connected.wait()
    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        resp = await client.post(
            "/api/v1/generations", json=BODY, headers={**alice.headers, "X-Request-ID": "abc-123"}
        )
    assert resp.status == 202
    assert resp.headers["X-Request-ID"] == "abc-123"
    assert _lines(logs, "generation.created") and _lines(logs, "api.request")
    for line in logs:
        assert line.get("request_id") == "abc-123", line


async def test_a_request_without_an_id_gets_a_new_one_also_on_errors(client) -> None:
    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        first = await client.get("/api/v1/generations")  # 401
        second = await client.get("/api/v1/generations")
    assert first.status == 401
    ids = [first.headers["X-Request-ID"], second.headers["X-Request-ID"]]
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    assert ids[0] != ids[1]
    assert [line["request_id"] for line in _lines(logs, "api.request")] == ids


async def test_a_response_the_handler_prepares_itself_carries_the_id(rt: Runtime) -> None:
    # Event streams are prepared inside the handler, before the middleware could add a
    # header; on_response_prepare still does.
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    from core.api.app import create_app

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: hi\n\n")
        return response

    app = create_app(rt.settings, rt)
    app.router.add_get("/test-stream", stream)
    async with TestClient(TestServer(app)) as c:
        resp = await c.get("/test-stream", headers={"X-Request-ID": "sse-1"})
        assert resp.status == 200
        assert resp.headers["X-Request-ID"] == "sse-1"
        assert await resp.text() == "data: hi\n\n"


async def test_consumer_handler_lines_carry_generation_id_and_attempt(
    client, alice: UserAuth, rt: Runtime
) -> None:
    from consumers.runner import consumer_loops
    from providers.local.engines import load_engine
    from providers.local.worker import worker_loops

    resp = await client.post("/api/v1/generations", json=BODY, headers=alice.headers)
    gid = (await resp.json())["id"]
    loops = {**consumer_loops(rt), **worker_loops(rt, load_engine("placeholder"))}
    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        async with running(loops):
            await wait_for_status(client, alice, gid, {"completed"}, timeout_s=20)
    for event in ("worker.job_done", "generation.completed"):
        lines = _lines(logs, event)
        assert lines, f"no {event} line"
        for line in lines:
            assert (line.get("generation_id"), line.get("attempt")) == (gid, 1), line
    # Lines from different messages never share a binding: each handler runs in its
    # own task, so its contextvars do not leak into the loop or the next message.
    for line in logs:
        if line.get("generation_id") not in (None, gid):
            raise AssertionError(f"foreign generation id in {line}")
