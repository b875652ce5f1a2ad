"""Real-time events over SSE and WebSocket: ownership, order, replay on reconnect, several
API processes, the whole pipeline, slow clients, a dropped pub/sub connection, shutdown.

Every test waits for the stream's ``ready`` frame (the id-only frame SSE sends once the
replay is out, ``{"type": "ready"}`` over WebSocket) before publishing: from then on the
stream is live, so nothing it should get can be published unseen."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from core.api.app import create_app
from core.api.events import hub_key
from core.api.http import accounts_key
from core.events import UserEvent
from core.notify import REPLAY_MAXLEN, REPLAY_TTL_S, Replay
from core.runtime import Runtime
from tests.conftest import HeldEngine, Servers, UserAuth

WAIT_S = 10


# ---- helpers ----------------------------------------------------------------------------


class SSE:
    """Frames of one Server-Sent Events response, parsed as a browser would."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response

    async def frame(self) -> dict[str, str] | None:
        """The next frame's fields (a comment is ``{"comment": ...}``); None at the end."""
        fields: dict[str, str] = {}
        async with asyncio.timeout(WAIT_S):
            while True:
                raw = await self.response.content.readline()
                if not raw:
                    return None
                line = raw.decode().rstrip("\n")
                if not line:
                    if fields:
                        return fields
                    continue
                if line.startswith(":"):
                    fields["comment"] = line[1:].strip()
                    continue
                name, _, value = line.partition(":")
                fields[name] = value[1:] if value.startswith(" ") else value

    async def ready(self) -> str:
        """Skip to the id-only frame that ends the replay; returns the cursor."""
        while True:
            frame = await self.frame()
            assert frame is not None, "the stream ended before it was ready"
            if set(frame) == {"id"}:
                return frame["id"]

    async def events(self, n: int) -> list[dict[str, Any]]:
        """The next ``n`` events: ``{"id", "type", "data"}``, skipping other frames."""
        out: list[dict[str, Any]] = []
        while len(out) < n:
            frame = await self.frame()
            assert frame is not None, f"the stream ended after {len(out)} of {n} events"
            if "event" in frame and frame["event"] != "resync":
                data = orjson.loads(frame["data"])
                assert data["type"] == frame["event"]
                out.append({"id": frame.get("id"), "type": frame["event"], "data": data})
        return out


@contextlib.asynccontextmanager
async def sse(
    client: TestClient,
    auth: UserAuth,
    last_event_id: str | None = None,
    *,
    ready: bool = True,
) -> AsyncIterator[SSE]:
    headers = dict(auth.headers)
    if last_event_id is not None:
        headers["Last-Event-ID"] = last_event_id
    resp = await client.get("/api/v1/events", headers=headers)
    assert resp.status == 200, await resp.text()
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    stream = SSE(resp)
    try:
        if ready:
            await stream.ready()
        yield stream
    finally:
        resp.close()


async def ws_until(ws: aiohttp.ClientWebSocketResponse, kind: str) -> list[dict[str, Any]]:
    """Messages up to and including the first of type ``kind``."""
    got: list[dict[str, Any]] = []
    async with asyncio.timeout(WAIT_S):
        while True:
            message = await ws.receive_json()
            got.append(message)
            if message["type"] == kind:
                return got


async def ws_events(ws: aiohttp.ClientWebSocketResponse, n: int) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []
    async with asyncio.timeout(WAIT_S):
        while len(got) < n:
            message = await ws.receive_json()
            if "generation" in message:
                got.append(message)
    return got


async def publish(
    rt: Runtime, auth: UserAuth, n: int, *, tag: str = "g", size: int = 0
) -> list[str]:
    """``n`` events for ``auth``'s user, as the consumers publish them; their ids."""
    ids = []
    for i in range(n):
        generation: dict[str, Any] = {"id": f"{tag}{i}", "n": i}
        if size:
            generation["blob"] = "x" * size
        event = UserEvent(type="generation.progress", generation=generation)
        ids.append(await rt.publisher.notify(auth.user_id, event))
    return ids


def _key(event_id: str) -> tuple[int, int]:
    ms, seq = event_id.split("-")
    return int(ms), int(seq)


# ---- ownership and order ------------------------------------------------------------------


async def test_events_arrive_in_order_over_sse_and_websocket_and_only_to_their_owner(
    client: TestClient,
    rt: Runtime,
    alice: UserAuth,
    bob: UserAuth,
) -> None:
    async with (
        sse(client, alice) as alice_sse,
        sse(client, bob) as bob_sse,
        client.ws_connect("/api/v1/ws", headers=alice.headers) as alice_ws,
    ):
        assert (await ws_until(alice_ws, "ready"))[-1]["last_event_id"]
        ids = await publish(rt, alice, 5, tag="alice")
        bob_ids = await publish(rt, bob, 1, tag="bob")

        got = await alice_sse.events(5)
        assert [e["id"] for e in got] == ids
        assert [e["data"]["generation"]["id"] for e in got] == [f"alice{i}" for i in range(5)]
        assert all(e["type"] == "generation.progress" for e in got)
        assert ids == sorted(ids, key=_key)

        over_ws = await ws_events(alice_ws, 5)
        assert [m["id"] for m in over_ws] == ids
        assert [m["generation"]["id"] for m in over_ws] == [f"alice{i}" for i in range(5)]

        # One pub/sub connection carries both users' events in publish order: had bob's
        # stream been sent alice's, they would come before his own.
        (bobs,) = await bob_sse.events(1)
        assert bobs["id"] == bob_ids[0]
        assert bobs["data"]["generation"]["id"] == "bob0"


async def test_events_need_a_signed_in_user_and_a_valid_last_event_id(
    client: TestClient,
    alice: UserAuth,
) -> None:
    for path in ("/api/v1/events", "/api/v1/ws"):
        resp = await client.get(path)
        assert resp.status == 401
        assert (await resp.json())["error"]["code"] == "unauthorized"
    bad = await client.get(
        "/api/v1/events", headers={**alice.headers, "Last-Event-ID": "yesterday"}
    )
    assert bad.status == 400
    assert (await bad.json())["error"]["code"] == "invalid_last_event_id"
    head = await client.head("/api/v1/events", headers=alice.headers)
    assert head.status == 200 and head.content_type == "text/event-stream"
    assert await head.read() == b""
    plain = await client.get("/api/v1/ws", headers=alice.headers)  # no Upgrade
    assert plain.status == 400
    assert (await plain.json())["error"]["code"] == "websocket_required"


async def test_a_websocket_signed_in_by_cookie_must_come_from_our_own_origin(
    client: TestClient, rt: Runtime, alice: UserAuth
) -> None:
    session = await client.app[accounts_key].create_session(alice.user_id)
    cookie = {"Cookie": f"{rt.settings.session_cookie}={session.token}"}
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await client.ws_connect(
            "/api/v1/ws", headers={**cookie, "Origin": "https://elsewhere.example"}
        )
    assert refused.value.status == 403
    own = {**cookie, "Origin": rt.settings.base_url}
    async with client.ws_connect("/api/v1/ws", headers=own) as ws:
        assert (await ws_until(ws, "ready"))[-1]["last_event_id"]
        ids = await publish(rt, alice, 1)
        assert [m["id"] for m in await ws_events(ws, 1)] == ids
    # A bearer token is never sent by a browser on its own: no origin to check.
    bearer = {**alice.headers, "Origin": "https://elsewhere.example"}
    async with client.ws_connect("/api/v1/ws", headers=bearer) as ws:
        await ws_until(ws, "ready")


# ---- replay ------------------------------------------------------------------------------


async def test_reconnecting_with_last_event_id_gets_each_missed_event_once_then_live_ones(
    client: TestClient,
    rt: Runtime,
    alice: UserAuth,
) -> None:
    async with sse(client, alice) as stream:
        seen = await publish(rt, alice, 2, tag="before")
        got = await stream.events(2)
        assert [e["id"] for e in got] == seen
    missed = await publish(rt, alice, 5, tag="missed")

    async with sse(client, alice, last_event_id=seen[-1], ready=False) as stream:
        replayed = await stream.events(5)
        assert [e["id"] for e in replayed] == missed
        assert await stream.ready() == missed[-1]
        live = await publish(rt, alice, 2, tag="live")
        # Exactly the live ones next: a duplicate of a missed event would come first.
        assert [e["id"] for e in await stream.events(2)] == live

    # The query parameter does the same for clients that cannot set the header.
    resp = await client.get(f"/api/v1/events?last_event_id={missed[1]}", headers=alice.headers)
    try:
        assert [e["id"] for e in await SSE(resp).events(5)] == [*missed[2:], *live]
    finally:
        resp.close()


async def test_joining_while_events_are_published_loses_and_repeats_nothing(
    client: TestClient,
    rt: Runtime,
    alice: UserAuth,
) -> None:
    earlier = await publish(rt, alice, 10, tag="earlier")
    publishing = asyncio.create_task(publish(rt, alice, 60, tag="during"))
    async with sse(client, alice, last_event_id=earlier[4], ready=False) as stream:
        during = await publishing
        got = await stream.events(5 + 60)
    assert [e["id"] for e in got] == [*earlier[5:], *during]


async def test_a_cursor_older_than_the_replay_log_is_told_to_resync(
    client: TestClient,
    rt: Runtime,
    alice: UserAuth,
) -> None:
    first = (await publish(rt, alice, 1, tag="old"))[0]
    async with rt.redis.pipeline(transaction=False) as pipe:
        for _ in range(REPLAY_MAXLEN + 300):  # the cap trims the oldest, `first` among them
            pipe.xadd(
                rt.settings.keys.user_events(alice.user_id),
                {b"__data__": orjson.dumps({"type": "generation.progress", "generation": {}})},
                maxlen=REPLAY_MAXLEN,
                approximate=True,
            )
        await pipe.execute()
    resp = await client.get("/api/v1/events", headers={**alice.headers, "Last-Event-ID": first})
    try:
        stream = SSE(resp)
        frames = [await stream.frame() for _ in range(3)]
        assert frames[0] == {"retry": str(rt.settings.events_retry_ms)}
        assert frames[1] is not None and frames[1]["event"] == "resync"
        assert frames[2] is not None and frames[2]["event"] == "generation.progress"
    finally:
        resp.close()


@pytest.mark.parametrize(
    ("cursor", "first", "trimmed", "now_ms", "lost"),
    [
        ((5_000, 0), (4_000, 0), True, 9_000, False),  # the cursor is inside the log
        ((5_000, 0), (6_000, 0), True, 9_000, True),  # trimmed past it
        ((5_000, 0), (6_000, 0), False, 9_000, False),  # new log, within the TTL
        ((5_000, 0), (5_000 + REPLAY_TTL_S * 1000 + 1, 0), False, 10**9, True),  # expired
        ((5_000, 0), None, False, 5_000 + REPLAY_TTL_S * 1000, False),  # no log, recent
        ((5_000, 0), None, False, 5_001 + REPLAY_TTL_S * 1000, True),  # no log, too old
    ],
)
def test_which_cursors_the_replay_log_can_no_longer_serve(
    cursor: tuple[int, int],
    first: tuple[int, int] | None,
    trimmed: bool,
    now_ms: int,
    lost: bool,
) -> None:
    replay = Replay([], first or (now_ms - 1, 0), first, trimmed, now_ms)
    assert replay.lost_after(cursor) is lost


async def test_websocket_resume_sends_everything_after_the_given_id_again(
    client: TestClient,
    rt: Runtime,
    alice: UserAuth,
) -> None:
    earlier = await publish(rt, alice, 3, tag="earlier")
    async with client.ws_connect(
        f"/api/v1/ws?last_event_id={earlier[0]}", headers=alice.headers
    ) as ws:
        opening = await ws_until(ws, "ready")
        assert [m["id"] for m in opening[:-1]] == earlier[1:]
        assert opening[-1]["last_event_id"] == earlier[-1]

        await ws.send_json({"type": "resume", "last_event_id": earlier[1]})
        again = await ws_until(ws, "ready")
        assert [m["id"] for m in again[:-1]] == earlier[2:]
        live = await publish(rt, alice, 1, tag="live")
        assert [m["id"] for m in await ws_events(ws, 1)] == live

        await ws.send_str("hello")
        (error,) = await ws_until(ws, "error")
        assert error["error"]["code"] == "invalid_message"


# ---- several processes, the pipeline ------------------------------------------------------


async def test_two_api_instances_each_deliver_to_their_own_clients(
    rt: Runtime, alice: UserAuth, bob: UserAuth
) -> None:
    async with (
        TestClient(TestServer(create_app(rt.settings, rt))) as one,
        TestClient(TestServer(create_app(rt.settings, rt))) as two,
    ):
        hub_one, hub_two = one.app[hub_key], two.app[hub_key]
        async with (
            sse(one, alice) as alice_one,
            sse(two, alice) as alice_two,
            sse(two, bob) as bob_two,
        ):
            assert (hub_one.clients, hub_two.clients) == (1, 2)
            assert hub_one.client_id != hub_two.client_id  # a connection each
            ids = await publish(rt, alice, 3, tag="a")
            bob_ids = await publish(rt, bob, 2, tag="b")
            assert [e["id"] for e in await alice_one.events(3)] == ids
            assert [e["id"] for e in await alice_two.events(3)] == ids
            assert [e["id"] for e in await bob_two.events(2)] == bob_ids
        # A client of one process that comes back to the other misses nothing either.
        missed = await publish(rt, alice, 2, tag="missed")
        async with sse(two, alice, last_event_id=ids[-1], ready=False) as back:
            assert [e["id"] for e in await back.events(2)] == missed


async def test_a_generation_streams_its_whole_lifecycle(
    client: TestClient,
    rt: Runtime,
    alice: UserAuth,
    held_pipeline: HeldEngine,
) -> None:
    """A long job (held in the worker until its processing notice arrives)."""
    async with sse(client, alice) as stream:
        created = await client.post(
            "/api/v1/generations", json={"prompt": "a lighthouse"}, headers=alice.headers
        )
        assert created.status == 202
        gid = (await created.json())["id"]
        got: list[dict[str, Any]] = []
        while not got or got[-1]["type"] != "thumbnail.ready":
            got += await stream.events(1)
            if got[-1]["type"] == "generation.processing":
                held_pipeline.release.set()
    assert all(e["data"]["generation"]["id"] == gid for e in got)
    # generation.submitted is the API's own notice, sent once the created row is
    # committed with its job (POST /api/v1/generations); the others come from the
    # consumers.
    types = [e["type"] for e in got if e["type"] != "generation.progress"]
    assert sorted(types) == sorted(
        [
            "generation.submitted",
            "generation.processing",
            "generation.completed",
            "thumbnail.ready",
        ]
    ), types
    assert types.index("generation.completed") < types.index("thumbnail.ready")
    assert [e["id"] for e in got] == sorted((e["id"] for e in got), key=_key)
    last = got[-1]["data"]["generation"]
    assert last["status"] == "completed" and last["thumbnail_url"]


# ---- keepalives, limits, slow clients, Redis drops ------------------------------------------


async def test_idle_streams_get_keepalives_and_a_users_oldest_stream_gives_way(
    rt: Runtime, alice: UserAuth, bob: UserAuth
) -> None:
    settings = rt.settings.model_copy(
        update={"events_keepalive_s": 0.2, "events_max_streams_per_user": 2}
    )
    app = create_app(settings, dataclasses.replace(rt, settings=settings))
    async with (
        TestClient(TestServer(app)) as client,
        sse(client, alice) as first,
        sse(client, alice) as second,
    ):
        assert await first.frame() == {"comment": "keepalive"}
        async with sse(client, alice) as third, sse(client, bob) as bobs:
            # Alice's third stream ended her first; bob's count is his own.
            while (frame := await first.frame()) is not None:
                assert "event" not in frame
            assert app[hub_key].clients == 3  # second, third and bob's
            ids = await publish(rt, alice, 1)
            assert [e["id"] for e in await second.events(1)] == ids
            assert [e["id"] for e in await third.events(1)] == ids
            assert await bobs.frame() == {"comment": "keepalive"}


# ---- slow clients, Redis drops ------------------------------------------------------------


async def test_a_slow_client_is_disconnected_and_the_others_keep_up(
    rt: Runtime, alice: UserAuth
) -> None:
    settings = rt.settings.model_copy(update={"events_client_buffer": 10})
    small = dataclasses.replace(rt, settings=settings)
    async with TestClient(TestServer(create_app(settings, small))) as client:
        hub = client.app[hub_key]
        # A client that never reads, with a tiny receive window: its handler soon blocks
        # on a full socket while events pile up in its queue.
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, (client.server.host, client.server.port))
        # From a cursor, so it is owed every later event however late its stream starts.
        (start,) = await publish(rt, alice, 1, tag="start")
        request = (
            f"GET /api/v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {alice.token}"
            f"\r\nLast-Event-ID: {start}\r\n\r\n"
        )
        await loop.sock_sendall(sock, request.encode())
        try:
            async with sse(client, alice) as fast:
                async with asyncio.timeout(WAIT_S):
                    while hub.clients != 2:
                        await asyncio.sleep(0.01)
                # Five at a time, each read by the fast client before the next: a reader
                # that keeps up is never more than its buffer (10) behind, however fast
                # this process publishes; the slow one falls behind for good.
                ids, got = [], []
                for chunk in range(16):
                    ids += await publish(rt, alice, 5, tag=f"big{chunk}-", size=64 * 1024)
                    got += await fast.events(5)
                assert [e["id"] for e in got] == ids
                async with asyncio.timeout(WAIT_S):
                    while hub.clients != 1:
                        await asyncio.sleep(0.01)
            # The server dropped it: reading what it holds ends in EOF or a reset.
            async with asyncio.timeout(WAIT_S):
                with contextlib.suppress(ConnectionResetError):
                    while await loop.sock_recv(sock, 1 << 20):
                        pass
        finally:
            sock.close()


async def test_a_dropped_pubsub_connection_is_reopened_and_nothing_is_missed(
    client: TestClient,
    rt: Runtime,
    alice: UserAuth,
) -> None:
    hub = client.app[hub_key]
    async with sse(client, alice) as stream:
        before = await publish(rt, alice, 1, tag="before")
        assert [e["id"] for e in await stream.events(1)] == before
        old_id = hub.client_id
        # This hub's connection only (CLIENT KILL TYPE pubsub would cut every pub/sub
        # client on the server, other test runs' included).
        assert await rt.redis.execute_command("CLIENT", "KILL", "ID", old_id) == 1
        during = await publish(rt, alice, 3, tag="during")  # likely while it is down
        assert [e["id"] for e in await stream.events(3)] == during
        async with asyncio.timeout(WAIT_S):
            while not (hub.connected.is_set() and hub.client_id != old_id):
                await asyncio.sleep(0.01)
        after = await publish(rt, alice, 2, tag="after")
        assert [e["id"] for e in await stream.events(2)] == after


# ---- shutdown -----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.timeout(90)
async def test_gengui_api_ends_open_streams_and_exits_promptly_on_sigterm(
    servers: Servers, rt: Runtime, alice: UserAuth, tmp_path: Path
) -> None:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GENGUI_")}
    env.update(
        GENGUI_DATABASE_URL=servers.database_url,
        GENGUI_REDIS_URL=servers.redis_url,
        GENGUI_STREAM_PREFIX=rt.settings.stream_prefix,
        GENGUI_DATA_DIR=str(tmp_path / "data"),
        GENGUI_API_PORT=str(port),
        GENGUI_LOG_LEVEL="WARNING",
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "core.cli",
        "api",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert proc.stdout is not None
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession(base, headers=alice.headers) as http:
            async with asyncio.timeout(30):
                while True:
                    assert proc.returncode is None, await proc.stdout.read()
                    with contextlib.suppress(aiohttp.ClientError):
                        async with http.get("/readyz") as ready:
                            if ready.status == 200:
                                break
                    await asyncio.sleep(0.1)
            resp = await http.get("/api/v1/events")
            stream = SSE(resp)
            await stream.ready()
            async with http.ws_connect("/api/v1/ws") as ws:
                await ws_until(ws, "ready")
                ids = await publish(rt, alice, 1)
                assert [e["id"] for e in await stream.events(1)] == ids
                assert [m["id"] for m in await ws_events(ws, 1)] == ids

                proc.send_signal(signal.SIGTERM)
                # Well inside aiohttp's 10 s shutdown timeout: the streams were ended by
                # the app, not cancelled by the server after waiting for them.
                async with asyncio.timeout(8):
                    closing = await ws.receive()
                    while (frame := await stream.frame()) is not None:
                        assert "event" not in frame, frame
                    code = await proc.wait()
            resp.close()
        assert closing.type == aiohttp.WSMsgType.CLOSE
        assert closing.data == 1001  # going away: reconnect elsewhere
        assert code == 0, await proc.stdout.read()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
