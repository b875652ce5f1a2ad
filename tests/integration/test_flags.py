"""Feature flag ``image_provider`` against a GrowthBook over real HTTP (tests/fakes).

Generations are created through the API on real Postgres + Redis; only the chosen
``provider`` and ``flag_rule`` are checked (nothing dispatches: rows stay queued).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer

from core.api.app import create_app
from core.auth import create_user, issue_token
from core.runtime import Runtime
from tests.conftest import UserAuth
from tests.fakes.growthbook import FakeGrowthBook, Push, Unavailable, provider_flag

BODY = {"prompt": "a lighthouse at dusk"}
WAIT_S = 10  # generous: a flip normally lands in well under a second

PRO_OPENAI = {"id": "fr_pro", "condition": {"plan": "pro"}, "force": "openai"}


@pytest_asyncio.fixture
async def gb() -> AsyncIterator[FakeGrowthBook]:
    async with FakeGrowthBook(provider_flag("local")) as fake:
        yield fake


@contextlib.asynccontextmanager
async def api(rt: Runtime, **overrides: Any) -> AsyncIterator[TestClient]:
    """The real app, with settings changed as given (its selector is built from them)."""
    settings = rt.settings.model_copy(update=overrides)
    app = create_app(settings, dataclasses.replace(rt, settings=settings))
    async with TestClient(TestServer(app)) as client:
        yield client


def growthbook(gb: FakeGrowthBook, **overrides: Any) -> dict[str, Any]:
    return {
        "growthbook_api_host": gb.url,
        "growthbook_client_key": gb.client_key,
        "growthbook_streaming": True,
        "growthbook_refresh_s": 3600.0,  # polling out of the way unless a test wants it
        **overrides,
    }


async def user(rt: Runtime, email: str, plan: str = "free") -> UserAuth:
    user_id = await create_user(rt.pool, email, plan)
    return UserAuth(user_id, await issue_token(rt.pool, user_id))


async def generate(client: TestClient, rt: Runtime, auth: UserAuth) -> tuple[str, str | None]:
    """Create a generation; its (provider, flag_rule) as stored."""
    resp = await client.post("/api/v1/generations", json=BODY, headers=auth.headers)
    assert resp.status == 202, await resp.text()
    body = await resp.json()
    row = await rt.pool.fetchrow(
        "SELECT provider, flag_rule FROM generations WHERE id = $1", uuid.UUID(body["id"])
    )
    assert row is not None and row["provider"] == body["provider"]
    return row["provider"], row["flag_rule"]


async def until_provider(
    client: TestClient,
    rt: Runtime,
    auth: UserAuth,
    provider: str,
) -> str | None:
    """New generations until one goes to ``provider`` (bounded); its flag rule."""
    async with asyncio.timeout(WAIT_S):
        while True:
            got, rule = await generate(client, rt, auth)
            if got == provider:
                return rule
            await asyncio.sleep(0.05)


async def until(predicate: Callable[[], bool]) -> None:
    async with asyncio.timeout(WAIT_S):
        while not predicate():
            await asyncio.sleep(0.01)


async def until_asked(gb: FakeGrowthBook, route: str, *, times: int) -> None:
    """Until ``route`` has been requested ``times`` more times from now."""
    target = gb.requests[route] + times
    await until(lambda: gb.requests[route] >= target)


# ---- switching at runtime -------------------------------------------------------------


@pytest.mark.parametrize("push", ["features", "features-updated"])
async def test_a_flip_pushed_over_the_stream_moves_new_generations(
    rt: Runtime, gb: FakeGrowthBook, push: Push
) -> None:
    alice = await user(rt, "alice@example.com")
    async with api(rt, **growthbook(gb)) as client:
        # Connected, and done with the fetch it makes on (re)connecting: from here on
        # only the stream can tell it about a change (polling is hourly).
        await until(lambda: gb.subscribers == 1 and gb.requests["features"] >= 2)
        assert await generate(client, rt, alice) == ("local", "growthbook:default")
        fetches = gb.requests["features"]

        gb.set_features(provider_flag("openai"), push=push)

        assert await until_provider(client, rt, alice, "openai") == "growthbook:default"
        assert await generate(client, rt, alice) == ("openai", "growthbook:default")
        if push == "features":
            assert gb.requests["features"] == fetches  # the payload came in the event
        else:
            assert gb.requests["features"] > fetches  # "fetch again" was obeyed


async def test_a_flip_is_picked_up_by_polling_without_a_stream(
    rt: Runtime, gb: FakeGrowthBook
) -> None:
    alice = await user(rt, "alice@example.com")
    settings = growthbook(gb, growthbook_streaming=False, growthbook_refresh_s=0.2)
    async with api(rt, **settings) as client:
        assert await generate(client, rt, alice) == ("local", "growthbook:default")

        gb.set_features(provider_flag("replicate", PRO_OPENAI), push=None)

        assert await until_provider(client, rt, alice, "replicate") == "growthbook:default"
        assert gb.requests["sub"] == 0


# ---- targeting ------------------------------------------------------------------------


async def test_targeting_by_plan_email_and_id(rt: Runtime, gb: FakeGrowthBook) -> None:
    free = await user(rt, "free@example.com")
    pro = await user(rt, "pro@example.com", plan="pro")
    staff = await user(rt, "ops@staff.example")  # free plan, but staff
    chosen = await user(rt, "chosen@example.com", plan="pro")
    gb.set_features(
        provider_flag(
            "local",
            {"id": "fr_user", "condition": {"id": str(chosen.user_id)}, "force": "runpod"},
            {
                "id": "fr_staff",
                "condition": {"email": {"$regex": r"@staff\.example$"}},
                "force": "gemini",
            },
            PRO_OPENAI,
        ),
        push=None,
    )
    async with api(rt, **growthbook(gb)) as client:
        assert await generate(client, rt, free) == ("local", "growthbook:default")
        assert await generate(client, rt, pro) == ("openai", "growthbook:fr_pro")
        assert await generate(client, rt, staff) == ("gemini", "growthbook:fr_staff")
        assert await generate(client, rt, chosen) == ("runpod", "growthbook:fr_user")


async def test_a_value_that_names_no_provider_falls_back_to_the_default(
    rt: Runtime, gb: FakeGrowthBook
) -> None:
    alice = await user(rt, "alice@example.com")
    gb.set_features(provider_flag("dall-e-9"), push=None)
    async with api(rt, **growthbook(gb), default_provider="gemini") as client:
        for _ in range(3):
            assert await generate(client, rt, alice) == ("gemini", "default:invalid_value")


# ---- GrowthBook down ------------------------------------------------------------------


async def test_growthbook_down_keeps_the_last_known_features(
    rt: Runtime, gb: FakeGrowthBook
) -> None:
    free = await user(rt, "free@example.com")
    pro = await user(rt, "pro@example.com", plan="pro")
    gb.set_features(provider_flag("local", PRO_OPENAI), push=None)
    expected = {
        free.user_id: ("local", "growthbook:default"),
        pro.user_id: ("openai", "growthbook:fr_pro"),
    }
    async with api(rt, **growthbook(gb, growthbook_refresh_s=0.2)) as client:
        for auth in (free, pro):
            assert await generate(client, rt, auth) == expected[auth.user_id]

        modes: tuple[Unavailable, ...] = (503, "drop")
        for how in modes:
            gb.set_unavailable(how)
            # It has asked (and been refused) at least twice since.
            await until_asked(gb, "features", times=2)
            for auth in (free, pro):
                assert await generate(client, rt, auth) == expected[auth.user_id]

        await gb.close()  # gone altogether: connections refused
        for _ in range(3):
            for auth in (free, pro):
                assert await generate(client, rt, auth) == expected[auth.user_id]


async def test_never_fetched_uses_the_flags_file_until_growthbook_answers(
    rt: Runtime, gb: FakeGrowthBook, tmp_path: Path
) -> None:
    free = await user(rt, "free@example.com")
    pro = await user(rt, "pro@example.com", plan="pro")
    flags_file = tmp_path / "features.json"
    file_rule = {"id": "fr_file_pro", "condition": {"plan": "pro"}, "force": "replicate"}
    flags_file.write_bytes(orjson.dumps({"features": provider_flag("gemini", file_rule)}))
    gb.set_unavailable(503)
    settings = growthbook(gb, growthbook_refresh_s=0.2, flags_file=flags_file)
    async with api(rt, **settings) as client:
        assert await generate(client, rt, free) == ("gemini", "flags_file:default")
        assert await generate(client, rt, pro) == ("replicate", "flags_file:fr_file_pro")

        gb.set_unavailable(None)  # GrowthBook answers now: its features win

        assert await until_provider(client, rt, free, "local") == "growthbook:default"
        assert await generate(client, rt, pro) == ("local", "growthbook:default")


async def test_neither_growthbook_nor_a_file_uses_the_default(
    rt: Runtime, gb: FakeGrowthBook
) -> None:
    alice = await user(rt, "alice@example.com")
    gb.set_unavailable(503)
    async with api(rt, **growthbook(gb), default_provider="runpod") as client:
        await until(lambda: gb.requests["features"] >= 1)
        assert await generate(client, rt, alice) == ("runpod", "default")


async def test_without_growthbook_configured_the_default_is_recorded(
    client: TestClient,
    rt: Runtime,
    alice: UserAuth,
) -> None:
    assert await generate(client, rt, alice) == (rt.settings.default_provider, "default")
