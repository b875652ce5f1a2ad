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

import hashlib
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import asyncpg
from redis.exceptions import NoScriptError, ResponseError

from core.events import DATA_FIELD, UserEvent, UserEventType
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

# XADD + PEXPIRE + PUBLISH atomically: a subscriber that saw the PUBLISH can find the
# entry, and one that reads the log after subscribing misses nothing in between. The
# payload is a JSON object; the id is spliced in before its closing brace.
_NOTIFY_LUA = """
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', ARGV[4], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('PUBLISH', ARGV[2], string.sub(ARGV[1], 1, -2) .. ',"id":"' .. id .. '"}')
return id
"""
_NOTIFY_SHA = hashlib.sha1(_NOTIFY_LUA.encode()).hexdigest()


def parse_id(raw: str | bytes) -> StreamId | None:
    """``"1700000000000-3"`` -> ``(1700000000000, 3)``; None when it is not a stream id."""
    text = raw.decode() if isinstance(raw, bytes) else raw
    found = _ID.match(text.strip())
    return (int(found[1]), int(found[2])) if found else None


def format_id(sid: StreamId) -> str:
    return f"{sid[0]}-{sid[1]}"


async def publish_user_event(redis: SharedRedis, keys: Keys, user_id: Any, event: UserEvent) -> str:
    """Log and publish one notice; returns its id."""
    payload = event.model_dump_json()
    args = (
        payload,
        keys.user_channel(user_id),
        REPLAY_MAXLEN,
        DATA_FIELD,
        REPLAY_TTL_S * 1000,
    )
    key = keys.user_events(user_id)
    try:
        entry_id = await redis.evalsha(_NOTIFY_SHA, 1, key, *args)
    except NoScriptError:  # first call since the server started (or SCRIPT FLUSH)
        entry_id = await redis.eval(_NOTIFY_LUA, 1, key, *args)
    return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)


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


async def notify(publisher: Publisher, row: asyncpg.Record, event_type: UserEventType) -> None:
    # Best effort: clients that miss a notice catch up by reading the resource.
    try:
        await publisher.notify(row["user_id"], UserEvent(type=event_type, generation=resource(row)))
    except Exception as exc:
        log.warning("notify.failed", generation_id=str(row["id"]), error=repr(exc))
