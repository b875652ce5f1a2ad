"""``/api/v1/events`` (Server-Sent Events) and ``/api/v1/ws`` (WebSocket): the signed-in
user's live events, fed by this process's ``core.realtime.Hub``.

Both say the same things. An event: its id (the replay log's), its type
(``generation.completed``...) and the generation resource. ``ready``: the replay asked
for is out, with the cursor to resume from. ``resync``: events after the client's cursor
are no longer kept, so it should reload its list (then carry on). On shutdown the
streams end (SSE) or close with 1001 (WebSocket); the client reconnects with its last
id, to this or another process, and misses nothing the replay log still holds.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import orjson
from aiohttp import WSCloseCode, WSMsgType, web

from core.api.http import require_user, runtime_key, session_key
from core.api.openapi import Body, Error, Param, Returns, doc
from core.errors import Forbidden, InvalidInput
from core.logging import get_logger
from core.notify import StreamId, format_id, parse_id
from core.realtime import Event, Hub, Item, Ready, Signal, Subscription

log = get_logger("gengui.api")
routes = web.RouteTableDef()
hub_key = web.AppKey("events_hub", Hub)

_KEEPALIVE_SSE = b": keepalive\n\n"
_RESYNC_SSE = b'event: resync\ndata: {"type":"resync"}\n\n'
_RESYNC_WS = '{"type":"resync"}'

# WebSocket close codes by why the stream ended: 1001 going away (shutdown), 1013 try
# again later (fell behind, Redis unavailable), 4000 replaced by a newer stream.
_CLOSE_CODES = {
    "shutdown": WSCloseCode.GOING_AWAY,
    "overflow": WSCloseCode.TRY_AGAIN_LATER,
    "unavailable": WSCloseCode.TRY_AGAIN_LATER,
    "replaced": 4000,
}

_ID_SCHEMA = {"type": "string", "pattern": "^[0-9]+-[0-9]+$"}
LAST_EVENT_ID = Param(
    "Last-Event-ID",
    "header",
    _ID_SCHEMA,
    "The last event id received (browsers send it when they reconnect): the events "
    "after it are sent first, once each.",
)
LAST_EVENT_ID_QUERY = Param(
    "last_event_id",
    "query",
    _ID_SCHEMA,
    "The same as `Last-Event-ID`, for clients that cannot set headers.",
)
EVENT_STREAM = Body(
    "text/event-stream",
    {"type": "string"},
    description="Frames: `retry:`; per event `id:` (resume point), `event:` (the type, "
    "e.g. `generation.completed`) and `data:` (JSON `{type, generation}`, generation "
    "as in `GET /api/v1/generations/{id}`); an `id:`-only frame once the replay is out; "
    "`event: resync` when missed events are no longer kept (reload the list); "
    "`: keepalive` comments.",
)


# ---- rendering ------------------------------------------------------------------------


def _sse(item: Item) -> bytes:
    if isinstance(item, Event):
        if item.sse is None:  # once per event, whatever the number of its clients
            data = orjson.dumps({"type": item.type, "generation": item.generation})
            head = f"id: {item.id}\n" if item.id is not None else ""
            item.sse = f"{head}event: {item.type}\ndata: ".encode() + data + b"\n\n"
        return item.sse
    if isinstance(item, Ready):
        return f"id: {format_id(item.cursor)}\n\n".encode()
    return _RESYNC_SSE if item is Signal.RESYNC else _KEEPALIVE_SSE


def _ws(item: Item) -> str | None:
    if isinstance(item, Event):
        if item.ws is None:
            message = {"id": item.id, "type": item.type, "generation": item.generation}
            item.ws = orjson.dumps(message).decode()
        return item.ws
    if isinstance(item, Ready):
        return orjson.dumps({"type": "ready", "last_event_id": format_id(item.cursor)}).decode()
    return _RESYNC_WS if item is Signal.RESYNC else None  # pings keep WebSockets alive


def _cursor(raw: str | None) -> StreamId | None:
    if raw is None or raw == "":
        return None
    cursor = parse_id(raw)
    if cursor is None:
        raise InvalidInput(
            "Last-Event-ID must be an event id such as 1700000000000-0",
            code="invalid_last_event_id",
        )
    return cursor


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


def _check_origin(request: web.Request) -> None:
    """A browser sends the session cookie on a WebSocket handshake from any page, and no
    CORS rule stops another site reading the socket (cross-site WebSocket hijacking):
    with a cookie, the page must be ours. Browsers always send ``Origin``; a client
    without one is no browser, and could have sent any cookie it holds anyway."""
    origin = request.headers.get("Origin")
    if origin is None:
        return
    settings = request.app[runtime_key].settings
    if origin.lower() not in {_origin(settings.web_url), _origin(settings.base_url)}:
        raise Forbidden(
            "a WebSocket signed in by cookie must come from the web client's own origin",
            code="origin_not_allowed",
        )


def _abort_for(request: web.Request, sub: Subscription) -> None:
    transport = request.transport
    if transport is not None:
        sub.abort = transport.abort


# ---- routes ---------------------------------------------------------------------------


@routes.get("/api/v1/events")
@doc(
    "Your live events (Server-Sent Events)",
    params=[LAST_EVENT_ID, LAST_EVENT_ID_QUERY],
    responses={200: EVENT_STREAM, 400: None},
    tags=["events"],
    fuzz=False,  # a stream that never ends
)
async def event_stream(request: web.Request) -> web.StreamResponse:
    """Every change to your generations as it happens. Reconnect with `Last-Event-ID`
    (EventSource does) to get what you missed first, once."""
    principal = await require_user(request)
    header = request.headers.get("Last-Event-ID")
    cursor = _cursor(header if header else request.query.get("last_event_id"))
    settings = request.app[runtime_key].settings
    hub = request.app[hub_key]
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache, no-transform",
            "X-Accel-Buffering": "no",  # nginx: pass each event on at once
        }
    )
    if request.method == "HEAD":  # aiohttp routes HEAD here too: headers, no stream
        await response.prepare(request)
        return response
    sub = hub.open(principal.user_id, cursor)
    try:
        await response.prepare(request)
        await response.write(f"retry: {settings.events_retry_ms}\n\n".encode())
        _abort_for(request, sub)
        await sub.pump(lambda items: response.write(b"".join(map(_sse, items))))
    except ConnectionResetError:
        pass  # the client went away; its reconnect resumes from its last id
    finally:
        hub.release(sub)
    log.info("events.stream_ended", protocol="sse", reason=sub.closed)
    return response


@routes.get("/api/v1/ws")
@doc(
    "Your live events (WebSocket)",
    params=[LAST_EVENT_ID_QUERY],
    responses={
        101: Returns(None, "Switching to the WebSocket protocol."),
        400: None,
        403: Returns(Error, "Signed in by cookie from another site's page."),
    },
    tags=["events"],
    fuzz=False,
)
async def event_socket(request: web.Request) -> web.StreamResponse:
    """The same events as JSON messages `{id, type, generation}`, then `{type: "ready",
    last_event_id}` once the replay is out. Send `{"type": "resume", "last_event_id":
    ...}` to be sent everything after that id again."""
    principal = await require_user(request)
    if request.get(session_key) is not None:
        _check_origin(request)
    cursor = _cursor(request.query.get("last_event_id"))
    settings = request.app[runtime_key].settings
    hub = request.app[hub_key]
    # Small messages, no compression: frames are written whole, so the resume answers
    # and the pump never interleave; aiohttp pings every keepalive and drops a silent peer.
    ws = web.WebSocketResponse(
        heartbeat=settings.events_keepalive_s, compress=False, max_msg_size=4096, timeout=5
    )
    if not ws.can_prepare(request).ok:
        raise InvalidInput("this URL speaks WebSocket only", code="websocket_required")
    await ws.prepare(request)
    sub = hub.open(principal.user_id, cursor)
    _abort_for(request, sub)
    pump = asyncio.create_task(_pump_socket(ws, sub))
    try:
        async for message in ws:
            if message.type == WSMsgType.TEXT:
                await _command(hub, sub, ws, message.data)
    finally:
        hub.release(sub)
        await pump
    log.info("events.stream_ended", protocol="ws", reason=sub.closed)
    return ws


async def _pump_socket(ws: web.WebSocketResponse, sub: Subscription) -> None:
    async def send(items: list[Item]) -> None:
        for item in items:
            text = _ws(item)
            if text is not None:
                await ws.send_str(text)

    with contextlib.suppress(ConnectionResetError):
        await sub.pump(send)
    if not ws.closed:
        code = _CLOSE_CODES.get(sub.closed or "", WSCloseCode.OK)
        with contextlib.suppress(ConnectionResetError):
            await ws.close(code=code, message=(sub.closed or "").encode())


async def _command(hub: Hub, sub: Subscription, ws: web.WebSocketResponse, text: str) -> None:
    try:
        message = orjson.loads(text)
        if not isinstance(message, dict) or message.get("type") != "resume":
            raise ValueError("unknown message")
        raw = message.get("last_event_id")
        cursor = _cursor(raw) if isinstance(raw, str) else None
    except (ValueError, InvalidInput):
        await ws.send_str(
            orjson.dumps(
                {
                    "type": "error",
                    "error": {
                        "code": "invalid_message",
                        "message": 'send {"type": "resume", "last_event_id": "<id>"}',
                    },
                }
            ).decode()
        )
        return
    hub.resume(sub, cursor)


# ---- wiring ---------------------------------------------------------------------------


async def _hub_ctx(app: web.Application) -> AsyncIterator[None]:
    rt = app[runtime_key]
    s = rt.settings
    assert s.redis_url
    hub = Hub(
        s.redis_url,
        rt.redis,
        s.keys,
        keepalive_s=s.events_keepalive_s,
        client_buffer=s.events_client_buffer,
        max_streams_per_user=s.events_max_streams_per_user,
    )
    await hub.start()
    app[hub_key] = hub
    yield
    await hub.stop()


async def _close_streams(app: web.Application) -> None:
    # on_shutdown runs before aiohttp waits for handlers: streams end now, not at the
    # shutdown timeout.
    hub = app.get(hub_key)
    if hub is not None:
        hub.close_clients("shutdown")


def setup_events(app: web.Application) -> None:
    """Routes, the hub (after the runtime in ``cleanup_ctx``), and ending streams on
    shutdown. Call after the runtime context is registered."""
    app.add_routes(routes)
    app.cleanup_ctx.append(_hub_ctx)
    app.on_shutdown.append(_close_streams)
