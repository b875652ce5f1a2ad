"""The baseline's HTTP front: aiohttp + asyncpg, enqueueing with Celery's ``delay``.

The same requests and database work as gengui's ``POST /api/v1/generations``: the
bearer token looked up with gengui's query, the row inserted with its first history
row in one statement (gengui's ``core.generations._INSERT``), then the ``dispatch``
task enqueued and ``202`` with the resource. ``delay`` is a blocking publish (kombu
over redis-py), called on the event loop as async Celery front ends usually do; on
a local Redis it takes a fraction of a millisecond. ``GET /api/v1/generations/{id}``
serves the load generator's fallback polls, ``GET /readyz`` its start-up check.

Runs in the Celery virtualenv: ``python bench/celery_baseline/web.py`` with
``BENCH_DATABASE_URL``, ``BENCH_PORT`` and the variables ``tasks.py`` reads.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from uuid import UUID

import asyncpg
import orjson
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.celery_baseline.tasks import dispatch, resource

pool_key = web.AppKey("pool", asyncpg.Pool)

_AUTH = """
    SELECT u.id, u.email, u.plan, u.email_verified_at IS NOT NULL AS email_verified
      FROM api_tokens t JOIN users u ON u.id = t.user_id
     WHERE t.token_hash = $1 AND t.revoked_at IS NULL
       AND (t.expires_at IS NULL OR t.expires_at > now())
"""

_INSERT = """
    WITH ins AS (
        INSERT INTO generations (id, user_id, status, attempt, provider, prompt, negative_prompt,
                                 width, height, seed, deadline_at)
        VALUES (gen_random_uuid(), $1, 'queued', 1, 'local', $2, $3, $4, $5, $6,
                now() + interval '600 seconds')
        RETURNING *
    ), hist AS (
        INSERT INTO generation_events (generation_id, attempt, status)
        SELECT id, attempt, status FROM ins
    ), chk AS (
        INSERT INTO generation_checks (generation_id, due_at)
        SELECT id, now() + interval '30 seconds' FROM ins
    )
    SELECT * FROM ins
"""


def _error(status: int, code: str, message: str) -> web.Response:
    body = {"error": {"code": code, "message": message, "details": None}}
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


async def _user(request: web.Request) -> asyncpg.Record | None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.startswith("gg_"):
        return None
    digest = hashlib.sha256(token.strip().encode()).digest()
    return await request.app[pool_key].fetchrow(_AUTH, digest)


async def create(request: web.Request) -> web.Response:
    user = await _user(request)
    if user is None:
        return _error(401, "unauthorized", "a bearer token is required")
    try:
        body: Any = orjson.loads(await request.read())
        prompt = body["prompt"]
        negative = body.get("negative_prompt")
        width, height = int(body.get("width", 1024)), int(body.get("height", 1024))
        seed = int(body.get("seed") or 0)
        if not isinstance(prompt, str) or not prompt.strip() or len(prompt) > 4000:
            raise ValueError("prompt")
        if not (256 <= width <= 2048 and 256 <= height <= 2048 and 0 <= seed < 2**32):
            raise ValueError("size or seed")
    except (ValueError, KeyError, TypeError) as exc:
        return _error(400, "invalid_input", str(exc))
    row = await request.app[pool_key].fetchrow(
        _INSERT, user["id"], prompt, negative, width, height, seed
    )
    dispatch.delay(str(row["id"]), row["attempt"])
    return web.Response(
        body=orjson.dumps(resource(dict(row))),
        status=202,
        content_type="application/json",
        headers={"Location": f"/api/v1/generations/{row['id']}"},
    )


async def read(request: web.Request) -> web.Response:
    user = await _user(request)
    if user is None:
        return _error(401, "unauthorized", "a bearer token is required")
    try:
        gid = UUID(request.match_info["id"])
    except ValueError:
        return _error(404, "not_found", "no such generation")
    row = await request.app[pool_key].fetchrow(
        "SELECT * FROM generations WHERE id = $1 AND user_id = $2", gid, user["id"]
    )
    if row is None:
        return _error(404, "not_found", "no such generation")
    return web.Response(body=orjson.dumps(resource(dict(row))), content_type="application/json")


async def ready(request: web.Request) -> web.Response:
    await request.app[pool_key].fetchval("SELECT 1")
    return web.Response(text="ok")


async def _no_reset(conn: asyncpg.Connection) -> None:
    return None


async def _pool(app: web.Application) -> AsyncIterator[None]:
    # gengui's pool settings (core.db.create_pool): no reset round trip on release.
    pool = await asyncpg.create_pool(
        os.environ["BENCH_DATABASE_URL"],
        min_size=1,
        max_size=10,
        statement_cache_size=256,
        reset=_no_reset,
    )
    assert pool is not None
    app[pool_key] = pool
    yield
    await pool.close()


def make_app() -> web.Application:
    app = web.Application()
    app.cleanup_ctx.append(_pool)
    app.router.add_post("/api/v1/generations", create)
    app.router.add_get("/api/v1/generations/{id}", read)
    app.router.add_get("/readyz", ready)
    return app


if __name__ == "__main__":
    web.run_app(
        make_app(),
        host="127.0.0.1",
        port=int(os.environ["BENCH_PORT"]),
        access_log=None,
        print=None,
    )
