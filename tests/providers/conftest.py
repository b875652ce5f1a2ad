"""The provider adapters against ``gengui mock-providers`` on a real port.

Everything here is HTTP over real sockets: the mock app, a webhook receiver standing
in for our webhook route, and a real ``aiohttp.ClientSession``. No database, no Redis.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

from providers.base import Job, Outcome, PollingProvider, Provider, SyncProvider
from providers.gemini import GeminiProvider
from providers.mock import MockConfig, create_mock_app
from providers.mock.common import STATE
from providers.mock.state import MockState
from providers.openai import OpenAIProvider
from providers.replicate import ReplicateProvider
from providers.runpod import RunPodProvider

WAIT_S = 10.0  # bound on waiting for something that should take milliseconds


async def serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=2)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    return runner, f"http://{host}:{port}"


@dataclass
class Mock:
    url: str
    app: web.Application

    @property
    def state(self) -> MockState:
        return self.app[STATE]

    @property
    def config(self) -> MockConfig:
        return self.state.config

    def requests(self, **match: Any) -> list[dict[str, Any]]:
        return [e for e in self.state.requests if all(e.get(k) == v for k, v in match.items())]


def mock_config(**overrides: Any) -> MockConfig:
    values: dict[str, Any] = {
        "latency_s": 0.0,
        "webhook_retry_delay_s": 0.05,
        "hang_s": 30.0,
    }
    values.update(overrides)
    return MockConfig(**values)


@pytest_asyncio.fixture
async def mock() -> AsyncIterator[Mock]:
    app = create_mock_app(mock_config())
    runner, url = await serve(app)
    yield Mock(url, app)
    await runner.cleanup()


@pytest_asyncio.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@dataclass(frozen=True)
class Delivery:
    headers: dict[str, str]
    body: bytes


@dataclass
class Hooks:
    """Our webhook route's stand-in: records every delivery per name. ``fail[name]``
    answers that many deliveries with a 500 first (to see the mock retry)."""

    url: str = ""
    deliveries: dict[str, list[Delivery]] = field(default_factory=dict)
    fail: dict[str, int] = field(default_factory=dict)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    def for_(self, name: str) -> str:
        return f"{self.url}/hook/{name}?attempt=1&sig=ours"

    async def receive(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        body = await request.read()
        if self.fail.get(name, 0) > 0:
            self.fail[name] -= 1
            async with self.changed:
                self.deliveries.setdefault(f"{name}:refused", []).append(
                    Delivery(dict(request.headers), body)
                )
                self.changed.notify_all()
            return web.Response(status=500)
        async with self.changed:
            self.deliveries.setdefault(name, []).append(Delivery(dict(request.headers), body))
            self.changed.notify_all()
        return web.json_response({"status": "ok"})

    async def wait(self, name: str, count: int = 1) -> list[Delivery]:
        async with asyncio.timeout(WAIT_S), self.changed:
            await self.changed.wait_for(lambda: len(self.deliveries.get(name, [])) >= count)
        return self.deliveries[name]

    def count(self, name: str) -> int:
        return len(self.deliveries.get(name, []))


@pytest_asyncio.fixture
async def hooks() -> AsyncIterator[Hooks]:
    h = Hooks()
    app = web.Application()
    app.router.add_post("/hook/{name}", h.receive)
    runner, h.url = await serve(app)
    yield h
    await runner.cleanup()


# -- the adapters under contract -------------------------------------------------------

Build = Callable[[aiohttp.ClientSession, str, float, str], Provider]


@dataclass(frozen=True)
class Adapter:
    id: str
    provider: str  # the name the mock logs requests under
    build: Build

    @property
    def polling(self) -> bool:
        return self.provider in ("runpod", "replicate")


ADAPTERS = (
    Adapter(
        "runpod",
        "runpod",
        lambda s, base, t, key: RunPodProvider(
            s, f"{base}/v2", "endpoint-1", key, execution_timeout_s=60, ttl_s=600, timeout_s=t
        ),
    ),
    Adapter(
        "replicate",
        "replicate",
        lambda s, base, t, key: ReplicateProvider(
            s, base, key, "black-forest-labs/flux-schnell", MockConfig().replicate_webhook_secret, t
        ),
    ),
    Adapter(
        "gemini-imagen",
        "gemini",
        lambda s, base, t, key: GeminiProvider(s, base, key, "imagen-4.0-generate-001", t),
    ),
    Adapter(
        "gemini-flash-image",
        "gemini",
        lambda s, base, t, key: GeminiProvider(s, base, key, "gemini-2.5-flash-image", t),
    ),
    Adapter(
        "openai-gpt-image",
        "openai",
        lambda s, base, t, key: OpenAIProvider(s, base, key, "gpt-image-1", t),
    ),
    Adapter(
        "openai-dall-e-3",
        "openai",
        lambda s, base, t, key: OpenAIProvider(s, base, key, "dall-e-3", t),
    ),
)
POLLING = tuple(a for a in ADAPTERS if a.polling)


def make_job(prompt: str = "a red fox in snow", **fields: Any) -> Job:
    values: dict[str, Any] = {
        "generation_id": uuid.uuid4(),
        "attempt": 1,
        "user_id": uuid.uuid4(),
        "prompt": prompt,
        "negative_prompt": None,
        "width": 512,
        "height": 384,
        "seed": 7,
    }
    values.update(fields)
    return Job(**values)


@dataclass
class Run:
    """One job taken to its end: the webhook's and the poll's view (polling), or the
    call's answer (sync)."""

    outcome: Outcome
    job: Job
    deliveries: list[Delivery] = field(default_factory=list)
    polled: Outcome | None = None


async def poll_until(
    provider: PollingProvider, job: Job, done: Callable[[Outcome], bool]
) -> Outcome:
    async with asyncio.timeout(WAIT_S):
        while True:
            outcome = await provider.poll(job)
            if done(outcome):
                return outcome
            await asyncio.sleep(0.02)


def terminal(outcome: Outcome) -> bool:
    return outcome.state in ("completed", "failed", "cancelled")


async def run_job(provider: Provider, job: Job, hooks: Hooks) -> Run:
    """Submit and follow one job to its end. Raises what submit/generate raise."""
    if isinstance(provider, SyncProvider):
        return Run(await provider.generate(job), job)
    assert isinstance(provider, PollingProvider)
    name = uuid.uuid4().hex
    submission = await provider.submit(job, webhook_url=hooks.for_(name))
    assert submission.provider_job_id
    job = replace(job, provider_job_id=submission.provider_job_id)
    deliveries = await hooks.wait(name)
    delivery = deliveries[0]
    assert provider.verify_webhook(delivery.headers, delivery.body)
    outcome = provider.parse_webhook(delivery.body)
    polled = await provider.poll(job)
    return Run(outcome, job, deliveries, polled)


@pytest.fixture(params=ADAPTERS, ids=[a.id for a in ADAPTERS])
def adapter(request: pytest.FixtureRequest) -> Adapter:
    return request.param


@pytest.fixture(params=POLLING, ids=[a.id for a in POLLING])
def polling_adapter(request: pytest.FixtureRequest) -> Adapter:
    return request.param
