"""Database access: an asyncpg pool for the hot paths, a SQLModel engine for the rest.

The hot paths (create, CAS transitions, listing) run hand-written SQL on a raw asyncpg
pool: the ORM's ``session.add`` + ``commit`` costs several times an asyncpg round trip.
SQLModel owns the schema (models, migrations) and the cold paths (CLI, admin).
"""

from __future__ import annotations

import json
from typing import Any

import asyncpg
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlmodel.ext.asyncio.session import AsyncSession


def asyncpg_dsn(url: str) -> str:
    """Accept both ``postgresql://`` and SQLAlchemy's ``postgresql+asyncpg://``."""
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


def sqlalchemy_url(url: str) -> str:
    for scheme in ("postgresql://", "postgres://"):
        if url.startswith(scheme):
            return "postgresql+asyncpg://" + url[len(scheme) :]
    return url


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def _no_reset(conn: asyncpg.Connection) -> None:
    return None


async def create_pool(url: str, *, max_size: int = 10, **kwargs: Any) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(
        asyncpg_dsn(url),
        min_size=1,
        max_size=max_size,
        init=_init_connection,
        # Statements are few and fixed; cache them all.
        statement_cache_size=256,
        # asyncpg's default reset (UNLISTEN, advisory unlock, RESET ALL) costs a round
        # trip per release; gengui uses none of the session state it clears.
        reset=_no_reset,
        **kwargs,
    )
    assert pool is not None
    return pool


def create_engine(url: str) -> AsyncEngine:
    return create_async_engine(sqlalchemy_url(url), pool_pre_ping=True)


def session_maker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, class_=AsyncSession, expire_on_commit=False)
