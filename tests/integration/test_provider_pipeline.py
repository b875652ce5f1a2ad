"""The provider contract, end to end: every adapter through the whole pipeline.

Real processes' parts, in-process: the API on a real port (webhooks reach it over
HTTP), the consumers and the reconciler, and ``gengui mock-providers`` on another
port speaking RunPod, Replicate, Gemini and OpenAI. Each case is a named behaviour
of the issue's acceptance list; the mock is steered per job by directives in the
prompt (``[mock:fail]``, ``[mock:nowebhook]``, ...).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from pydantic import SecretStr

from consumers.runner import consumer_loops
from core.api.app import create_app
from core.runtime import Runtime
from core.webhooks import webhook_secret, webhook_url
from providers.mock.config import DEFAULT_REPLICATE_SECRET, MockConfig
from providers.mock.server import create_mock_app
from providers.registry import open_providers
from reconciler.loop import Reconciler
from tests.conftest import UserAuth, running

ALL = ["runpod", "replicate", "gemini", "openai"]
REMOTE = ["runpod", "replicate"]
TERMINAL = {"completed", "failed", "cancelled"}


async def _serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, shutdown_timeout=2)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}"


@dataclasses.dataclass
class Stack:
    rt: Runtime
    api: aiohttp.ClientSession
    mock: aiohttp.ClientSession
    user: UserAuth

    async def create(self, prompt: str) -> str:
        body = {"prompt": prompt, "width": 256, "height": 256}
        async with self.api.post(
            "/api/v1/generations", json=body, headers=self.user.headers
        ) as resp:
            assert resp.status == 202, await resp.text()
            return str((await resp.json())["id"])

    async def get(self, gid: str) -> dict[str, Any]:
        async with self.api.get(f"/api/v1/generations/{gid}", headers=self.user.headers) as resp:
            assert resp.status == 200
            return dict(await resp.json())

    async def wait(
        self, gid: str, statuses: set[str], *, timeout_s: float = 15, thumbnail: bool = False
    ) -> dict[str, Any]:
        async with asyncio.timeout(timeout_s):
            while True:
                body = await self.get(gid)
                if body["status"] in statuses and (not thumbnail or body["thumbnail_url"]):
                    return body
                await asyncio.sleep(0.05)

    async def row(self, gid: str) -> Any:
        return await self.rt.pool.fetchrow(
            "SELECT * FROM generations WHERE id = $1", uuid.UUID(gid)
        )

    async def mock_jobs(self) -> list[dict[str, Any]]:
        async with self.mock.get("/_mock/jobs") as resp:
            return list((await resp.json())["jobs"])

    async def objects(self, gid: str) -> list[str]:
        return await self.rt.storage.list_keys(f"users/{self.user.user_id}/generations/{gid}/")


@contextlib.asynccontextmanager
async def stack(
    rt: Runtime, user: UserAuth, provider: str, **settings: Any
) -> AsyncIterator[Stack]:
    mock_runner, mock_url = await _serve(
        create_mock_app(MockConfig(webhook_retries=1, webhook_retry_delay_s=0.1))
    )
    base = rt.settings.model_copy(
        update={
            "default_provider": provider,
            "runpod_api_url": f"{mock_url}/v2",
            "runpod_endpoint_id": "endpoint",
            "runpod_api_key": SecretStr("rp-key"),
            "replicate_api_url": mock_url,
            "replicate_api_token": SecretStr("r8-key"),
            "replicate_webhook_secret": SecretStr(DEFAULT_REPLICATE_SECRET),
            "gemini_api_url": mock_url,
            "gemini_api_key": SecretStr("g-key"),
            "openai_api_url": mock_url,
            "openai_api_key": SecretStr("o-key"),
            "download_allow_http": True,
            "download_hosts": ("127.0.0.1",),
            "provider_timeout_s": 1.0,
            "runpod_check_s": 0.3,
            "replicate_check_s": 0.3,
            "dispatch_grace_s": 0.5,
            "retry_base_s": 0.05,
            "retry_cap_s": 0.2,
            **settings,
        }
    )
    api_rt = dataclasses.replace(rt, settings=base)
    api_runner, api_url = await _serve(create_app(base, api_rt))
    # Dispatchers hand providers webhook URLs on the API's real address.
    work_rt = dataclasses.replace(rt, settings=base.model_copy(update={"public_url": api_url}))
    try:
        async with (
            open_providers(work_rt.settings, work_rt.publisher) as providers,
            aiohttp.ClientSession(api_url) as api,
            aiohttp.ClientSession(mock_url) as mock,
        ):
            loops = {
                **consumer_loops(work_rt, providers),
                "reconciler": Reconciler(work_rt, providers).run,
            }
            async with running(loops):
                yield Stack(work_rt, api, mock, user)
    finally:
        await api_runner.cleanup()
        await mock_runner.cleanup()


@pytest.mark.parametrize("provider", ALL)
async def test_success_stores_one_image_and_a_thumbnail(
    rt: Runtime, alice: UserAuth, provider: str
) -> None:
    async with stack(rt, alice, provider) as s:
        gid = await s.create("a lighthouse at dusk")
        body = await s.wait(gid, TERMINAL, thumbnail=True)
        assert (body["status"], body["provider"]) == ("completed", provider)
        async with s.api.get(f"/api/v1/generations/{gid}/image", headers=alice.headers) as resp:
            assert resp.status == 200
            assert (await resp.read()).startswith(b"\x89PNG")
        objects = await s.objects(gid)
        assert len(objects) == 2 and any(k.endswith("original.png") for k in objects)
        if provider in REMOTE:
            assert (await s.row(gid))["provider_job_id"]


@pytest.mark.parametrize("provider", ALL)
async def test_permanent_failure_fails_at_once(rt: Runtime, alice: UserAuth, provider: str) -> None:
    async with stack(rt, alice, provider) as s:
        gid = await s.create("refused [mock:fail]")
        body = await s.wait(gid, TERMINAL)
        assert body["status"] == "failed"
        row = await s.row(gid)
        assert row["attempt"] == 1, "a permanent failure is not retried"
        assert row["error_code"]
        assert await s.objects(gid) == []


@pytest.mark.parametrize("provider", ALL)
async def test_retryable_failure_is_retried_then_fails(
    rt: Runtime, alice: UserAuth, provider: str
) -> None:
    async with stack(rt, alice, provider) as s:
        gid = await s.create("flaky [mock:retryable]")
        body = await s.wait(gid, TERMINAL)
        assert body["status"] == "failed"
        row = await s.row(gid)
        assert row["attempt"] == rt.settings.max_attempts
        assert await s.objects(gid) == []


@pytest.mark.parametrize("provider", ALL)
async def test_timeout_is_retryable(rt: Runtime, alice: UserAuth, provider: str) -> None:
    async with stack(rt, alice, provider, max_attempts=2) as s:
        gid = await s.create("slow [mock:timeout]")
        body = await s.wait(gid, TERMINAL)
        assert body["status"] == "failed"
        row = await s.row(gid)
        assert row["attempt"] == 2
        assert "timeout" in row["error_code"] or row["error_code"] == "no_result"


@pytest.mark.parametrize("provider", REMOTE)
async def test_cancel_reaches_the_provider(rt: Runtime, alice: UserAuth, provider: str) -> None:
    async with stack(rt, alice, provider) as s:
        gid = await s.create("forever [mock:stuck]")
        async with asyncio.timeout(10):
            while not (await s.row(gid))["provider_job_id"]:
                await asyncio.sleep(0.05)
        job_id = (await s.row(gid))["provider_job_id"]
        async with s.api.post(f"/api/v1/generations/{gid}/cancel", headers=alice.headers) as r:
            assert r.status == 200
            assert (await r.json())["status"] == "cancelled"
        async with asyncio.timeout(10):
            while True:
                jobs = {j["id"]: j for j in await s.mock_jobs()}
                if jobs[job_id]["cancel_requests"]:
                    break
                await asyncio.sleep(0.05)
        assert (await s.get(gid))["status"] == "cancelled"


@pytest.mark.parametrize("provider", REMOTE)
async def test_lost_webhook_is_found_by_polling(
    rt: Runtime, alice: UserAuth, provider: str
) -> None:
    async with stack(rt, alice, provider) as s:
        gid = await s.create("quiet [mock:nowebhook]")
        body = await s.wait(gid, TERMINAL, thumbnail=True)
        assert body["status"] == "completed"
        (job,) = await s.mock_jobs()
        assert job["deliveries"] == []  # nothing was ever delivered: the poll found it


@pytest.mark.parametrize("provider", REMOTE)
async def test_duplicate_and_late_webhooks_change_nothing(
    rt: Runtime, alice: UserAuth, provider: str
) -> None:
    async with stack(rt, alice, provider, runpod_check_s=30.0, replicate_check_s=30.0) as s:
        gid = await s.create("twice [mock:dupwebhook]")
        await s.wait(gid, TERMINAL, thumbnail=True)
        async with asyncio.timeout(10):
            while len((await s.mock_jobs())[0]["deliveries"]) < 2:
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # let the second delivery's report be processed
        completions = await rt.pool.fetchval(
            "SELECT count(*) FROM generation_events WHERE generation_id = $1"
            " AND status = 'completed'",
            uuid.UUID(gid),
        )
        assert completions == 1
        assert len(await s.objects(gid)) == 2  # one image, one thumbnail


async def test_result_of_an_older_attempt_is_ignored(rt: Runtime, alice: UserAuth) -> None:
    """A properly signed webhook for attempt 1 arrives after attempt 2 started."""
    async with stack(rt, alice, "runpod") as s:
        gid = await s.create("again [mock:stuck]")
        async with asyncio.timeout(10):
            while not (await s.row(gid))["provider_job_id"]:
                await asyncio.sleep(0.05)
        await rt.pool.execute(
            "UPDATE generations SET attempt = 2, status = 'submitted' WHERE id = $1",
            uuid.UUID(gid),
        )
        secret = webhook_secret(s.rt.settings)
        url = webhook_url(s.rt.settings, secret, "runpod", uuid.UUID(gid), 1)
        png = await _png_b64()
        body = {"id": "x", "status": "COMPLETED", "output": {"image_base64": png}}
        async with aiohttp.ClientSession() as http, http.post(url, json=body) as resp:
            assert resp.status == 200
            assert (await resp.json())["status"] == "ignored"
        row = await s.row(gid)
        assert (row["status"], row["image_key"]) == ("submitted", None)
        assert await s.objects(gid) == []


@pytest.mark.parametrize("provider", REMOTE)
async def test_bad_signatures_are_401_and_change_nothing(
    rt: Runtime, alice: UserAuth, provider: str
) -> None:
    async with stack(rt, alice, provider) as s:
        gid = await s.create("wait [mock:stuck]")
        async with asyncio.timeout(10):
            while not (await s.row(gid))["provider_job_id"]:
                await asyncio.sleep(0.05)
        before = await s.row(gid)
        secret = webhook_secret(s.rt.settings)
        good = webhook_url(s.rt.settings, secret, provider, uuid.UUID(gid), 1)
        png = await _png_b64()
        body = (
            {"id": "x", "status": "COMPLETED", "output": {"image_base64": png}}
            if provider == "runpod"
            else {"id": "x", "status": "succeeded", "output": ["http://127.0.0.1:1/x.png"]}
        )
        forged = [
            good.replace("sig=", "sig=00"),  # not our HMAC
            good.replace("attempt=1", "attempt=2"),  # signed for another attempt
            good.replace(gid, str(uuid.uuid4())),  # signed for another generation
        ]
        async with aiohttp.ClientSession() as http:
            for url in forged:
                async with http.post(url, json=body) as resp:
                    assert resp.status in (401, 404)
                    assert (await resp.json())["error"]["code"] in (
                        "invalid_signature",
                        "not_found",
                    )
            if provider == "replicate":
                # Our URL is right, but Replicate's own signature headers are missing.
                async with http.post(good, json=body) as resp:
                    assert resp.status == 401
        after = await s.row(gid)
        assert (after["status"], after["image_key"], after["updated_at"]) == (
            before["status"],
            before["image_key"],
            before["updated_at"],
        )
        assert await s.objects(gid) == []


async def test_provider_that_never_answers_is_retried_then_failed_by_deadline(
    rt: Runtime, alice: UserAuth
) -> None:
    async with stack(
        rt, alice, "openai", generation_deadline_s=3, max_attempts=50, reconcile_interval_s=0.2
    ) as s:
        gid = await s.create("silence [mock:hang]")
        body = await s.wait(gid, TERMINAL, timeout_s=15)
        row = await s.row(gid)
        assert (body["status"], row["error_code"]) == ("failed", "timed_out")
        assert row["attempt"] >= 2, "each unanswered call was retried until the deadline"


async def _png_b64() -> str:
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


async def test_oversized_webhook_body_is_413_and_changes_nothing(
    rt: Runtime, alice: UserAuth
) -> None:
    async with stack(rt, alice, "runpod", download_max_bytes=1024) as s:
        gid = await s.create("big [mock:stuck]")
        async with asyncio.timeout(10):
            while not (await s.row(gid))["provider_job_id"]:
                await asyncio.sleep(0.05)
        url = webhook_url(s.rt.settings, webhook_secret(s.rt.settings), "runpod", uuid.UUID(gid), 1)
        body = {"id": "x", "status": "COMPLETED", "output": {"image_base64": "A" * 200_000}}
        async with aiohttp.ClientSession() as http, http.post(url, json=body) as resp:
            assert resp.status == 413
            assert (await resp.json())["error"]["code"] == "payload_too_large"
        row = await s.row(gid)
        assert (row["status"], row["image_key"]) == ("submitted", None)
