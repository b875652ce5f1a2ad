"""The web client in a real headless Chromium (Debian's ``chromium``, driven by
Playwright for Python): the API on a real port in this process, its mail to a real
local SMTP server, the consumers running, and the placeholder worker when a test
wants images made.

Chromium comes from the project's setup (``make`` installs Debian's package), never
from ``playwright install``. Without it these tests fail, saying so: a browser test
that skips would hide a client nobody checked.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import pytest_asyncio
from aiohttp import web
from argon2 import PasswordHasher

from consumers.runner import consumer_loops
from core import passwords
from core.api.app import create_app
from core.runtime import Runtime
from providers.local.engines import load_engine
from providers.local.worker import worker_loops
from tests.conftest import running
from tests.fakes.smtp import FakeSMTP

if TYPE_CHECKING:
    from playwright.async_api import Browser

# Debian's package; CHROMIUM_PATH names another build of Chromium.
CHROMIUM = Path(os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"


@pytest.fixture(autouse=True)
def cheap_argon2(monkeypatch: pytest.MonkeyPatch) -> None:
    # Same algorithm at its smallest cost: the browser flow is what is tested here
    # (tests/integration/test_accounts.py checks the production parameters).
    monkeypatch.setattr(
        passwords, "_hasher", PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
    )
    monkeypatch.setattr(passwords, "_dummy_hash", None)


@pytest_asyncio.fixture
async def smtp() -> AsyncIterator[FakeSMTP]:
    async with FakeSMTP() as fake:
        yield fake


@dataclasses.dataclass
class Site:
    """The API serving the web client at ``url``, with consumers running."""

    url: str
    rt: Runtime

    @contextlib.asynccontextmanager
    async def worker(self) -> AsyncIterator[None]:
        """The placeholder GPU worker, for as long as a test wants images made."""
        async with running(worker_loops(self.rt, load_engine("placeholder"))):
            yield


@pytest_asyncio.fixture
async def site(rt: Runtime, smtp: FakeSMTP) -> AsyncIterator[Site]:
    # Bind first: the mailed links must name the port the browser will open.
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    settings = rt.settings.model_copy(update={**smtp.settings(), "public_url": url})
    runtime = dataclasses.replace(rt, settings=settings)
    runner = web.AppRunner(create_app(settings, runtime), shutdown_timeout=2)
    await runner.setup()
    try:
        await web.SockSite(runner, sock).start()
        async with running(consumer_loops(runtime)):
            yield Site(url, runtime)
    finally:
        await runner.cleanup()  # ends the open event streams too
        sock.close()


@pytest.fixture
def chromium() -> Path:
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} is missing: the browser tests need Debian's chromium package "
            "(`make` installs it as root; or `apt-get install -y chromium`)",
            pytrace=False,
        )
    return CHROMIUM


@pytest_asyncio.fixture
async def browser(chromium: Path) -> AsyncIterator[Browser]:
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        pytest.fail("playwright is missing: `pip install -e '.[dev]'` (or run `make`)")
    async with async_playwright() as pw:
        launched = await pw.chromium.launch(
            executable_path=str(chromium), args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield launched
        finally:
            await launched.close()
