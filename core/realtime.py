"""Fan-out of user events to this API process's SSE and WebSocket clients.

One ``Hub`` per API process holds ONE dedicated Redis pub/sub connection and SUBSCRIBEs
to the channel of each user that has a client here (reference counted, dropped a while
after the user's last client leaves). Why not one PSUBSCRIBE to every user's channel:
then each API replica would receive, parse and drop every event of every user, so the
cost of each replica would grow with the whole system's event rate rather than with its
own clients'. Redis holds 10,000 channels on one connection without effort.

Each client is a ``Subscription``: a bounded queue the hub fills and the client's handler
drains, writing everything queued in one go. The hub never waits for a client: one
whose queue overflows is closed (a slow reader, a stuck proxy) and, being an SSE or
WebSocket client, reconnects with its last id and catches up from the replay log.

Joining without a gap or a duplicate (``core.notify`` writes each event to the replay log
and publishes it, atomically, with the log's id): the subscription is registered and the
channel subscribed first; live events that arrive while the log is read wait in the
subscription; then the log is read after the client's cursor (``Last-Event-ID``) and the
waiting events are appended, skipping ids already sent. Ids grow per user, so one
comparison dedupes. When the pub/sub connection drops, the hub reconnects with backoff,
subscribes again, and runs the same catch-up for every client from its own cursor, so an
outage delays events but loses none that the replay log still holds; a cursor older
than the log gets ``Signal.RESYNC`` (reload the list).
"""

from __future__ import annotations

import asyncio
import enum
import math
import random
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import orjson
from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.exceptions import RedisError

from core.keys import Keys
from core.logging import get_logger
from core.notify import Replay, StreamId, format_id, parse_id, read_replay
from core.streams import SharedRedis

log = get_logger(__name__)

SUBSCRIBE_CHUNK = 1000  # channels per SUBSCRIBE when (re)subscribing everything
SYNC_CONCURRENCY = 32  # replay reads in flight: a reconnect storm must not starve publishers


class Event:
    """One user event, parsed once and rendered once per protocol for all its clients."""

    __slots__ = ("generation", "id", "key", "sse", "type", "ws")

    def __init__(self, key: StreamId | None, type_: str, generation: dict[str, Any]) -> None:
        self.key = key  # None: published without a log id (a publisher older than the log)
        self.id = format_id(key) if key is not None else None
        self.type = type_
        self.generation = generation
        self.sse: bytes | None = None  # cached renderings (core.api.events)
        self.ws: str | None = None

    @classmethod
    def parse(cls, raw: bytes, key: StreamId | None = None) -> Event:
        """From a channel payload (``key`` inside) or a log entry (``key`` given)."""
        data = orjson.loads(raw)
        if key is None and isinstance(data.get("id"), str):
            key = parse_id(data["id"])
        return cls(key, str(data["type"]), data.get("generation") or {})


@dataclass(frozen=True, slots=True)
class Ready:
    """The replay a client asked for is out; ``cursor`` is where it now stands (its
    ``Last-Event-ID`` from here on, also when no event has come yet)."""

    cursor: StreamId


class Signal(enum.Enum):
    KEEPALIVE = "keepalive"  # nothing happened; keeps proxies and dead-peer checks honest
    RESYNC = "resync"  # events after the client's cursor are gone: reload, then go on


Item = Event | Ready | Signal


class Subscription:
    """One client's place in its user's events: filled by the hub, drained by the handler."""

    def __init__(self, channel: _Channel, cursor: StreamId | None, limit: int) -> None:
        self.user_id = channel.user_id
        self.cursor = cursor  # last id queued for the client (or where it asked to start)
        self.closed: str | None = None  # why it ended: shutdown, overflow, replaced...
        self.abort: Callable[[], None] | None = None  # drops the connection mid-write
        self.keepalive_at = 0.0
        self.active = False  # something was queued since the last keepalive check
        self._channel = channel
        self._limit = limit
        self._out: deque[Item] = deque()
        self._replayed = 0  # items in _out from the log: bounded by the log, not _limit
        self._pending: list[Event] | None = None  # live events held while the log is read
        self._token = 0
        self._announce = False
        self._writing = False
        self._waiter: asyncio.Future[None] | None = None

    # -- hub side ---------------------------------------------------------------------

    def deliver(self, event: Event) -> None:
        if self.closed:
            return
        if self._pending is not None:
            self._pending.append(event)
            if len(self._pending) > self._limit:
                self.close("overflow")
            return
        if event.key is not None:
            if self.cursor is not None and event.key <= self.cursor:
                return  # already sent from the log
            self.cursor = event.key
        self._put(event)

    def keepalive(self) -> None:
        if not self._out:
            self._put(Signal.KEEPALIVE)

    def begin_sync(self, *, announce: bool) -> int:
        """From now on live events wait until ``finish_sync`` with the returned token;
        a later ``begin_sync`` supersedes this one."""
        self._token += 1
        self._pending = []
        self._announce = self._announce or announce
        return self._token

    def finish_sync(self, token: int, replay: Replay, events: list[Event]) -> None:
        if token != self._token or self.closed:
            return  # a newer sync (after a reconnect, a resume) owns the outcome
        pending, self._pending = self._pending or [], None
        announce, self._announce = self._announce, False
        if self.cursor is None:
            self.cursor = replay.tip  # a fresh client starts now
        else:
            if replay.lost_after(self.cursor):
                self._put(Signal.RESYNC, replayed=True)
                announce = True  # a new cursor, even if no event follows
            for event in events:
                if event.key is not None and event.key > self.cursor:
                    self.cursor = event.key
                    self._put(event, replayed=True)
        if announce:
            self._put(Ready(self.cursor))
        for event in pending:
            self.deliver(event)

    def restart(self, cursor: StreamId | None) -> None:
        """The client asks again from ``cursor`` (WebSocket resume): what is queued and
        not yet written is dropped, the sync that follows sends it again."""
        self._out = deque(item for item in self._out if not isinstance(item, Event))
        self._replayed = 0
        self.cursor = cursor

    def close(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = reason
        if reason == "overflow":
            log.info("events.client_overflow", user_id=self.user_id, queued=len(self._out))
        self._out.clear()
        self._pending = None
        self._wake()
        if self._writing and self.abort is not None:
            self.abort()  # stuck writing to a slow peer: never wait on it

    def _put(self, item: Item, *, replayed: bool = False) -> None:
        if self.closed:
            return
        self._out.append(item)
        self.active = True
        # A replay longer than the limit is fine (the log caps it); falling behind live
        # events is not. Counting the replay would close a client that reconnects after
        # a long gap over and over, each time from the same cursor.
        if replayed:
            self._replayed += 1
        elif len(self._out) - self._replayed > self._limit:
            self.close("overflow")
            return
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- handler side -----------------------------------------------------------------

    async def next_batch(self) -> list[Item]:
        """Everything queued, waiting for something; ``[]`` once closed."""
        while not self._out:
            if self.closed:
                return []
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        items = list(self._out)
        self._out.clear()
        self._replayed = 0
        return items

    async def pump(self, write: Callable[[list[Item]], Awaitable[None]]) -> None:
        """Write batches until closed; a write stuck on a slow peer is aborted on close."""
        while batch := await self.next_batch():
            self._writing = True
            try:
                await write(batch)
            finally:
                self._writing = False


@dataclass(eq=False)
class _Channel:
    user_id: str
    name: bytes
    subs: dict[Subscription, None] = field(default_factory=dict)  # ordered: oldest first
    subscribed: asyncio.Event = field(default_factory=asyncio.Event)  # on this connection
    resync: bool = False  # was subscribed when the connection dropped: catch everyone up
    gone: bool = False  # unsubscribed for good; waiting syncs give up
    idle_since: float | None = None


class Hub:
    """This process's pub/sub connection and the clients it feeds (see the module doc)."""

    def __init__(
        self,
        redis_url: str,
        ops: SharedRedis,
        keys: Keys,
        *,
        keepalive_s: float = 15.0,
        client_buffer: int = 1000,
        max_streams_per_user: int = 16,
        idle_unsubscribe_s: float | None = None,
    ) -> None:
        self._pool = ConnectionPool.from_url(
            redis_url, client_name="gengui-events", decode_responses=False
        )
        self._ops = ops
        self._keys = keys
        self._keepalive_s = keepalive_s
        self._client_buffer = client_buffer
        self._max_per_user = max_streams_per_user
        # A reconnecting client usually comes back within seconds: keep its channel.
        self._idle_unsubscribe_s = idle_unsubscribe_s or 2 * keepalive_s
        self._channels: dict[bytes, _Channel] = {}
        self._subs: set[Subscription] = set()
        self._conn: AbstractConnection | None = None
        self._outbox: list[tuple[bytes, ...]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._sync_slots = asyncio.Semaphore(SYNC_CONCURRENCY)
        self._session: asyncio.Task[None] | None = None
        self._main: list[asyncio.Task[None]] = []
        self._ping_sent: float | None = None
        self._last_ping = 0.0
        self._closing = False
        self._stopping = False
        self.client_id: int | None = None  # of the pub/sub connection (CLIENT ID)
        self.connected = asyncio.Event()

    @property
    def clients(self) -> int:
        return len(self._subs)

    # -- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        self._main = [
            asyncio.create_task(self._run(), name="events-hub"),
            asyncio.create_task(self._tick(), name="events-hub-tick"),
        ]

    def close_clients(self, reason: str = "shutdown") -> None:
        """End every client's stream (handlers return at once); no new ones after."""
        self._closing = True
        for sub in list(self._subs):
            sub.close(reason)

    async def stop(self) -> None:
        self.close_clients()
        self._stopping = True
        pending = {*self._main, *self._tasks}
        while pending:
            for task in pending:
                task.cancel()
            # Again until done: redis-py can swallow a cancel that lands mid-connect.
            _, pending = await asyncio.wait(pending, timeout=0.1)
        await self._pool.disconnect()

    # -- clients ----------------------------------------------------------------------

    def open(self, user_id: Any, cursor: StreamId | None) -> Subscription:
        """A new client of ``user_id`` wanting events after ``cursor`` (None: from now)."""
        name = self._keys.user_channel(user_id).encode()
        channel = self._channels.get(name)
        if channel is None:
            channel = self._channels[name] = _Channel(str(user_id), name)
            self._send(b"SUBSCRIBE", name)
        channel.idle_since = None
        sub = Subscription(channel, cursor, self._client_buffer)
        if self._closing:
            sub.close("shutdown")
            return sub
        live = [s for s in channel.subs if not s.closed]
        for old in live[: max(0, len(live) - self._max_per_user + 1)]:
            old.close("replaced")  # the newest tab wins; the old one reconnects if alive
        loop = asyncio.get_running_loop()
        # Spread keepalives: clients that connected together must not all write together.
        sub.keepalive_at = loop.time() + self._keepalive_s * random.uniform(0.5, 1.0)
        channel.subs[sub] = None
        self._subs.add(sub)
        self._start_sync(channel, [sub], announce=True)
        return sub

    def resume(self, sub: Subscription, cursor: StreamId | None) -> None:
        """The client asks for everything after ``cursor`` again (WebSocket resume)."""
        if sub.closed:
            return
        sub.restart(cursor)
        self._start_sync(sub._channel, [sub], announce=True)

    def release(self, sub: Subscription) -> None:
        """The client's handler is done with ``sub``."""
        sub.close("released")
        self._subs.discard(sub)
        channel = sub._channel
        channel.subs.pop(sub, None)
        if not channel.subs:
            channel.idle_since = asyncio.get_running_loop().time()

    def _start_sync(self, channel: _Channel, subs: list[Subscription], *, announce: bool) -> None:
        # begin_sync now, not in the task: live events from here on must wait.
        tokens = [(s, s.begin_sync(announce=announce)) for s in subs if not s.closed]
        if tokens:
            self._spawn(self._sync(channel, tokens))

    async def _sync(self, channel: _Channel, tokens: list[tuple[Subscription, int]]) -> None:
        """Read the log once for these clients of one user and queue what each lacks."""
        await channel.subscribed.wait()  # only then is nothing published unseen
        if channel.gone:
            return
        cursors = [s.cursor for s, _ in tokens if s.cursor is not None]
        try:
            async with self._sync_slots:
                replay = await read_replay(
                    self._ops, self._keys, channel.user_id, min(cursors) if cursors else None
                )
        except (RedisError, OSError) as exc:
            log.warning("events.replay_failed", user_id=channel.user_id, error=str(exc))
            for sub, _ in tokens:
                sub.close("unavailable")  # it reconnects and tries again
            return
        events: list[Event] = []
        for key, raw in replay.entries:
            try:
                events.append(Event.parse(raw, key))
            except (ValueError, KeyError, TypeError):
                log.warning("events.bad_log_entry", user_id=channel.user_id, id=format_id(key))
        for sub, token in tokens:
            sub.finish_sync(token, replay, events)

    # -- the pub/sub connection -------------------------------------------------------

    async def _run(self) -> None:
        backoff_s = 0.1
        while not self._stopping:
            conn = self._pool.make_connection()
            try:
                await conn.connect()
                await conn.send_command("CLIENT", "ID")
                self.client_id = int(await conn.read_response())
                # Whatever was queued for an older connection is moot: subscribe to
                # everything wanted now, before any command queued from here on.
                self._outbox.clear()
                self._conn = conn
                self._ping_sent = None
                self._last_ping = asyncio.get_running_loop().time()
                names = list(self._channels)
                for i in range(0, len(names), SUBSCRIBE_CHUNK):
                    self._send(b"SUBSCRIBE", *names[i : i + SUBSCRIBE_CHUNK])
                log.info("events.hub_connected", channels=len(names), client_id=self.client_id)
                self.connected.set()
                backoff_s = 0.1
                self._session = asyncio.create_task(self._read(conn))
                # wait(), not await: a dead connection is ended by cancelling the session.
                await asyncio.wait({self._session})
                if not self._session.cancelled() and self._session.exception() is not None:
                    raise self._session.exception()  # type: ignore[misc]
            except (RedisError, OSError) as exc:
                log.warning("events.hub_disconnected", error=str(exc))
            except Exception:
                # A bug must not end real-time delivery for the process: start over.
                log.exception("events.hub_failed")
            finally:
                self.connected.clear()
                self._conn = None
                for channel in self._channels.values():
                    channel.resync = channel.resync or channel.subscribed.is_set()
                    channel.subscribed.clear()
                if self._session is not None and not self._session.done():
                    self._session.cancel()
                await conn.disconnect(nowait=True)
            await asyncio.sleep(backoff_s * random.uniform(0.5, 1.0))
            backoff_s = min(backoff_s * 2, 5.0)

    async def _read(self, conn: AbstractConnection) -> None:
        while True:
            # push_request: under RESP3 (redis-py's default) messages are pushes.
            reply = await conn.read_response(
                timeout=math.inf, disconnect_on_error=False, push_request=True
            )
            if not isinstance(reply, list) or len(reply) < 2:
                if reply in (b"PONG", "PONG"):  # PING outside subscribed mode
                    self._ping_sent = None
                continue
            kind = reply[0]
            if kind == b"message":
                self._dispatch(reply[1], reply[2])
            elif kind == b"subscribe":
                self._confirmed(reply[1])
            elif kind == b"pong":
                self._ping_sent = None

    def _dispatch(self, name: bytes, payload: bytes) -> None:
        channel = self._channels.get(name)
        if channel is None or not channel.subs:
            return
        try:
            event = Event.parse(payload)
        except (ValueError, KeyError, TypeError):
            log.warning("events.bad_notice", channel=name.decode(errors="replace"))
            return
        for sub in channel.subs:
            sub.deliver(event)

    def _confirmed(self, name: bytes) -> None:
        channel = self._channels.get(name)
        if channel is None or channel.subscribed.is_set():
            return
        channel.subscribed.set()
        if channel.resync:
            channel.resync = False
            self._start_sync(channel, list(channel.subs), announce=False)

    def _send(self, *command: bytes) -> None:
        """Queue a command for the pub/sub connection; one task writes them in order."""
        if self._conn is None:
            return  # the next connection subscribes to every wanted channel itself
        self._outbox.append(command)
        if self._flusher is None or self._flusher.done():
            self._flusher = self._spawn(self._flush())

    async def _flush(self) -> None:
        while self._outbox:
            conn = self._conn
            batch, self._outbox = self._outbox, []
            # is_connected checked here: send_packed_command would reconnect silently.
            if conn is None or not conn.is_connected:
                return
            try:
                await conn.send_packed_command(conn.pack_commands(batch), check_health=False)
            except (RedisError, OSError) as exc:
                log.info("events.hub_send_failed", error=str(exc))  # the reader sees it too
                return

    # -- housekeeping -----------------------------------------------------------------

    async def _tick(self) -> None:
        interval_s = min(1.0, self._keepalive_s / 4)
        while True:
            await asyncio.sleep(interval_s)
            now = asyncio.get_running_loop().time()
            try:
                for sub in self._subs:
                    if now >= sub.keepalive_at:
                        sub.keepalive_at = now + self._keepalive_s
                        if not sub.active:
                            sub.keepalive()
                        sub.active = False
                self._check_connection(now)
                self._sweep(now)
            except Exception:
                log.exception("events.hub_tick_failed")

    def _check_connection(self, now: float) -> None:
        """PING every keepalive; no answer within one more: the connection is dead (a
        silent peer never errors, so without this the hub would wait forever)."""
        if self._conn is None:
            return
        if self._ping_sent is not None:
            if now - self._ping_sent > self._keepalive_s and self._session is not None:
                log.warning("events.hub_ping_timeout")
                self._session.cancel()
        elif now - self._last_ping >= self._keepalive_s:
            self._ping_sent = self._last_ping = now
            self._send(b"PING")

    def _sweep(self, now: float) -> None:
        for name, channel in list(self._channels.items()):
            idle = channel.idle_since
            if channel.subs or idle is None or now - idle < self._idle_unsubscribe_s:
                continue
            if self._conn is not None and not channel.subscribed.is_set():
                continue  # a SUBSCRIBE is in flight: its reply must find the channel
            del self._channels[name]
            channel.gone = True
            channel.subscribed.set()  # wake syncs still waiting on it, to give up
            self._send(b"UNSUBSCRIBE", name)

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._reap)
        return task

    def _reap(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("events.task_failed", error=repr(task.exception()))
