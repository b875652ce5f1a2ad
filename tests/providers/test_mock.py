"""The mock's own controls: config over HTTP, seeded failures, job and request logs,
bounded shutdown, and the ``gengui mock-providers`` command."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from dataclasses import replace

import aiohttp
import pytest

from core.cli import build_parser
from core.errors import ProviderError
from providers.mock import create_mock_app
from providers.mock.common import STATE
from providers.openai import OpenAIProvider
from providers.runpod import RunPodProvider
from tests.providers.conftest import (
    WAIT_S,
    Mock,
    make_job,
    mock_config,
    poll_until,
    serve,
    terminal,
)


async def outcomes(provider: OpenAIProvider, n: int) -> list[str]:
    results = []
    for i in range(n):
        try:
            await provider.generate(make_job(f"fox {i}"))
            results.append("ok")
        except ProviderError as exc:
            results.append(exc.code)
    return results


async def test_config_over_http_and_seeded_failures(
    http: aiohttp.ClientSession, mock: Mock
) -> None:
    async with http.post(f"{mock.url}/_mock/config", json={"failure_rate": 0.5, "seed": 42}) as r:
        assert r.status == 200
        assert (await r.json())["failure_rate"] == 0.5
    provider = OpenAIProvider(http, mock.url, "k", "gpt-image-1", 5)
    first = await outcomes(provider, 12)
    assert set(first) == {"ok", "provider_unavailable"}  # some of each at 0.5

    async with http.post(f"{mock.url}/_mock/reset") as r:  # re-seeds
        assert r.status == 200
    assert mock.requests() == []
    assert await outcomes(provider, 12) == first  # same seed, same jobs fail

    async with http.post(f"{mock.url}/_mock/config", json={"failure_rate": 7}) as r:
        assert r.status == 400
    async with http.post(f"{mock.url}/_mock/config", json={"failure_rate": 0}) as r:
        assert r.status == 200
    assert await outcomes(provider, 3) == ["ok"] * 3


async def test_job_and_request_logs(http: aiohttp.ClientSession, mock: Mock) -> None:
    headers = {"Authorization": "Bearer k"}
    body = {"input": {"prompt": "fox [mock:nowebhook]", "width": 64, "height": 64}}
    async with http.post(f"{mock.url}/v2/ep/runsync", json=body, headers=headers) as r:
        finished = await r.json()
    assert finished["status"] == "COMPLETED"
    assert finished["output"]["content_type"] == "image/png"

    async with http.get(f"{mock.url}/_mock/jobs", params={"provider": "runpod"}) as r:
        (job,) = (await r.json())["jobs"]
    assert (job["id"], job["status"], job["directives"]) == (
        finished["id"],
        "COMPLETED",
        ["nowebhook"],
    )
    async with http.get(f"{mock.url}/_mock/jobs/{job['id']}") as r:
        assert (await r.json())["prompt"] == "fox [mock:nowebhook]"
    async with http.get(f"{mock.url}/_mock/requests") as r:
        (entry,) = (await r.json())["requests"]
    assert entry["path"] == "/v2/ep/runsync"
    assert entry["auth"] is True and entry["status"] == 200
    assert "Authorization" not in str(entry) and "Bearer" not in str(entry)


async def test_missing_auth_is_refused_and_logged(http: aiohttp.ClientSession, mock: Mock) -> None:
    async with http.post(f"{mock.url}/v1/predictions", json={"input": {}}) as r:
        assert r.status == 401
        assert (await r.json())["title"] == "Unauthenticated"
    (entry,) = mock.requests(provider="replicate")
    assert (entry["auth"], entry["status"]) == (False, 401)


async def test_replicate_prefer_wait(http: aiohttp.ClientSession, mock: Mock) -> None:
    async with http.post(
        f"{mock.url}/v1/models/a/b/predictions",
        json={"input": {"prompt": "fox"}},
        headers={"Authorization": "Bearer t", "Prefer": "wait=5"},
    ) as r:
        assert r.status == 201
        prediction = await r.json()
    assert prediction["status"] == "succeeded"
    async with http.get(prediction["output"][0]) as r:
        assert r.status == 200
        assert (await r.read()).startswith(b"\x89PNG")


async def test_shutdown_releases_hung_requests(http: aiohttp.ClientSession) -> None:
    """A request held by [mock:hang] must not hold the server's shutdown for its hang."""
    runner, url = await serve(create_mock_app(mock_config(hang_s=600)))
    request = asyncio.create_task(
        http.post(
            f"{url}/v1/images/generations",
            json={"model": "gpt-image-1", "prompt": "x [mock:hang]", "size": "1024x1024"},
            headers={"Authorization": "Bearer k"},
        )
    )
    app = runner.app
    async with asyncio.timeout(WAIT_S):
        while not app[STATE].requests:
            await asyncio.sleep(0.01)
        await runner.cleanup()
        response = await request
    assert response.status == 503
    response.release()


def test_cli_parses_mock_providers() -> None:
    args = build_parser().parse_args(
        ["mock-providers", "--port", "9000", "--latency", "0.1", "--failure-rate", "0.2"]
    )
    assert (args.command, args.host, args.port, args.latency, args.failure_rate) == (
        "mock-providers",
        "127.0.0.1",
        9000,
        0.1,
        0.2,
    )


@pytest.mark.e2e
async def test_gengui_mock_providers_command(http: aiohttp.ClientSession) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "core.cli",
        "mock-providers",
        "--port",
        str(port),
        "--latency",
        "0",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "GENGUI_LOG_FORMAT": "json"},
    )
    try:
        async with asyncio.timeout(30):
            while True:
                try:
                    async with http.get(f"http://127.0.0.1:{port}/_mock/health") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.1)
        provider = OpenAIProvider(http, f"http://127.0.0.1:{port}", "k", "gpt-image-1", 5)
        assert (await provider.generate(make_job())).state == "completed"
    finally:
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            _, stderr = await proc.communicate()
    assert proc.returncode == 0, stderr.decode()[-2000:]
    assert b"mock.listening" in stderr


async def test_old_finished_jobs_are_forgotten(http: aiohttp.ClientSession) -> None:
    runner, url = await serve(create_mock_app(mock_config(max_jobs=3)))
    try:
        provider = RunPodProvider(http, f"{url}/v2", "ep", "k", 60, 600, 5)
        ids = []
        for i in range(5):
            job = make_job(f"fox {i}")
            ids.append((await provider.submit(job)).provider_job_id)
            job = replace(job, provider_job_id=ids[-1])
            await poll_until(provider, job, terminal)
        lost = await provider.poll(replace(make_job(), provider_job_id=ids[0]))
        kept = await provider.poll(replace(make_job(), provider_job_id=ids[-1]))
    finally:
        await runner.cleanup()
    assert lost.failure is not None and lost.failure.code == "provider_job_lost"
    assert kept.state == "completed"
