"""A local GrowthBook over real HTTP: the SDK features endpoint and its SSE stream.

- ``GET /api/features/{client_key}`` answers like GrowthBook's CDN / proxy:
  ``{"status": 200, "features": {...}, "savedGroups": {}, "dateUpdated": "..."}`` with an
  ``ETag`` (``If-None-Match`` gets a 304) and ``x-sse-support: enabled``.
- ``GET /sub/{client_key}`` is the proxy's SSE stream: on each ``set_features`` every
  open stream gets ``event: features`` with the whole payload, or a bare
  ``event: features-updated`` ("fetch again"), as the proxy does.

``set_unavailable(503)`` makes both routes answer 503 and ends open streams;
``set_unavailable("drop")`` closes connections without an answer. ``requests`` counts
what was asked, per route.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, Literal

import orjson
from aiohttp import web

Unavailable = Literal[503, 502, 500, "drop"] | None
Push = Literal["features", "features-updated"] | None

CLIENT_KEY = "sdk-gengui-test"


def provider_flag(default: Any, *rules: dict[str, Any]) -> dict[str, Any]:
    """A features map with just ``image_provider`` (any default, to test bad ones)."""
    return {"image_provider": {"defaultValue": default, "rules": list(rules)}}


class FakeGrowthBook:
    def __init__(
        self, features: dict[str, Any] | None = None, *, client_key: str = CLIENT_KEY
    ) -> None:
        self.client_key = client_key
        self.requests: Counter[str] = Counter()
        self._features: dict[str, Any] = features or {}
        self._version = 1
        self._date = datetime.now(UTC)
        self._unavailable: Unavailable = None
        self._streams: set[asyncio.Queue[bytes | None]] = set()
        self._runner: web.AppRunner | None = None
        self.url = ""

    # ---- control ---------------------------------------------------------------

    def set_features(self, features: dict[str, Any], *, push: Push = "features") -> None:
        """Publish new features; tell open streams the way the proxy would (or not)."""
        self._features = features
        self._version += 1
        # dateUpdated strictly increases, even within one millisecond.
        self._date = max(datetime.now(UTC), self._date + timedelta(milliseconds=1))
        if push == "features":
            self._broadcast(b"event: features\ndata: " + orjson.dumps(self.payload()) + b"\n\n")
        elif push == "features-updated":
            self._broadcast(b"event: features-updated\n\n")

    def set_unavailable(self, how: Unavailable = 503) -> None:
        """``None`` serves again. Otherwise open streams end and new requests fail."""
        self._unavailable = how
        if how is not None:
            for queue in self._streams:
                queue.put_nowait(None)

    @property
    def subscribers(self) -> int:
        return len(self._streams)

    def payload(self) -> dict[str, Any]:
        return {
            "status": 200,
            "features": self._features,
            "savedGroups": {},
            "dateUpdated": self._date.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        }

    def _broadcast(self, message: bytes) -> None:
        for queue in self._streams:
            queue.put_nowait(message)

    # ---- server ----------------------------------------------------------------

    async def start(self) -> str:
        app = web.Application()
        app.router.add_get("/api/features/{client_key}", self._get_features)
        app.router.add_get("/sub/{client_key}", self._subscribe)
        # Open streams are ended by close() itself; nothing to wait for.
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        return self.url

    async def close(self) -> None:
        for queue in self._streams:
            queue.put_nowait(None)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeGrowthBook:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _refuse(self, request: web.Request) -> web.Response | None:
        """The answer while unavailable (None: serve normally)."""
        if self._unavailable is None:
            return None
        if self._unavailable == "drop":
            if request.transport is not None:
                request.transport.abort()
            return web.Response(status=503)  # never reaches the client
        return web.json_response(
            {"status": self._unavailable, "error": "unavailable"}, status=self._unavailable
        )

    def _key_error(self, request: web.Request) -> web.Response | None:
        if request.match_info["client_key"] == self.client_key:
            return None
        return web.json_response({"status": 400, "error": "Invalid API Key"}, status=400)

    async def _get_features(self, request: web.Request) -> web.Response:
        self.requests["features"] += 1
        refused = self._refuse(request) or self._key_error(request)
        if refused is not None:
            return refused
        etag = f'"v{self._version}"'
        headers = {"ETag": etag, "x-sse-support": "enabled", "Cache-Control": "no-cache"}
        if request.headers.get("If-None-Match") == etag:
            return web.Response(status=304, headers=headers)
        return web.Response(
            body=orjson.dumps(self.payload()), content_type="application/json", headers=headers
        )

    async def _subscribe(self, request: web.Request) -> web.StreamResponse:
        self.requests["sub"] += 1
        refused = self._refuse(request) or self._key_error(request)
        if refused is not None:
            return refused
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await resp.prepare(request)
        queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._streams.add(queue)
        try:
            await resp.write(b": connected\n\n")
            while (message := await queue.get()) is not None:
                await resp.write(message)
        except ConnectionResetError:
            pass  # the client went away
        finally:
            self._streams.discard(queue)
        if self._unavailable == "drop" and request.transport is not None:
            request.transport.abort()
        return resp
