"""The resources a gengui process holds, opened and closed in one place."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg

from core.db import create_pool
from core.embedded import discover
from core.settings import Settings
from core.storage import LocalStorage, S3Storage, Storage
from core.streams import ConsumerConfig, Publisher, SharedRedis, shared_client


class ConfigurationError(RuntimeError):
    """Settings that cannot work; the message says which variable to set."""


def resolve_settings(settings: Settings, *, need_redis: bool = True) -> Settings:
    """Fill unset server URLs from a running ``gengui dev``'s embedded servers."""
    if settings.database_url and (settings.redis_url or not need_redis):
        return settings
    found = discover(settings.data_dir)
    if found is None:
        raise ConfigurationError(
            "GENGUI_DATABASE_URL and GENGUI_REDIS_URL are not set and no `gengui dev` is "
            f"running with data dir {settings.data_dir}: set them, or start `gengui dev`."
        )
    return settings.model_copy(
        update={
            "database_url": settings.database_url or found.database_url,
            "redis_url": settings.redis_url or found.redis_url,
        }
    )


def consumer_name(role: str) -> str:
    """Unique per process: a restarted process is a new consumer, so what the old one
    held pending is reclaimed by idle time rather than silently re-owned."""
    return f"{role}-{socket.gethostname()}-{os.getpid()}"


async def open_storage(settings: Settings) -> Storage:
    if settings.storage_backend == "local":
        return LocalStorage(settings.images_dir, sync=settings.storage_sync)
    if not settings.s3_bucket:
        raise ConfigurationError("GENGUI_S3_BUCKET is required with GENGUI_STORAGE_BACKEND=s3")
    return await S3Storage.create(
        bucket=settings.s3_bucket,
        endpoint_url=settings.s3_endpoint_url,
        public_endpoint_url=settings.s3_public_endpoint_url,
        region=settings.s3_region,
        access_key_id=_secret(settings.s3_access_key_id),
        secret_access_key=_secret(settings.s3_secret_access_key),
        create_bucket=settings.s3_create_bucket,
    )


def _secret(value: Any) -> str | None:
    return value.get_secret_value() if value is not None else None


@dataclass
class Runtime:
    settings: Settings
    pool: asyncpg.Pool
    redis: SharedRedis
    publisher: Publisher
    storage: Storage

    @property
    def redis_url(self) -> str:
        assert self.settings.redis_url
        return self.settings.redis_url

    def consumer_config(
        self, stream: str, group: str, role: str, **overrides: Any
    ) -> ConsumerConfig:
        s = self.settings
        values: dict[str, Any] = {
            "stream": stream,
            "group": group,
            "consumer": consumer_name(role),
            "batch": s.consumer_batch,
            "block_ms": s.consumer_block_ms,
            "concurrency": s.consumer_concurrency,
            "reclaim_idle_ms": s.reclaim_idle_ms,
            "reclaim_interval_s": s.reclaim_interval_s,
            "max_deliveries": s.max_deliveries,
            "dead_stream": s.keys.dead,
        }
        values.update(overrides)
        return ConsumerConfig(**values)


@contextlib.asynccontextmanager
async def open_runtime(settings: Settings) -> AsyncIterator[Runtime]:
    settings = resolve_settings(settings)
    assert settings.database_url and settings.redis_url
    async with contextlib.AsyncExitStack() as stack:
        pool = await create_pool(settings.database_url, max_size=settings.db_pool_max)
        stack.push_async_callback(pool.close)
        redis = shared_client(settings.redis_url)
        stack.push_async_callback(redis.aclose)
        storage = await open_storage(settings)
        stack.push_async_callback(storage.close)
        publisher = Publisher(redis, settings.keys, maxlen=settings.stream_maxlen)
        yield Runtime(settings, pool, redis, publisher, storage)
