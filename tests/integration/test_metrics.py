"""Prometheus series move with real requests and real generations on real Redis and
Postgres; the cluster collector survives a dead source; a worker process's metrics
port answers. Counters are process-global, so every assertion is on a difference."""

from __future__ import annotations

import asyncio
import socket
import uuid

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from core import metrics
from core.api.app import create_app
from core.api.metrics import cluster_collector_key
from core.events import GenerationRequested
from core.keys import GROUP_DISPATCHERS, GROUP_GPU_WORKERS
from core.runtime import Runtime
from tests.conftest import UserAuth, running, wait_for_status

BODY = {"prompt": "a paper crane on a desk"}
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(client) -> Samples:  # type: ignore[no-untyped-def]
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.content_type == "text/plain"
    return parse(await resp.text())


def parse(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sample's value; 0 when the series does not exist yet (a counter not yet hit)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def fresh(client) -> None:  # type: ignore[no-untyped-def]
    # The cluster state is cached for a few seconds in production; tests read it live.
    client.app[cluster_collector_key].ttl_s = 0


async def test_http_latency_is_labelled_by_route_template_method_and_status(
    client, alice: UserAuth
) -> None:
    count = "gengui_http_request_duration_seconds_count"
    by_id = {"route": "/api/v1/generations/{id}", "method": "GET", "status": "404"}
    unmatched = {"route": "unmatched", "method": "GET", "status": "404"}
    before = await scrape(client)
    gid = uuid.uuid4()
    for _ in range(3):
        resp = await client.get(f"/api/v1/generations/{gid}", headers=alice.headers)
        assert resp.status == 404
    assert (await client.get(f"/no/such/{gid}")).status == 404
    after = await scrape(client)
    assert value(after, count, **by_id) - value(before, count, **by_id) == 3
    assert value(after, count, **unmatched) - value(before, count, **unmatched) == 1
    # Raw paths never become label values: ids cannot mint series.
    routes = {dict(labels).get("route", "") for _, labels in after}
    assert not any(str(gid) in r for r in routes)
    bucket = "gengui_http_request_duration_seconds_bucket"
    assert value(after, bucket, **by_id, le="+Inf") == value(after, count, **by_id)


async def test_generation_stream_and_group_series_follow_a_generation(
    client, alice: UserAuth, rt: Runtime
) -> None:
    from consumers.runner import consumer_loops
    from providers.local.engines import load_engine
    from providers.local.worker import worker_loops

    fresh(client)
    keys = rt.settings.keys
    # A local generation's job goes from the API straight to the workers' queue.
    jobs = {"stream": keys.jobs_local, "group": GROUP_GPU_WORKERS}
    before = await scrape(client)
    assert value(before, "gengui_generations", status="submitted", provider="local") == 0
    assert value(before, "gengui_metrics_source_up", source="redis") == 1
    assert value(before, "gengui_metrics_source_up", source="postgres") == 1

    created = await client.post("/api/v1/generations", json=BODY, headers=alice.headers)
    assert created.status == 202
    gid = (await created.json())["id"]
    submitted = await scrape(client)
    assert value(submitted, "gengui_generations", status="submitted", provider="local") == 1
    assert value(submitted, "gengui_stream_length", stream=keys.jobs_local) == 1

    loops = {**consumer_loops(rt), **worker_loops(rt, load_engine("placeholder"))}
    async with running(loops):
        done = await wait_for_status(
            client, alice, gid, {"completed"}, timeout_s=20, need_thumbnail=True
        )
        image = await client.get(done["image_url"], headers={**alice.headers, "X-Request-ID": "r1"})
        assert image.status == 200
        # A file response is prepared outside the middleware; it still carries the id.
        assert image.headers["X-Request-ID"] == "r1"
        after = await scrape(client)

    assert value(after, "gengui_generations", status="submitted", provider="local") == 0
    for name in ("gengui_stream_consumed_total", "gengui_stream_acked_total"):
        assert value(after, name, **jobs) - value(before, name, **jobs) == 1, name
    handled = "gengui_stream_handler_duration_seconds_count"
    assert value(after, handled, **jobs) - value(before, handled, **jobs) == 1
    status_stream = {"stream": keys.job_status, "group": "status-processors"}
    assert value(after, "gengui_stream_acked_total", **status_stream) > value(
        before, "gengui_stream_acked_total", **status_stream
    )
    # The group read everything and acked it: nothing lags, nothing pending.
    assert value(after, "gengui_stream_group_lag", **jobs) == 0
    assert value(after, "gengui_stream_group_pending", **jobs) == 0
    assert ("gengui_stream_group_pending", frozenset(jobs.items())) in after
    assert value(after, "gengui_dead_letters") == 0
    # Finished generations and their submit -> completed duration, by provider.
    finished = "gengui_generations_finished_total"
    labels = {"status": "completed", "provider": "local"}
    assert value(after, finished, **labels) - value(before, finished, **labels) == 1
    duration = "gengui_generation_duration_seconds_count"
    assert value(after, duration, provider="local") - value(before, duration, provider="local") == 1


async def test_dead_letters_are_counted(client, rt: Runtime) -> None:
    from consumers.runner import consumer_loops

    fresh(client)
    keys = rt.settings.keys
    labels = {"stream": keys.requested, "group": GROUP_DISPATCHERS}
    before = await scrape(client)
    await rt.redis.xadd(keys.requested, {b"__data__": b"not json"})  # poison
    async with running(consumer_loops(rt, roles=["dispatch"])):
        async with asyncio.timeout(10):
            while not await rt.redis.xlen(keys.dead):
                await asyncio.sleep(0.02)
    after = await scrape(client)
    assert value(after, "gengui_dead_letters") == 1
    name = "gengui_stream_dead_lettered_total"
    assert value(after, name, **labels) - value(before, name, **labels) == 1


async def test_cluster_state_is_cached_for_its_ttl(client, rt: Runtime) -> None:
    client.app[cluster_collector_key].ttl_s = 3600
    keys = rt.settings.keys
    first = await scrape(client)
    await rt.publisher.send(
        keys.requested, GenerationRequested(generation_id=uuid.uuid4(), attempt=1)
    )
    cached = await scrape(client)
    assert value(cached, "gengui_stream_length", stream=keys.requested) == value(
        first, "gengui_stream_length", stream=keys.requested
    )
    fresh(client)
    live = await scrape(client)
    assert (
        value(live, "gengui_stream_length", stream=keys.requested)
        == value(first, "gengui_stream_length", stream=keys.requested) + 1
    )


async def test_a_failing_source_is_reported_and_the_rest_still_answers(rt: Runtime) -> None:
    from aiohttp.test_utils import TestClient, TestServer

    from core.db import create_pool

    assert rt.settings.database_url
    closed = await create_pool(rt.settings.database_url, max_size=1)
    await closed.close()  # a real pool that can no longer answer
    broken = Runtime(rt.settings, closed, rt.redis, rt.publisher, rt.storage)
    async with TestClient(TestServer(create_app(rt.settings, broken))) as c:
        resp = await c.get("/metrics")
        assert resp.status == 200
        samples = parse(await resp.text())
    assert value(samples, "gengui_metrics_source_up", source="postgres") == 0
    assert value(samples, "gengui_metrics_source_up", source="redis") == 1
    assert not any(name == "gengui_generations" for name, _ in samples)


async def test_openmetrics_is_negotiated(client) -> None:
    resp = await client.get("/metrics", headers={"Accept": "application/openmetrics-text"})
    assert resp.status == 200
    assert resp.content_type == "application/openmetrics-text"
    assert (await resp.text()).rstrip().endswith("# EOF")


async def test_a_process_metrics_port_serves_metrics_and_health(rt: Runtime) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    metrics.RECONCILER_RECOVERIES.labels("requeue").inc(0)  # make the series exist
    stop = asyncio.Event()
    server = asyncio.create_task(metrics.serve_metrics("127.0.0.1", port, stop))
    try:
        async with aiohttp.ClientSession() as http:
            async with asyncio.timeout(10):
                while True:
                    try:
                        async with http.get(f"http://127.0.0.1:{port}/healthz") as resp:
                            assert resp.status == 200
                            break
                    except aiohttp.ClientConnectionError:
                        await asyncio.sleep(0.02)
            async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
                assert resp.status == 200
                text = await resp.text()
    finally:
        stop.set()
        await asyncio.wait_for(server, 5)
    samples = parse(text)
    assert ("gengui_reconciler_recoveries_total", frozenset({("reason", "requeue")})) in samples
    assert "process_cpu_seconds_total" in {name for name, _ in samples}
