"""Prometheus metrics: every series gengui exposes, defined in one place.

Two kinds of series:

- **In-process** (counters and histograms below, on ``REGISTRY``): each process counts
  what it does itself — the API its requests, consumers the messages they handle, the
  reconciler its recoveries. Every process exposes its own: the API at ``/metrics``,
  ``consumers``/``reconciler``/``worker`` with ``--metrics-port`` (``serve_metrics``).
  Sum them across replicas in queries.
- **Cluster state** (``ClusterCollector``, API ``/metrics`` only): read from Redis and
  Postgres when scraped — stream length, consumer-group lag and pending counts,
  dead letters, live generations by status and provider. Every API replica reports
  the same values: use ``max`` across replicas, not ``sum``.

Why generations are split into a gauge of *live* rows and a counter of *finished*
ones: counting every row per status on each scrape is a sequential scan that grows
without bound (1M rows: ~100 ms per scrape, per replica). Live rows (queued,
submitted, processing) are few and sit in the partial indexes on live rows
(``ix_generations_user_active``, ``ix_generations_deadline``), so their ``GROUP BY``
stays cheap; terminal transitions are counted where they happen
(``GENERATIONS_FINISHED``) and ``rate()``/``increase()`` answer "how many completed".
The scrape result is cached for ``ttl_s`` so a burst of scrapers costs one query.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from core.lifecycle import NON_TERMINAL
from core.logging import get_logger

if TYPE_CHECKING:
    from core.keys import Keys
    from core.runtime import Runtime

log = get_logger(__name__)

# One registry per process, not prometheus_client's global one: tests build many apps
# in one process, and nothing third-party should add series to ours by accident.
REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)
GCCollector(registry=REGISTRY)

# Seconds: API calls are milliseconds; the long tail is storage and slow clients.
_HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# Seconds from submit to completed: a placeholder engine is sub-second, hosted
# models take seconds to minutes, the deadline default is 600 s.
_GENERATION_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800)
_HANDLER_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30, 120)

HTTP_REQUEST_DURATION = Histogram(
    "gengui_http_request_duration_seconds",
    "API request handling time, by route template (not raw path), method and status.",
    ["route", "method", "status"],
    buckets=_HTTP_BUCKETS,
    registry=REGISTRY,
)

API_PUBLISH_BATCH = Histogram(
    "gengui_api_publish_batch_size",
    "Generations (created or retried) whose queued notice and dispatch request went out "
    "together in one Redis call; the count is the calls.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
    registry=REGISTRY,
)

API_CREATE_BATCH = Histogram(
    "gengui_api_create_batch_size",
    "Creates that shared one Postgres transaction (core.generations.Creator); the count "
    "is the transactions.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
    registry=REGISTRY,
)

GENERATION_DURATION = Histogram(
    "gengui_generation_duration_seconds",
    "From submitted to completed, per provider; observed once per completed generation "
    "by the process that makes the transition.",
    ["provider"],
    buckets=_GENERATION_BUCKETS,
    registry=REGISTRY,
)

GENERATIONS_FINISHED = Counter(
    "gengui_generations_finished",  # exposed as gengui_generations_finished_total
    "Generations that reached a terminal status (completed, failed, cancelled), "
    "counted by the process that made the transition.",
    ["status", "provider"],
    registry=REGISTRY,
)

RECONCILER_RECOVERIES = Counter(
    "gengui_reconciler_recoveries",
    "Generations the reconciler moved on, by reason (requeue, retry, exhausted, "
    "deadline, thumbnail, ...).",
    ["reason"],
    registry=REGISTRY,
)

PROVIDER_ERRORS = Counter(
    "gengui_provider_errors",
    "Failed provider calls or failure reports, by provider and error code.",
    ["provider", "code"],
    registry=REGISTRY,
)

STREAM_CONSUMED = Counter(
    "gengui_stream_consumed",
    "Stream entries handed to a handler (first deliveries and reclaimed ones).",
    ["stream", "group"],
    registry=REGISTRY,
)

STREAM_ACKED = Counter(
    "gengui_stream_acked",
    "Stream entries acknowledged after their handler succeeded.",
    ["stream", "group"],
    registry=REGISTRY,
)

STREAM_HANDLER_FAILURES = Counter(
    "gengui_stream_handler_failures",
    "Handler exceptions; the entry stays pending and is delivered again.",
    ["stream", "group"],
    registry=REGISTRY,
)

STREAM_DEAD_LETTERED = Counter(
    "gengui_stream_dead_lettered",
    "Entries moved to the dead-letter stream (poison, or too many deliveries).",
    ["stream", "group"],
    registry=REGISTRY,
)

STREAM_HANDLER_DURATION = Histogram(
    "gengui_stream_handler_duration_seconds",
    "Time one handler call took, successful or not.",
    ["stream", "group"],
    buckets=_HANDLER_BUCKETS,
    registry=REGISTRY,
)


@dataclass(frozen=True)
class StreamSeries:
    """The per-(stream, group) children, bound once per consumer: ``labels()`` takes a
    lock and a dict lookup, too much to repeat per message at 100k msg/s."""

    consumed: Any
    acked: Any
    failures: Any
    dead_lettered: Any
    handler_duration: Any

    @classmethod
    def of(cls, stream: str, group: str) -> StreamSeries:
        return cls(
            STREAM_CONSUMED.labels(stream, group),
            STREAM_ACKED.labels(stream, group),
            STREAM_HANDLER_FAILURES.labels(stream, group),
            STREAM_DEAD_LETTERED.labels(stream, group),
            STREAM_HANDLER_DURATION.labels(stream, group),
        )


# Methods outside this set are one label value: a client must not mint new series.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


# (route, method, status) -> its histogram child: ``labels()`` takes a lock and builds
# the label tuple on every call, a cost per request. Bounded like the series themselves.
_REQUEST_SERIES: dict[tuple[str, str, int], Any] = {}


def observe_request(route: str, method: str, status: int, seconds: float) -> None:
    key = (route, method if method in _METHODS else "OTHER", status)
    child = _REQUEST_SERIES.get(key)
    if child is None:
        child = _REQUEST_SERIES[key] = HTTP_REQUEST_DURATION.labels(*key[:2], str(status))
    child.observe(seconds)


# ---- cluster state, read at scrape time ------------------------------------------------


@dataclass
class _Snapshot:
    families: list[Metric]
    taken_at: float


@dataclass
class ClusterCollector:
    """Stream and generation state, fetched asynchronously and cached for ``ttl_s``.

    prometheus_client collectors are synchronous; ours needs Redis and Postgres, so
    ``refresh`` runs in the request handler first and ``collect`` replays the result.
    A source that fails (Postgres restarting) is reported as
    ``gengui_metrics_source_up{source} 0`` and the rest still answers.
    """

    ttl_s: float = 5.0
    _snapshot: _Snapshot | None = None
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def families(self, rt: Runtime) -> list[Metric]:
        async with self._lock:  # concurrent scrapes share one refresh
            now = time.monotonic()
            if self._snapshot is None or now - self._snapshot.taken_at >= self.ttl_s:
                self._snapshot = _Snapshot(await self._fetch(rt), time.monotonic())
            return self._snapshot.families

    async def _fetch(self, rt: Runtime) -> list[Metric]:
        up = GaugeMetricFamily(
            "gengui_metrics_source_up",
            "1 if the last scrape could read the source (redis, postgres).",
            labels=["source"],
        )
        families: list[Metric] = [up]
        for source, fetch in (("redis", _streams), ("postgres", _generations)):
            try:
                async with asyncio.timeout(2):
                    families.extend(await fetch(rt))
                up.add_metric([source], 1)
            except Exception as exc:
                log.warning("metrics.source_failed", source=source, error=repr(exc))
                up.add_metric([source], 0)
        return families


def stream_names(keys: Keys) -> list[str]:
    """Every stream gengui uses under this prefix (jobs for each provider name)."""
    from core.settings import PROVIDERS

    names = [
        keys.requested,
        *(keys.jobs(p) for p in PROVIDERS),
        keys.job_status,
        keys.results,
        keys.cancels,
        keys.thumbnails,
        keys.dead,
    ]
    return list(dict.fromkeys(names))


async def _streams(rt: Runtime) -> list[Metric]:
    length = GaugeMetricFamily(
        "gengui_stream_length", "Entries in the stream (XLEN).", labels=["stream"]
    )
    lag = GaugeMetricFamily(
        "gengui_stream_group_lag",
        "Entries not yet delivered to the consumer group (XINFO GROUPS lag).",
        labels=["stream", "group"],
    )
    pending = GaugeMetricFamily(
        "gengui_stream_group_pending",
        "Entries delivered to the group but not acked yet (XINFO GROUPS pending).",
        labels=["stream", "group"],
    )
    consumers = GaugeMetricFamily(
        "gengui_stream_group_consumers",
        "Consumers the group has seen (dead ones linger until deleted).",
        labels=["stream", "group"],
    )
    dead = GaugeMetricFamily(
        "gengui_dead_letters", "Messages in the dead-letter stream (`gengui dlq list`)."
    )
    keys = rt.settings.keys
    names = stream_names(keys)
    async with rt.redis.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.xlen(name)
            pipe.xinfo_groups(name)
        # A stream nobody has written yet answers XINFO with "no such key".
        replies = await pipe.execute(raise_on_error=False)
    for i, name in enumerate(names):
        size, groups = replies[2 * i], replies[2 * i + 1]
        if isinstance(size, Exception):
            raise size
        length.add_metric([name], float(size))
        if name == keys.dead:
            dead.add_metric([], float(size))
        if isinstance(groups, Exception):
            continue
        for info in groups:
            group = _text(info.get("name"))
            # lag is None when Redis cannot tell (after XDEL/XTRIM past the group).
            if info.get("lag") is not None:
                lag.add_metric([name, group], float(info["lag"]))
            pending.add_metric([name, group], float(info.get("pending") or 0))
            consumers.add_metric([name, group], float(info.get("consumers") or 0))
    return [length, lag, pending, consumers, dead]


# The statuses are written out, not a parameter: only a literal list lets the planner
# match the partial index on live rows (a generic plan for ``= ANY($1)`` cannot).
_LIVE_COUNTS = f"""
    SELECT status, provider, count(*) AS n FROM generations
     WHERE status IN ({", ".join(f"'{s.value}'" for s in sorted(NON_TERMINAL))})
     GROUP BY status, provider
"""


async def _generations(rt: Runtime) -> list[Metric]:
    gauge = GaugeMetricFamily(
        "gengui_generations",
        "Live (non-terminal) generations by status and provider. Finished ones: "
        "gengui_generations_finished_total.",
        labels=["status", "provider"],
    )
    live = sorted(s.value for s in NON_TERMINAL)
    rows = await rt.pool.fetch(_LIVE_COUNTS)
    seen = {(r["status"], r["provider"]): r["n"] for r in rows}
    # Zeros for statuses with no rows, so a drained queue reads 0, not "no data".
    providers = {p for _, p in seen} or {rt.settings.default_provider}
    for status in live:
        for provider in sorted(providers):
            gauge.add_metric([status, provider], float(seen.get((status, provider), 0)))
    return [gauge]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class _Exposition:
    """The process registry plus cluster families, as one collector for the encoder."""

    def __init__(self, extra: Iterable[Metric]) -> None:
        self.extra = list(extra)

    def collect(self) -> Iterator[Metric]:
        yield from REGISTRY.collect()
        yield from self.extra


def render(accept: str | None, extra: Iterable[Metric] = ()) -> tuple[bytes, str]:
    """The exposition body and its content type, negotiated like prometheus_client does
    (OpenMetrics when the scraper asks for it)."""
    encoder, content_type = choose_encoder(accept or "")
    collector: Collector = _Exposition(extra)
    return encoder(collector), content_type


def metrics_response(request: web.Request, extra: Iterable[Metric] = ()) -> web.Response:
    body, content_type = render(request.headers.get("Accept"), extra)
    return web.Response(body=body, headers={"Content-Type": content_type})


# ---- a metrics port for processes without an HTTP server -------------------------------


async def _process_metrics(request: web.Request) -> web.Response:
    return metrics_response(request)


async def _process_health(request: web.Request) -> web.Response:
    # Answers while the event loop runs: a wedged loop fails the container healthcheck.
    return web.json_response({"status": "ok"})


async def serve_metrics(host: str, port: int, stop: asyncio.Event) -> None:
    """``/metrics`` and ``/healthz`` for ``consumers``, ``reconciler`` and ``worker``
    (``--metrics-port``); a service loop, so a port already in use stops the process."""
    app = web.Application()
    app.router.add_get("/metrics", _process_metrics)
    app.router.add_get("/healthz", _process_health)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        log.info("metrics.listening", host=host, port=port)
        await stop.wait()
    finally:
        with contextlib.suppress(Exception):
            await runner.cleanup()
