"""Real-time notices: after a state change commits, tell the owner's live clients.

Each notice is written to the user's replay log (a capped stream, ``Keys.user_events``)
and published on the user's channel (``Keys.user_channel``) in one Lua script, so both
carry the same id and neither exists without the other. The channel's payload is the
``UserEvent`` JSON with that ``id`` added; the stream entry holds the ``UserEvent`` in
``__data__``. API processes forward live notices to clients (``core.realtime``) and read
the log for a client that reconnects with ``Last-Event-ID``: ids are stream ids, ordered
per user, so "what did I miss" is one ``XRANGE (last +``.

The log keeps the last ``REPLAY_MAXLEN`` notices (approximately: ``MAXLEN ~`` trims whole
nodes) and expires ``REPLAY_TTL_S`` after the user's last notice. ``Replay.lost_after``
tells a client whose cursor fell out of that window to reload instead of trusting the
log. Both bounds are constants, not settings: every publisher and every API process must
agree on them for that answer to be right.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import asyncpg
from redis.exceptions import NoScriptError, ResponseError

from core.events import DATA_FIELD, Message, UserEvent, UserEventType, json_bytes
from core.generations import resource
from core.keys import Keys
from core.logging import get_logger

if TYPE_CHECKING:
    from core.streams import Publisher, SharedRedis

log = get_logger(__name__)

# ~1,000 notices is a few hundred generations (5-6 notices each, more with progress):
# far more than a client misses across a reconnect, at ~1 KB each per active user.
REPLAY_MAXLEN = 1000
# A client away longer than this reloads its list instead (Replay.lost_after).
REPLAY_TTL_S = 3600

# Stream id of an entry: (milliseconds, sequence), ordered like Redis orders them.
StreamId = tuple[int, int]
_ID = re.compile(r"^(\d{1,20})-(\d{1,20})$")

# One batch of stream messages and notices, applied in order by one script call.
# ARGV: the messages' MAXLEN, the replay log's MAXLEN, the data field, the replay TTL in
# ms, then the items as one string of NUL-separated fields: per item either
# m, stream, payload (a message) or n, replay log, channel, payload (a notice). One
# argument rather than one per field: redis-py packs each argument in Python, which
# costs more than the whole script. (So the keys are not declared as KEYS: gengui runs
# on one Redis, not a cluster.) JSON never holds a raw NUL, nor do our key names.
# A notice is XADD + PEXPIRE + PUBLISH atomically: a subscriber that saw the PUBLISH
# can find the entry, and one that reads the log after subscribing misses nothing in
# between. Its payload is a JSON object; the entry id is spliced in before its closing
# brace. Returns the notices' ids, in order.
_OUTBOX_LUA = """
local m_maxlen, n_maxlen, field, ttl, data = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local pos = 1
local function nextfield()
  local stop = string.find(data, '\\0', pos, true) or (#data + 1)
  local value = string.sub(data, pos, stop - 1)
  pos = stop + 1
  return value
end
local ids = {}
while pos <= #data do
  local kind, key = nextfield(), nextfield()
  if kind == 'm' then
    redis.call('XADD', key, 'MAXLEN', '~', m_maxlen, '*', field, nextfield())
  elseif kind == 'a' then
    local group, acked = nextfield(), {}
    for i = 1, tonumber(nextfield()) do acked[i] = nextfield() end
    -- pcall: a group deleted meanwhile (FLUSHALL) must not fail what was sent before
    redis.pcall('XACK', key, group, unpack(acked))
  else
    local channel, payload = nextfield(), nextfield()
    local id = redis.call('XADD', key, 'MAXLEN', '~', n_maxlen, '*', field, payload)
    redis.call('PEXPIRE', key, ttl)
    redis.call('PUBLISH', channel, string.sub(payload, 1, -2) .. ',"id":"' .. id .. '"}')
    ids[#ids + 1] = id
  end
end
return ids
"""
_OUTBOX_SHA = hashlib.sha1(_OUTBOX_LUA.encode()).hexdigest()
# Lua's unpack() takes a few thousand values at most: longer acks are split.
_ACKS_PER_CALL = 1000


def parse_id(raw: str | bytes) -> StreamId | None:
    """``"1700000000000-3"`` -> ``(1700000000000, 3)``; None when it is not a stream id."""
    text = raw.decode() if isinstance(raw, bytes) else raw
    found = _ID.match(text.strip())
    return (int(found[1]), int(found[2])) if found else None


def format_id(sid: StreamId) -> str:
    return f"{sid[0]}-{sid[1]}"


async def publish_user_event(redis: SharedRedis, keys: Keys, user_id: Any, event: UserEvent) -> str:
    """Log and publish one notice; returns its id."""
    fields = [
        b"n",
        keys.user_events(user_id).encode(),
        keys.user_channel(user_id).encode(),
        json_bytes(event),
    ]
    ids = await _run_outbox(redis, fields, maxlen=0)
    return ids[0]


@dataclass(frozen=True)
class Replay:
    """One atomic look at a user's replay log."""

    entries: list[tuple[StreamId, bytes]]  # after the asked cursor, oldest first
    tip: StreamId  # the last id written; with no log, just below Redis's clock
    first: StreamId | None  # the oldest id kept; None when there is no log
    trimmed: bool  # the length cap has dropped entries
    now_ms: int  # Redis's clock

    def lost_after(self, cursor: StreamId) -> bool:
        """Whether notices after ``cursor`` may be gone from the log (trimmed, or
        expired with it), so a client there must reload rather than replay."""
        if self.first is not None and cursor >= self.first:
            return False  # trimming drops the oldest entries only: all after it are here
        if self.first is not None and self.trimmed:
            return True
        # Expired: the log lives REPLAY_TTL_S past its last notice, so a notice newer
        # than the cursor can have expired only if the cursor is older than that.
        horizon_ms = self.first[0] if self.first is not None else self.now_ms
        return cursor[0] + REPLAY_TTL_S * 1000 < horizon_ms


async def read_replay(
    redis: SharedRedis, keys: Keys, user_id: Any, after: StreamId | None
) -> Replay:
    """The log's state, and its entries after ``after`` (none asked: just the tip)."""
    key = keys.user_events(user_id)
    async with redis.pipeline(transaction=True) as pipe:
        pipe.time()
        pipe.xinfo_stream(key)
        if after is not None:
            pipe.xrange(key, min=f"({format_id(after)}", max="+")
        results = await pipe.execute(raise_on_error=False)
    seconds, micros = results[0]
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    info = results[1]
    if isinstance(info, ResponseError):  # no such key: nothing logged within the TTL
        # Just below the clock: the next XADD gets an id above it, even in this ms.
        return Replay([], (now_ms - 1, 0), None, False, now_ms)
    if isinstance(info, Exception):
        raise info
    entries: list[tuple[StreamId, bytes]] = []
    if after is not None:
        raw_entries = results[2]
        if isinstance(raw_entries, Exception):
            raise raw_entries
        for entry_id, fields in raw_entries:
            sid = parse_id(entry_id)
            if sid is not None:
                entries.append((sid, (fields or {}).get(DATA_FIELD, b"{}")))
    first_entry = info.get("first-entry")
    first = parse_id(first_entry[0]) if first_entry else None
    tip = parse_id(info["last-generated-id"]) or (now_ms - 1, 0)
    added = info.get("entries-added")
    trimmed = added is not None and int(added) > int(info["length"])
    return Replay(entries, tip, first, trimmed, now_ms)


def notice(row: asyncpg.Record, event_type: UserEventType) -> UserEvent:
    return UserEvent(type=event_type, generation=resource(row))


async def notify(publisher: Publisher, row: asyncpg.Record, event_type: UserEventType) -> None:
    # Best effort: clients that miss a notice catch up by reading the resource.
    try:
        await publisher.notify(row["user_id"], notice(row, event_type))
    except Exception as exc:
        log.warning("notify.failed", generation_id=str(row["id"]), error=repr(exc))


async def notify_many(
    publisher: Publisher, notices: Iterable[tuple[asyncpg.Record, UserEventType]]
) -> None:
    """Many notices in one pipeline (one round trip); best effort like ``notify``."""
    outbox = Outbox(publisher)
    for row, event_type in notices:
        outbox.notify(row, event_type)
    await outbox.flush()


class Outbox:
    """Stream messages and notices gathered while handling a batch, sent with one script
    call (one round trip, applied atomically), in the order they were added.

    Notices are best effort: if the call fails they are logged. Messages make ``flush``
    raise, unless every one of them is recovered elsewhere (``required=False``).
    """

    def __init__(self, publisher: Publisher) -> None:
        self.publisher = publisher
        self._clear()

    def _clear(self) -> None:
        self._fields: list[bytes] = []
        self._required = False
        self._notices = 0
        self._messages = 0
        self._acks = 0

    def __len__(self) -> int:
        return self._notices + self._messages + self._acks

    def notify(self, row: asyncpg.Record, event_type: UserEventType) -> None:
        keys, user_id = self.publisher.keys, row["user_id"]
        self._fields += [
            b"n",
            keys.user_events(user_id).encode(),
            keys.user_channel(user_id).encode(),
            json_bytes(notice(row, event_type)),
        ]
        self._notices += 1

    def send(self, stream: str, message: Message, *, required: bool = True) -> None:
        self._fields += [b"m", stream.encode(), json_bytes(message)]
        self._messages += 1
        self._required = self._required or required

    def ack(self, stream: str, group: str, entry_ids: Sequence[bytes]) -> None:
        """XACK ``entry_ids`` in the same call, after everything added before: a consumer
        acks a batch with what handling it sent, one round trip for both, and a crash
        can not fall between the two (``StreamConsumer``). Required: a failed call
        raises, so the caller knows its entries are still pending."""
        for start in range(0, len(entry_ids), _ACKS_PER_CALL):
            chunk = entry_ids[start : start + _ACKS_PER_CALL]
            self._fields += [b"a", stream.encode(), group.encode(), str(len(chunk)).encode()]
            self._fields += chunk
            self._acks += len(chunk)
            self._required = True

    async def flush(self) -> None:
        if not self._fields:
            return
        fields, required, notices, messages = (
            self._fields,
            self._required,
            self._notices,
            self._messages,
        )
        self._clear()
        try:
            await _run_outbox(self.publisher.redis, fields, maxlen=self.publisher.maxlen)
        except Exception as exc:
            if notices:
                log.warning("notify.failed", count=notices, error=repr(exc))
            if required:
                raise
            log.warning("outbox.send_failed", count=messages, error=repr(exc))


async def _run_outbox(redis: SharedRedis, fields: list[bytes], *, maxlen: int) -> list[str]:
    args = (maxlen, REPLAY_MAXLEN, DATA_FIELD, REPLAY_TTL_S * 1000, b"\0".join(fields))
    try:
        ids = await redis.evalsha(_OUTBOX_SHA, 0, *args)
    except NoScriptError:  # first call since the server started (or SCRIPT FLUSH)
        ids = await redis.eval(_OUTBOX_LUA, 0, *args)
    return [i.decode() if isinstance(i, bytes) else str(i) for i in ids]


class OutboxQueue:
    """One ``Outbox`` shared by many callers, sent for them together.

    What callers add in one loop turn, or while a send is in flight, goes out with the
    next script call: under load a round trip is paid per batch, not per caller. Sends
    run one at a time, oldest items first, so items reach Redis in the order they were
    added, across batches too. ``add`` returns a future done once its items went out, or
    failed with the error of the call that carried them; ``observe`` (a metric) is told
    how many ``add`` calls each send carried.
    """

    def __init__(self, publisher: Publisher, observe: Callable[[int], None] | None = None):
        self.publisher = publisher
        self._observe = observe
        self._outbox: Outbox | None = None
        self._waiters: list[asyncio.Future[None]] = []
        self._sender: asyncio.Task[None] | None = None

    def add(self, fill: Callable[[Outbox], None]) -> asyncio.Future[None]:
        """``fill`` adds this caller's items (``Outbox.notify``/``send``) to the next call."""
        if self._outbox is None:
            self._outbox = Outbox(self.publisher)
        fill(self._outbox)
        done = asyncio.get_running_loop().create_future()
        self._waiters.append(done)
        if self._sender is None or self._sender.done():
            # Starts on the next loop turn: everything added in this one goes with it.
            self._sender = asyncio.create_task(self._send())
        return done

    async def _send(self) -> None:
        while self._outbox is not None:
            outbox, waiters = self._outbox, self._waiters
            self._outbox, self._waiters = None, []
            if self._observe is not None:
                self._observe(len(waiters))
            error: Exception | None = None
            try:
                await outbox.flush()
            except asyncio.CancelledError:
                for done in waiters:
                    done.cancel()
                raise
            except Exception as exc:
                error = exc
            for done in waiters:
                if done.done():  # its caller stopped waiting
                    continue
                if error is None:
                    done.set_result(None)
                else:
                    done.set_exception(error)

    async def aclose(self) -> None:
        """Wait for the send in flight, if any (shutdown)."""
        if self._sender is not None:
            await asyncio.gather(self._sender, return_exceptions=True)
