"""The dead-letter stream: list what failed too often, and replay it once fixed."""

from __future__ import annotations

from typing import Any, cast

from core.events import DATA_FIELD, DeadLetter
from core.keys import Keys
from core.streams import SharedRedis


async def list_dead(
    redis: SharedRedis, keys: Keys, count: int = 100
) -> list[tuple[str, DeadLetter]]:
    entries = cast(list[Any], await redis.xrange(keys.dead, count=count))
    return [
        (entry_id.decode(), DeadLetter.model_validate_json(fields[DATA_FIELD]))
        for entry_id, fields in entries
    ]


async def replay(redis: SharedRedis, keys: Keys, entry_id: str) -> str:
    """Put a dead letter's message back on its stream; returns the new entry id.

    The add and the delete are one transaction, so a replay never runs twice."""
    found = cast(list[Any], await redis.xrange(keys.dead, min=entry_id, max=entry_id))
    if not found:
        raise KeyError(entry_id)
    letter = DeadLetter.model_validate_json(found[0][1][DATA_FIELD])
    async with redis.pipeline(transaction=True) as pipe:
        pipe.xadd(letter.stream, {DATA_FIELD: letter.data.encode()})
        pipe.xdel(keys.dead, entry_id)
        new_id, _ = await pipe.execute()
    return str(new_id.decode())
