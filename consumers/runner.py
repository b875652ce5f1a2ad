"""``gengui consumers``: run the selected stream consumers in this process."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from datetime import timedelta
from typing import Any

from consumers.dispatch import Dispatcher
from consumers.status import StatusProcessor
from consumers.thumbnails import Thumbnailer
from core.events import GenerationRequested, JobStatus, ThumbnailRequested
from core.keys import GROUP_DISPATCHERS, GROUP_STATUS, GROUP_THUMBNAILERS
from core.runtime import Runtime
from core.service import Loop
from core.streams import StreamConsumer, dedicated_client
from providers.base import Provider
from providers.local.provider import LocalProvider

ROLES = ("dispatch", "status", "thumbnails")


def build_providers(rt: Runtime) -> dict[str, Provider]:
    return {"local": LocalProvider(rt.publisher)}


def consumer_loops(rt: Runtime, roles: Iterable[str] = ROLES) -> dict[str, Loop]:
    """One loop per role, each reading on its own dedicated connection."""
    keys = rt.settings.keys
    loops: dict[str, Loop] = {}
    for role in roles:
        consumer: StreamConsumer[Any]
        if role == "dispatch":
            dispatcher = Dispatcher(
                rt, build_providers(rt), timedelta(seconds=rt.settings.local_check_s)
            )
            consumer = StreamConsumer(
                dedicated_client(rt.redis_url),
                rt.redis,
                rt.consumer_config(keys.requested, GROUP_DISPATCHERS, role),
                GenerationRequested,
                dispatcher.handle,
            )
        elif role == "status":
            consumer = StreamConsumer(
                dedicated_client(rt.redis_url),
                rt.redis,
                rt.consumer_config(keys.job_status, GROUP_STATUS, role),
                JobStatus,
                StatusProcessor(rt).handle,
            )
        elif role == "thumbnails":
            # CPU-bound: one thread per core is all concurrency buys here.
            consumer = StreamConsumer(
                dedicated_client(rt.redis_url),
                rt.redis,
                rt.consumer_config(keys.thumbnails, GROUP_THUMBNAILERS, role, concurrency=2),
                ThumbnailRequested,
                Thumbnailer(rt).handle,
            )
        else:
            raise ValueError(f"unknown consumer role {role!r}; choose from {ROLES}")
        loops[f"consumer:{role}"] = _owning(consumer)
    return loops


def _owning(consumer: StreamConsumer[Any]) -> Loop:
    async def run(stop: asyncio.Event) -> None:
        try:
            await consumer.run(stop)
        finally:
            await consumer.reader.aclose()

    return run
