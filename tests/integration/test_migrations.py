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
