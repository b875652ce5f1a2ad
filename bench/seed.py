"""Bulk data for the benchmarks: a ``generations`` table that has run for a while.

A benchmark that starts from an empty, never-analysed table measures something no
deployment runs: the planner, knowing no better, scans the whole table for the
hot paths' ``id = ANY($1)`` lookups, and the cached plans keep doing so as the table
grows, until autovacuum's first ``ANALYZE`` (a minute in). Loading finished rows and
analysing them first gives the plans a deployment has.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any

import asyncpg

PROMPT_TAIL = "a lighthouse on a cliff at dusk, volumetric light, oil painting, 35mm, soft colours"

_BULK_USERS = """
    INSERT INTO users (id, email, plan, email_verified_at)
    SELECT gen_random_uuid(), 'bulk-' || $1 || '-' || i || '@example.com', 'free', now()
      FROM generate_series(1, $2) AS i
"""

# Finished rows, newest first in i: 90 % completed (with image and thumbnail), 8 %
# failed, 2 % cancelled, one every 2.5 s back from now. None is in a partial index
# of live rows, as in a table that has run for a while.
_BULK_ROWS = f"""
    INSERT INTO generations (id, user_id, status, attempt, provider, prompt, width, height,
                             seed, error_code, error_message, image_key, image_content_type,
                             thumbnail_key, progress, created_at, updated_at, completed_at)
    SELECT gen_random_uuid(), u.ids[1 + (i % u.n)],
           CASE WHEN i % 50 = 0 THEN 'cancelled' WHEN i % 12 = 0 THEN 'failed'
                ELSE 'completed' END,
           1, 'local', 'bulk #' || i || ': {PROMPT_TAIL}', 1024, 1024, i,
           CASE WHEN i % 50 <> 0 AND i % 12 = 0 THEN 'generation_failed' END,
           CASE WHEN i % 50 <> 0 AND i % 12 = 0 THEN 'the provider reported a failure' END,
           CASE WHEN i % 50 <> 0 AND i % 12 <> 0 THEN 'bulk/' || i || '/original.png' END,
           CASE WHEN i % 50 <> 0 AND i % 12 <> 0 THEN 'image/png' END,
           CASE WHEN i % 50 <> 0 AND i % 12 <> 0 THEN 'bulk/' || i || '/thumb-128.webp' END,
           CASE WHEN i % 50 <> 0 AND i % 12 <> 0 THEN 1.0 END,
           now() - make_interval(secs => i * 2.5),
           now() - make_interval(secs => i * 2.5 - 5),
           CASE WHEN i % 50 <> 0 AND i % 12 <> 0 THEN now() - make_interval(secs => i * 2.5 - 5)
           END
      FROM generate_series($1::int, $2::int) AS i,
           (SELECT array_agg(id) AS ids, count(*)::int AS n FROM users WHERE id = ANY($3::uuid[]))
           AS u
"""


async def bulk_load(
    database_url: str, list_user: Any, rows: int, users: int, list_rows: int = 0
) -> dict[str, float]:
    """``users`` users and ``rows`` finished rows (``list_rows`` of them owned by
    ``list_user``) via INSERT ... SELECT generate_series, in two parallel chunks (two
    cores), then VACUUM ANALYZE; returns seconds per step and the table's size."""
    from core.db import asyncpg_dsn  # the scripts put the project on sys.path first

    dsn = asyncpg_dsn(database_url)
    timings: dict[str, float] = {}
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        t0 = time.perf_counter()
        tag = secrets.token_hex(3)
        others = max(1, users - 1)
        await conn.execute(_BULK_USERS, tag, others)
        other_ids = [
            r["id"]
            for r in await conn.fetch(
                "SELECT id FROM users WHERE email LIKE $1", f"bulk-{tag}-%@example.com"
            )
        ]
        timings["users_s"] = round(time.perf_counter() - t0, 2)
    finally:
        await conn.close()

    async def insert(lo: int, hi: int, owners: list[Any]) -> None:
        c = await asyncpg.connect(dsn, timeout=10)
        try:
            await c.execute(_BULK_ROWS, lo, hi, owners, timeout=1800)
        finally:
            await c.close()

    t0 = time.perf_counter()
    rest = max(0, rows - list_rows)
    half = rest // 2
    jobs = [insert(1, list_rows, [list_user])] if list_rows else []
    if rest:
        # Offsets keep every row's created_at distinct across the chunks.
        base = list_rows
        jobs += [insert(base + 1, base + half, other_ids)]
        jobs += [insert(base + half + 1, base + rest, other_ids)]
    await asyncio.gather(*jobs)
    timings["rows_s"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        await conn.execute("VACUUM ANALYZE generations", timeout=1800)
        await conn.execute("VACUUM ANALYZE users", timeout=600)
        timings["vacuum_analyze_s"] = round(time.perf_counter() - t0, 2)
        timings["table_mb"] = round(
            await conn.fetchval("SELECT pg_total_relation_size('generations')") / 2**20, 1
        )
    finally:
        await conn.close()
    return timings
