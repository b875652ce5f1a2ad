"""The janitor: deletes credentials that can never be used again.

Sessions that expired or were revoked, mailed tokens (e-mail verification, password
reset) that were used or expired, and API tokens that were revoked or expired are kept
``janitor_keep_s`` (a week) for the operator's questions, then deleted. Each pass deletes
in bounded chunks so it never holds long locks; it runs in the reconciler process, and
replicas may run it side by side (a DELETE of a deleted row deletes nothing).
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import timedelta

import asyncpg

from core.logging import get_logger
from core.runtime import Runtime

log = get_logger(__name__)

CHUNK = 1000

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


async def run(rt: Runtime, stop: asyncio.Event) -> None:
    """``purge`` every ``janitor_interval_s`` until stopped."""
    s = rt.settings
    keep = timedelta(seconds=s.janitor_keep_s)
    while not stop.is_set():
        try:
            deleted = await purge(rt.pool, keep)
            if any(deleted.values()):
                log.info("janitor.deleted", **deleted)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("janitor.failed")  # the database restarting: next interval
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), s.janitor_interval_s)
