"""Real-time notices: after a state change commits, tell the owner's live clients."""

from __future__ import annotations

import asyncpg

from core.events import UserEvent, UserEventType
from core.generations import resource
from core.logging import get_logger
from core.streams import Publisher

log = get_logger(__name__)


async def notify(publisher: Publisher, row: asyncpg.Record, event_type: UserEventType) -> None:
    # Best effort: clients that miss a notice catch up by reading the resource.
    try:
        await publisher.notify(row["user_id"], UserEvent(type=event_type, generation=resource(row)))
    except Exception as exc:
        log.warning("notify.failed", generation_id=str(row["id"]), error=repr(exc))
