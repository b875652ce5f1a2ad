"""Feature flag ``image_provider``: which provider a new generation goes to.

One ``ProviderSelector`` per API process. Requests only *evaluate* the flag, in memory,
with the GrowthBook SDK's async client (``GrowthBookClient.eval_feature``: lock-free, no
I/O without sticky buckets or remote eval); features are fetched in the background:

- ``GET {api_host}/api/features/{client_key}`` every ``growthbook_refresh_s`` (sooner,
  with backoff, while it fails), and at once when the stream says features changed;
- with ``growthbook_streaming``, GrowthBook's SSE stream ``GET {api_host}/sub/{client_key}``:
  a ``features`` event carries the whole payload, ``features-updated`` means "fetch again".

Where the value comes from, in order: the last features GrowthBook sent (they hold while
it is unreachable), else ``GENGUI_FLAGS_FILE`` (same ``{"features": ...}`` shape), else
``GENGUI_DEFAULT_PROVIDER``. Once GrowthBook has answered, its features alone decide (a
flag it lacks means the default, not the file's). A value that names no provider falls
back to the default, with one warning per distinct value.
``Choice.rule`` records the source on the row: ``growthbook:<ruleId|default>``,
``flags_file:<ruleId|default>``, ``default``, or ``default:invalid_value``.

Why the SDK's own refresh (``GrowthBookClient.initialize``) is not used, only its
evaluation (growthbook 4.0.0):

- ``initialize()`` gives up for good when the first fetch fails: no refresh is started,
  so a GrowthBook outage during a deploy would pin the process to the fallback.
- Its SSE client runs in a thread with its own event loop and stops for good on an HTTP
  error status (a 503 during an outage); ``features-updated`` re-reads through a TTL
  cache (``cache_ttl``), so a flip could wait a minute.
- Polling is fixed at 60 s whatever the setting, and is off while streaming.
- Each fetch opens a new ``ClientSession`` with no timeout, and the feature repository
  is a process-wide singleton per (host, key) shared by every client in the process.

So transport lives here (one session, timeouts, backoff, stream + polling together,
stale responses refused by ``dateUpdated``) and the SDK gets the payload through
``set_payload``. Encrypted payloads are not supported (no decryption key setting).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterable, AsyncIterator, Coroutine
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from growthbook import FeatureResult, GrowthBookClient, Options, UserContext

from core.auth import Principal
from core.logging import get_logger
from core.settings import PROVIDERS, Settings

log = get_logger("gengui.flags")

FLAG = "image_provider"
DEFAULT_API_HOST = "https://cdn.growthbook.io"
RULE_MAX = 200  # generations.flag_rule is varchar(200)

FETCH_TIMEOUT = aiohttp.ClientTimeout(total=10, connect=5)
# No total: the stream is meant to stay open. A silent socket is dropped after
# sock_read and reopened; polling keeps features fresh meanwhile.
STREAM_TIMEOUT = aiohttp.ClientTimeout(total=None, connect=5, sock_connect=5, sock_read=300)
MAX_EVENT_BYTES = 8 * 1024 * 1024  # one SSE event (a whole features payload), at most
RETRY_BASE_S = 0.5
STREAM_RETRY_CAP_S = 30.0


@dataclass(frozen=True)
class Choice:
    """The provider for one generation and where that answer came from."""

    provider: str
    rule: str


class _Unavailable(Exception):
    """GrowthBook answered, but not with features."""


def _backoff(failures: int, cap_s: float) -> float:
    delay: float = min(cap_s, RETRY_BASE_S * 2 ** max(0, failures - 1))
    return delay * random.uniform(0.8, 1.2)  # replicas must not retry in step


def _date(payload: dict[str, Any]) -> datetime | None:
    value = payload.get("dateUpdated")
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


class _Features:
    """One features payload (GrowthBook's or the file's), evaluated by the SDK."""

    def __init__(self, source: str) -> None:
        self.source = source
        # No client_key: the SDK fetches nothing itself and starts no threads.
        self.client = GrowthBookClient(Options(api_host=None, client_key=None))
        self.loaded = False
        self.has_flag = False
        self.date: datetime | None = None

    async def load(self, payload: dict[str, Any]) -> None:
        """Swap in a new payload; on ``ValueError`` the previous one stays."""
        # Only plain sections; encrypted ones would make the SDK ask for a key.
        plain: dict[str, Any] = {k: payload[k] for k in ("features", "savedGroups") if k in payload}
        try:
            await self.client.set_payload(plain)
        except Exception as exc:  # the SDK's parsing of a malformed feature
            raise ValueError(f"features payload rejected by the SDK: {exc!r}") from exc
        self.has_flag = FLAG in payload["features"]
        self.date = _date(payload)
        self.loaded = True

    async def evaluate(self, attributes: dict[str, Any]) -> FeatureResult[Any]:
        return await self.client.eval_feature(FLAG, UserContext(attributes=attributes))


def _checked_payload(payload: Any) -> dict[str, Any]:
    if not isinstance(payload, dict):
        raise ValueError("features payload is not a JSON object")
    if not isinstance(payload.get("features"), dict):
        if "encryptedFeatures" in payload:
            raise ValueError("encrypted features are not supported")
        raise ValueError("features payload has no `features` object")
    return payload


class ProviderSelector:
    """Picks the provider of a new generation; refreshes features in the background.

    ``choose`` never does I/O and never raises: GrowthBook being slow or down cannot
    slow or fail a request.
    """

    def __init__(self, settings: Settings, *, startup_wait_s: float = 3.0) -> None:
        self._settings = settings
        self._default: str = settings.default_provider
        self._client_key = settings.growthbook_client_key
        host = (settings.growthbook_api_host or DEFAULT_API_HOST).rstrip("/")
        self._features_url = f"{host}/api/features/{self._client_key}"
        self._stream_url = f"{host}/sub/{self._client_key}"
        self._startup_wait_s = startup_wait_s
        self._remote = _Features("growthbook")
        self._file = _Features("flags_file")
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()
        self._wake = asyncio.Event()  # fetch now: the stream said so, or we are stopping
        self._first_attempt = asyncio.Event()
        self._apply_lock = asyncio.Lock()
        self._etag: str | None = None
        self._reachable: bool | None = None
        self._warned: set[tuple[Any, ...]] = set()

    @property
    def source(self) -> str:
        """Where choices come from now: ``growthbook``, ``flags_file`` or ``default``."""
        for features in (self._remote, self._file):
            if features.loaded:
                return features.source
        return "default"

    # ---- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        """Load the flags file, start the refresh loops, wait briefly for first features."""
        await self._load_file()
        if self._client_key is None:
            if self._settings.growthbook_api_host:
                log.warning("flags.growthbook_no_client_key")
            return
        self._session = aiohttp.ClientSession(headers={"User-Agent": "gengui"})
        self._spawn(self._poll_loop(), "flags-poll")
        if self._settings.growthbook_streaming:
            self._spawn(self._stream_loop(), "flags-stream")
        # Bounded: a GrowthBook that hangs delays start-up by this much, then requests
        # use the file or the default until it answers.
        try:
            async with asyncio.timeout(self._startup_wait_s):
                await self._first_attempt.wait()
        except TimeoutError:
            log.warning("flags.growthbook_slow_start", waited_s=self._startup_wait_s)

    async def close(self) -> None:
        self._stopping.set()
        self._wake.set()
        # The loops hold no state worth finishing: cancel at once, then reap them.
        for task in self._tasks:
            task.cancel()
        results = await asyncio.gather(*self._tasks, return_exceptions=True)
        for result in results:
            if isinstance(result, Exception):
                log.error("flags.loop_failed", error=repr(result))
        self._tasks.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None
        await self._remote.client.close()
        await self._file.client.close()

    async def __aenter__(self) -> ProviderSelector:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._reap)

    def _reap(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("flags.loop_died", loop=task.get_name(), error=repr(task.exception()))

    # ---- the hot path ----------------------------------------------------------

    async def choose(self, principal: Principal) -> Choice:
        """Evaluate ``image_provider`` for this user against the cached features."""
        attributes = {
            "id": str(principal.user_id),
            "email": principal.email,
            "plan": principal.plan,
        }
        try:
            for features in (self._remote, self._file):
                if not features.loaded:
                    continue
                if not features.has_flag:
                    self._warn_once("flags.flag_missing", source=features.source)
                    return Choice(self._default, "default")
                result = await features.evaluate(attributes)
                return self._checked(features, result)
        except Exception as exc:  # a bad payload must not fail the request
            self._warn_once("flags.evaluation_failed", error=type(exc).__name__)
            return Choice(self._default, "default:error")
        return Choice(self._default, "default")

    def _checked(self, features: _Features, result: FeatureResult[Any]) -> Choice:
        value = result.value
        if value is None:
            return Choice(self._default, "default")
        if value not in PROVIDERS:
            self._warn_once(
                "flags.invalid_provider",
                source=features.source,
                value=repr(value)[:100],
                rule_id=result.ruleId,
            )
            return Choice(self._default, "default:invalid_value")
        rule = result.ruleId or ("default" if result.source == "defaultValue" else result.source)
        return Choice(str(value), f"{features.source}:{rule}"[:RULE_MAX])

    def _warn_once(self, event: str, **fields: Any) -> None:
        # Once per distinct problem (event and fields), not once per request.
        key = (event, *sorted(fields.items()))
        if key in self._warned:
            return
        self._warned.add(key)
        log.warning(event, flag=FLAG, default=self._default, **fields)

    # ---- features from the file ------------------------------------------------

    async def _load_file(self) -> None:
        path = self._settings.flags_file
        if path is None:
            return
        try:
            payload = _checked_payload(orjson.loads(await asyncio.to_thread(path.read_bytes)))
            await self._file.load(payload)
        except (OSError, ValueError) as exc:
            log.error("flags.file_unusable", path=str(path), error=repr(exc))
            return
        log.info("flags.file_loaded", path=str(path), has_flag=self._file.has_flag)

    # ---- features from GrowthBook ----------------------------------------------

    async def _apply(self, payload: Any, via: str) -> None:
        payload = _checked_payload(payload)
        async with self._apply_lock:
            new, current = _date(payload), self._remote.date
            # A poll answered before a newer push arrived must not undo the push.
            if new is not None and current is not None and new < current:
                log.debug("flags.stale_payload_ignored", via=via)
                return
            changed = not self._remote.loaded or new != current
            await self._remote.load(payload)
        if changed:
            log.info("flags.features_updated", via=via, date_updated=payload.get("dateUpdated"))

    def _set_reachable(self, ok: bool, error: BaseException | None = None) -> None:
        # Log transitions only: an outage is one line, not one per retry.
        if ok and self._reachable is False:
            log.info("flags.growthbook_recovered")
        elif not ok and self._reachable is not False:
            log.warning(
                "flags.growthbook_unreachable",
                error=repr(error),
                holding=self.source,
            )
        self._reachable = ok

    async def _fetch(self) -> bool:
        assert self._session is not None
        headers = {"If-None-Match": self._etag} if self._etag and self._remote.loaded else {}
        try:
            async with self._session.get(
                self._features_url, headers=headers, timeout=FETCH_TIMEOUT
            ) as resp:
                if resp.status == 304:
                    self._set_reachable(True)
                    return True
                if resp.status != 200:
                    raise _Unavailable(f"GET features: HTTP {resp.status}")
                payload = orjson.loads(await resp.read())
                etag = resp.headers.get("ETag")
            await self._apply(payload, "poll")
        except (aiohttp.ClientError, TimeoutError, _Unavailable, ValueError) as exc:
            self._set_reachable(False, exc)
            return False
        self._etag = etag
        self._set_reachable(True)
        return True

    async def _poll_loop(self) -> None:
        failures = 0
        interval_s = self._settings.growthbook_refresh_s
        while not self._stopping.is_set():
            self._wake.clear()
            ok = await self._fetch()
            self._first_attempt.set()
            failures = 0 if ok else failures + 1
            # While failing, retry sooner than the interval (never later).
            delay = interval_s if ok else min(interval_s, _backoff(failures, interval_s))
            await _wait(self._wake, delay)

    async def _stream_loop(self) -> None:
        assert self._session is not None
        failures = 0
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
        while not self._stopping.is_set():
            try:
                async with self._session.get(
                    self._stream_url, headers=headers, timeout=STREAM_TIMEOUT
                ) as resp:
                    if resp.status != 200:
                        raise _Unavailable(f"GET sub: HTTP {resp.status}")
                    log.info("flags.stream_connected")
                    # Whatever changed while we were not listening: fetch it now.
                    self._wake.set()
                    async for event, data in sse_events(resp.content.iter_any()):
                        failures = 0
                        await self._on_event(event, data)
                log.info("flags.stream_closed")
            except (aiohttp.ClientError, TimeoutError, _Unavailable, ValueError) as exc:
                log.info("flags.stream_failed", error=repr(exc))
            failures += 1
            await _wait(self._stopping, _backoff(failures, STREAM_RETRY_CAP_S))

    async def _on_event(self, event: str, data: str) -> None:
        if event == "features":
            try:
                await self._apply(orjson.loads(data), "stream")
            except ValueError as exc:
                log.warning("flags.bad_stream_payload", error=repr(exc))
        elif event == "features-updated":
            self._wake.set()


async def _wait(event: asyncio.Event, timeout_s: float) -> None:
    """The event, or the timeout, whichever first."""
    try:
        async with asyncio.timeout(timeout_s):
            await event.wait()
    except TimeoutError:
        pass


async def sse_events(chunks: AsyncIterable[bytes]) -> AsyncIterator[tuple[str, str]]:
    """``(event, data)`` per server-sent event (W3C EventSource rules, no ids or retry).

    Takes raw chunks (``resp.content.iter_any()``), not lines: a features payload is one
    ``data:`` line that can exceed aiohttp's ``readline`` limit.
    """
    buffer = b""
    event = ""
    data: list[str] = []
    async for chunk in chunks:
        buffer += chunk
        if len(buffer) > MAX_EVENT_BYTES:
            raise ValueError("server-sent event too large")
        *lines, buffer = buffer.split(b"\n")
        for raw in lines:
            line = raw.rstrip(b"\r").decode("utf-8", errors="replace")
            if not line:
                if data or event:
                    yield event or "message", "\n".join(data)
                event, data = "", []
                continue
            if line.startswith(":"):
                continue  # comment / keep-alive
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "event":
                event = value
            elif name == "data":
                data.append(value)


selector_key = web.AppKey("provider_selector", ProviderSelector)
