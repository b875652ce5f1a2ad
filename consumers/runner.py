"""``gengui consumers``: run the selected stream consumers in this process."""

from __future__ import annotations

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
        if role == "dispatch":
            check_after = timedelta(seconds=rt.settings.local_check_s)
            spec: tuple[str, str, type[Any], Any, dict[str, Any]] = (
                keys.requested,
                GROUP_DISPATCHERS,
                GenerationRequested,
                Dispatcher(rt, build_providers(rt), check_after).handle,
                {},
            )
        elif role == "status":
            spec = (keys.job_status, GROUP_STATUS, JobStatus, StatusProcessor(rt).handle, {})
        elif role == "thumbnails":
            # CPU-bound: one thread per core is all concurrency buys here.
            spec = (
                keys.thumbnails,
                GROUP_THUMBNAILERS,
                ThumbnailRequested,
                Thumbnailer(rt).handle,
                {"concurrency": 2},
            )
        else:
            raise ValueError(f"unknown consumer role {role!r}; choose from {ROLES}")
        stream, group, schema, handler, overrides = spec
        consumer = StreamConsumer(
            dedicated_client(rt.redis_url),
            rt.redis,
            rt.consumer_config(stream, group, role, **overrides),
            schema,
            handler,
        )
        loops[f"consumer:{role}"] = consumer.run
    return loops
