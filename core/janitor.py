"""The janitor: deletes credentials that can never be used again, and stream consumers
that left.

Sessions that expired or were revoked, mailed tokens (e-mail verification, password
reset) that were used or expired, and API tokens that were revoked or expired are kept
``janitor_keep_s`` (a week) for the operator's questions, then deleted. Each pass deletes
in bounded chunks so it never holds long locks; it runs in the reconciler process, and
replicas may run it side by side (a DELETE of a deleted row deletes nothing).

Every process is a new consumer in each group it reads (``core.runtime.consumer_name``)
and Redis keeps a group's consumers for good: a clean stop leaves its groups, and each
pass deletes the consumers of crashed or killed processes once nothing of theirs is
pending and they have not read for ``CONSUMER_IDLE_S`` (their pending entries go to
other consumers by idle time first: ``core.streams``).
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import timedelta

import asyncpg

from core import streams
from core.keys import consumer_groups
from core.logging import get_logger
from core.runtime import Runtime
from core.settings import PROVIDERS

log = get_logger(__name__)

CHUNK = 1000
# A live consumer reads at least every GENGUI_CONSUMER_BLOCK_MS, or holds entries while
# it works on them; one silent this long with nothing pending has gone.
CONSUMER_IDLE_S = 15 * 60

# table -> when a row of it became useless (LEAST skips NULLs; NULL: still usable)
_DEAD_SINCE = {
    "sessions": "LEAST(expires_at, revoked_at)",
    "account_tokens": "LEAST(expires_at, used_at)",
    "api_tokens": "LEAST(expires_at, revoked_at)",
}


async def purge(pool: asyncpg.Pool, keep: timedelta) -> dict[str, int]:
    """One pass; returns rows deleted per table."""
    deleted: dict[str, int] = {}
    for table, dead_since in _DEAD_SINCE.items():
        total = 0
        while True:
            status = await pool.execute(
                f"""DELETE FROM {table} WHERE id IN (
                        SELECT id FROM {table} WHERE {dead_since} < now() - $1::interval
                         LIMIT {CHUNK})""",
                keep,
            )
            n = int(status.rsplit(" ", 1)[1])
            total += n
            if n < CHUNK:
                break
        deleted[table] = total
    return deleted


async def prune_consumers(rt: Runtime, idle_s: float = CONSUMER_IDLE_S) -> int:
    """One pass over every group: the consumers that left; returns how many."""
    groups = consumer_groups(rt.settings.keys, PROVIDERS)
    idle_ms = int(idle_s * 1000)
    pruned = await asyncio.gather(
        *(streams.prune_consumers(rt.redis, s, g, idle_ms=idle_ms) for s, g in groups)
    )
    return sum(pruned)


async def run(rt: Runtime, stop: asyncio.Event) -> None:
    """``purge`` and ``prune_consumers`` every ``janitor_interval_s`` until stopped."""
    s = rt.settings
    keep = timedelta(seconds=s.janitor_keep_s)
    while not stop.is_set():
        try:
            deleted = await purge(rt.pool, keep)
            if any(deleted.values()):
                log.info("janitor.deleted", **deleted)
            if consumers := await prune_consumers(rt):
                log.info("janitor.consumers_deleted", count=consumers)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("janitor.failed")  # the database restarting: next interval
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), s.janitor_interval_s)
