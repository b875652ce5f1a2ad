"""``gengui consumers``: run the selected stream consumers in this process."""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from typing import Any

from consumers.cancels import Canceller
from consumers.dispatch import Dispatcher
from consumers.hosted import hosted_loops
from consumers.results import ResultFetcher
from consumers.status import StatusProcessor
from consumers.thumbnails import Thumbnailer
from core.events import (
    GenerationRequested,
    JobStatus,
    ProviderCancel,
    ProviderResult,
    ThumbnailRequested,
)
from core.keys import (
    GROUP_CANCELS,
    GROUP_DISPATCHERS,
    GROUP_RESULTS,
    GROUP_STATUS,
    GROUP_THUMBNAILERS,
)
from core.ratelimit import RateLimiter
from core.runtime import Runtime
from core.service import Loop
from core.streams import StreamConsumer, dedicated_client
from providers.registry import ProviderSet

ROLES = ("dispatch", "status", "thumbnails", "results", "cancels", "hosted")


def _generation(report: JobStatus) -> Hashable:
    return report.generation_id


def consumer_loops(
    rt: Runtime, providers: ProviderSet | None = None, roles: Iterable[str] = ROLES
) -> dict[str, Loop]:
    """One loop per role, each reading on its own dedicated connection."""
    keys = rt.settings.keys
    providers = providers or ProviderSet.local_only(rt.publisher)
    limiter = RateLimiter(rt.redis, keys, rt.settings.provider_rate_limits)
    loops: dict[str, Loop] = {}
    for role in roles:
        spec: tuple[str, str, type[Any], Any, dict[str, Any]]
        handler: Any
        batch_handler: Any = None  # where bulk handling pays: see StreamConsumer
        order_key: Any = None  # with a pipeline: whose messages must stay in order
        if role == "dispatch":
            dispatcher = Dispatcher(rt, providers, limiter)
            batch_handler = dispatcher.handle_batch
            spec = (keys.requested, GROUP_DISPATCHERS, GenerationRequested, dispatcher.handle, {})
        elif role == "status":
            processor = StatusProcessor(rt)
            batch_handler = processor.handle_batch
            order_key = _generation
            read = {"pipeline": rt.settings.consumer_pipeline, "batch": rt.settings.status_batch}
            spec = (keys.job_status, GROUP_STATUS, JobStatus, processor.handle, read)
        elif role == "thumbnails":
            thumbnailer = Thumbnailer(rt)
            batch_handler = thumbnailer.handle_batch
            # CPU-bound: one thread per core is all concurrency buys here (the batch
            # handler bounds its own; this is for the requests it leaves).
            handler = thumbnailer.handle
            spec = (keys.thumbnails, GROUP_THUMBNAILERS, ThumbnailRequested, handler, {})
            spec[4]["concurrency"] = 2
        elif role == "results":
            if providers.session is None:
                continue  # no remote providers in this process: nothing to fetch
            handler = ResultFetcher(rt, providers.session).handle
            spec = (keys.results, GROUP_RESULTS, ProviderResult, handler, {})
        elif role == "cancels":
            handler = Canceller(rt, providers.polling).handle
            spec = (keys.cancels, GROUP_CANCELS, ProviderCancel, handler, {})
        elif role == "hosted":
            loops.update(hosted_loops(rt, providers.sync, limiter))
            continue
        else:
            raise ValueError(f"unknown consumer role {role!r}; choose from {ROLES}")
        stream, group, schema, handler, overrides = spec
        consumer = StreamConsumer(
            dedicated_client(rt.redis_url),
            rt.redis,
            rt.consumer_config(stream, group, role, **overrides),
            schema,
            handler,
            batch_handler,
            order_key,
            # Batch handlers' outboxes go out with their batch's XACK.
            publisher=rt.publisher,
        )
        loops[f"consumer:{role}"] = consumer.run
    return loops
