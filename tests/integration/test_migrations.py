"""Migrations: head matches the models (no drift), and down/up round-trips."""

from __future__ import annotations

import asyncio

import asyncpg
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.ext.asyncio import create_async_engine
from sqlmodel import SQLModel

import core.models  # noqa: F401
from core.db import asyncpg_dsn, sqlalchemy_url
from core.migrations import alembic_config
from tests.conftest import Servers, _with_database


async def _fresh_database(servers: Servers) -> str:
    import uuid

    name = f"gengui_drift_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(asyncpg_dsn(servers.database_url))
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return name


async def _drop(servers: Servers, name: str) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(servers.database_url))
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def _diff(url: str) -> list:  # type: ignore[type-arg]
    engine = create_async_engine(sqlalchemy_url(url))
    async with engine.connect() as conn:
        diff = await conn.run_sync(
            lambda sync: compare_metadata(
                MigrationContext.configure(sync, opts={"compare_type": True}), SQLModel.metadata
            )
        )
    await engine.dispose()
    return diff  # type: ignore[no-any-return]


async def test_head_has_no_drift_and_downgrade_round_trips(servers: Servers) -> None:
    name = await _fresh_database(servers)
    url = _with_database(servers.database_url, name)
    try:
        cfg = alembic_config(url)
        await asyncio.to_thread(command.upgrade, cfg, "head")
        assert await _diff(url) == []
        await asyncio.to_thread(command.downgrade, cfg, "base")
        assert len(await _diff(url)) > 0
        await asyncio.to_thread(command.upgrade, cfg, "head")
        assert await _diff(url) == []
    finally:
        await _drop(servers, name)


async def test_the_schedule_moves_to_its_own_table_and_back(servers: Servers) -> None:
    """0006 carries each generation's next check over (only those with one to keep),
    and its downgrade puts them back on the rows."""
    name = await _fresh_database(servers)
    url = _with_database(servers.database_url, name)
    cfg = alembic_config(url)
    try:
        await asyncio.to_thread(command.upgrade, cfg, "0005")
        conn = await asyncpg.connect(asyncpg_dsn(url))
        try:
            user = await conn.fetchval(
                "INSERT INTO users (id, email) VALUES (gen_random_uuid(), 'a@x') RETURNING id"
            )
            rows = {
                # status, thumbnail_key, next_check_at -> whether a check is kept
                "live": ("processing", "NULL", "now() + interval '1 minute'"),
                "no_thumbnail": ("completed", "NULL", "now() + interval '2 minutes'"),
                "whole": ("completed", "'t'", "now() + interval '3 minutes'"),
                "failed": ("failed", "NULL", "now()"),
                "unscheduled": ("queued", "NULL", "NULL"),
            }
            ids = {}
            for key, (status, thumb, due) in rows.items():
                ids[key] = await conn.fetchval(
                    f"""INSERT INTO generations (id, user_id, status, provider, prompt, width,
                                                 height, seed, thumbnail_key, next_check_at)
                        VALUES (gen_random_uuid(), $1, $2, 'local', 'p', 64, 64, 1, {thumb},
                                {due}) RETURNING id""",
                    user,
                    status,
                )
            before = {
                r["id"]: r["next_check_at"]
                for r in await conn.fetch("SELECT id, next_check_at FROM generations")
            }
            await asyncio.to_thread(command.upgrade, cfg, "0006")
            checks = {
                r["generation_id"]: r["due_at"]
                for r in await conn.fetch("SELECT * FROM generation_checks")
            }
            kept = ("live", "no_thumbnail")
            assert checks == {ids[k]: before[ids[k]] for k in kept}
            await asyncio.to_thread(command.downgrade, cfg, "0005")
            after = {
                r["id"]: r["next_check_at"]
                for r in await conn.fetch("SELECT id, next_check_at FROM generations")
            }
            assert after == {gid: before[gid] if k in kept else None for k, gid in ids.items()}
        finally:
            await conn.close()
    finally:
        await _drop(servers, name)
