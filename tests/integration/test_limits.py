"""Limits hold under concurrency on real Postgres and Redis: active generations per
user, daily quota by plan, requests per minute, and per-IP sign-up requests. Each
refusal is a 429 with a code and Retry-After; none is check-then-act."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from argon2 import PasswordHasher

from core import passwords
from core.api.app import create_app
from core.auth import create_user, issue_token
from core.runtime import Runtime
from tests.conftest import UserAuth

BODY = {"prompt": "a lighthouse at dusk"}


@pytest.fixture(autouse=True)
def cheap_argon2(monkeypatch: pytest.MonkeyPatch) -> None:
    # Sign-ups hash passwords; the limits, not the hash cost, are under test here.
    monkeypatch.setattr(
        passwords, "_hasher", PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
    )


@contextlib.asynccontextmanager
async def api(rt: Runtime, **overrides: Any) -> AsyncIterator[TestClient]:  # type: ignore[type-arg]
    settings = rt.settings.model_copy(update=overrides)
    app = create_app(settings, dataclasses.replace(rt, settings=settings))
    async with TestClient(TestServer(app)) as client:
        yield client


async def create(client: TestClient, auth: UserAuth, **headers: str) -> Any:  # type: ignore[type-arg]
    return await client.post("/api/v1/generations", json=BODY, headers={**auth.headers, **headers})


async def count(rt: Runtime, user: UserAuth) -> int:
    return int(
        await rt.pool.fetchval("SELECT count(*) FROM generations WHERE user_id = $1", user.user_id)
    )


async def refusal(resp: Any, code: str) -> dict[str, Any]:
    assert resp.status == 429, await resp.text()
    body = await resp.json()
    assert body["error"]["code"] == code
    assert int(resp.headers["Retry-After"]) >= 1
    assert body["error"]["details"]["retry_after_s"] == int(resp.headers["Retry-After"])
    return body  # type: ignore[no-any-return]


# ---- active generations --------------------------------------------------------------------


async def test_50_parallel_creates_against_a_limit_of_5_active_accept_exactly_5(
    rt: Runtime, alice: UserAuth, bob: UserAuth
) -> None:
    async with api(rt, max_active_generations=5) as client:
        responses = await asyncio.gather(*(create(client, alice) for _ in range(50)))
        statuses = [r.status for r in responses]
        assert statuses.count(202) == 5 and statuses.count(429) == 45
        for resp in responses:
            if resp.status == 429:
                await refusal(resp, "too_many_active")
        assert await count(rt, alice) == 5
        # Sent to the workers exactly once each: refused creates leave nothing behind.
        assert await rt.redis.xlen(rt.settings.keys.jobs_local) == 5
        # The limit is per user.
        assert (await create(client, bob)).status == 202


async def test_a_finished_or_cancelled_generation_frees_its_slot(
    rt: Runtime, alice: UserAuth
) -> None:
    async with api(rt, max_active_generations=2) as client:
        ids = [(await (await create(client, alice)).json())["id"] for _ in range(2)]
        await refusal(await create(client, alice), "too_many_active")
        cancelled = await client.post(f"/api/v1/generations/{ids[0]}/cancel", headers=alice.headers)
        assert cancelled.status == 200
        assert (await create(client, alice)).status == 202
        await refusal(await create(client, alice), "too_many_active")
        await rt.pool.execute(
            "UPDATE generations SET status = 'completed' WHERE id = $1", uuid.UUID(ids[1])
        )
        assert (await create(client, alice)).status == 202


async def test_an_idempotent_replay_is_neither_refused_nor_counted(
    rt: Runtime, alice: UserAuth
) -> None:
    async with api(rt, max_active_generations=1, plan_quotas={"free": 2}) as client:
        first = await create(client, alice, **{"Idempotency-Key": "k1"})
        assert first.status == 202
        gid = (await first.json())["id"]
        # At the active limit, 20 parallel replays still get the original.
        replays = await asyncio.gather(
            *(create(client, alice, **{"Idempotency-Key": "k1"}) for _ in range(20))
        )
        assert {r.status for r in replays} == {202}
        assert {(await r.json())["id"] for r in replays} == {gid}
        assert all(r.headers["Idempotent-Replayed"] == "true" for r in replays)
        await refusal(await create(client, alice, **{"Idempotency-Key": "k2"}), "too_many_active")
        # The same key with another body is still a conflict, not a limit.
        other = await client.post(
            "/api/v1/generations",
            json={"prompt": "something else"},
            headers={**alice.headers, "Idempotency-Key": "k1"},
        )
        assert other.status == 409
        assert await count(rt, alice) == 1
        await rt.pool.execute("UPDATE generations SET status = 'completed'")
        # Replays did not eat the daily quota of 2: one more fits, and then no more.
        assert (await create(client, alice)).status == 202
        await rt.pool.execute("UPDATE generations SET status = 'completed'")
        await refusal(await create(client, alice), "daily_quota")


# ---- daily quota -----------------------------------------------------------------------------


async def _user(rt: Runtime, email: str, plan: str) -> UserAuth:
    user_id = await create_user(rt.pool, email, plan)
    return UserAuth(user_id, await issue_token(rt.pool, user_id))


async def test_the_daily_quota_depends_on_the_plan_and_holds_under_concurrency(
    rt: Runtime,
) -> None:
    free = await _user(rt, "free@example.com", "free")
    pro = await _user(rt, "pro@example.com", "pro")
    odd = await _user(rt, "odd@example.com", "legacy")  # not in the table: the free quota
    async with api(rt, plan_quotas={"free": 3, "pro": 8}) as client:
        for user, quota in ((free, 3), (pro, 8), (odd, 3)):
            responses = await asyncio.gather(*(create(client, user) for _ in range(12)))
            statuses = [r.status for r in responses]
            assert statuses.count(202) == quota, user
            body = await refusal(next(r for r in responses if r.status == 429), "daily_quota")
            assert body["error"]["details"]["limit"] == quota
            assert await count(rt, user) == quota


async def test_the_quota_counts_cancelled_ones_and_resets_at_utc_midnight(
    rt: Runtime, alice: UserAuth
) -> None:
    async with api(rt, plan_quotas={"free": 2}) as client:
        for _ in range(2):
            gid = (await (await create(client, alice)).json())["id"]
            await client.post(f"/api/v1/generations/{gid}/cancel", headers=alice.headers)
        refused = await create(client, alice)
        await refusal(refused, "daily_quota")
        # Retry-After points at the next UTC midnight.
        seconds_left = await rt.pool.fetchval(
            """SELECT extract(epoch FROM date_trunc('day', now() AT TIME ZONE 'UTC')
                      + interval '1 day' - (now() AT TIME ZONE 'UTC'))"""
        )
        assert abs(int(refused.headers["Retry-After"]) - seconds_left) <= 2
        await rt.pool.execute(
            "UPDATE generations SET created_at = created_at - interval '1 day' WHERE user_id = $1",
            alice.user_id,
        )
        assert (await create(client, alice)).status == 202


# ---- requests per minute ------------------------------------------------------------------


async def test_requests_per_minute_hold_under_concurrency_and_per_user(
    rt: Runtime, alice: UserAuth, bob: UserAuth
) -> None:
    async with api(rt, requests_per_minute=5) as client:
        responses = await asyncio.gather(
            *(client.get("/api/v1/generations", headers=alice.headers) for _ in range(20))
        )
        assert sorted(r.status for r in responses) == [200] * 5 + [429] * 15
        limited = next(r for r in responses if r.status == 429)
        await refusal(limited, "rate_limited")
        assert int(limited.headers["Retry-After"]) <= 12  # one request's worth: 60 s / 5
        # Every authenticated route draws on the same budget.
        await refusal(await client.get("/api/v1/auth/me", headers=alice.headers), "rate_limited")
        await refusal(await create(client, alice), "rate_limited")
        assert await count(rt, alice) == 0
        # Bob has his own; unauthenticated requests are not counted against anyone.
        assert (await client.get("/api/v1/generations")).status == 401
        assert (await client.get("/api/v1/generations", headers=bob.headers)).status == 200


async def test_the_budget_refills_over_the_minute(rt: Runtime, alice: UserAuth) -> None:
    async with api(rt, requests_per_minute=2) as client:
        for _ in range(2):
            assert (await client.get("/api/v1/auth/me", headers=alice.headers)).status == 200
        await refusal(await client.get("/api/v1/auth/me", headers=alice.headers), "rate_limited")
        # Half a minute ago by the bucket's clock: one request's worth has come back.
        key = f"{rt.settings.stream_prefix}:limit:rpm:{alice.user_id}"
        at = int(await rt.redis.hget(key, "at"))
        await rt.redis.hset(key, "at", at - 30_000)
        assert (await client.get("/api/v1/auth/me", headers=alice.headers)).status == 200
        await refusal(await client.get("/api/v1/auth/me", headers=alice.headers), "rate_limited")


async def test_sign_ups_per_client_address_are_limited(rt: Runtime) -> None:
    async with api(rt, auth_requests_per_minute_per_ip=3) as client:
        responses = await asyncio.gather(
            *(
                client.post(
                    "/api/v1/auth/signup",
                    json={"email": f"n{i}@example.com", "password": "long enough password"},
                )
                for i in range(8)
            )
        )
        assert sorted(r.status for r in responses) == [202] * 3 + [429] * 5
        await refusal(next(r for r in responses if r.status == 429), "rate_limited")
        assert await rt.pool.fetchval("SELECT count(*) FROM users") == 3
        reset = await client.post("/api/v1/auth/password/reset", json={"email": "n0@example.com"})
        await refusal(reset, "rate_limited")


async def test_behind_a_proxy_the_forwarded_address_is_the_client(rt: Runtime) -> None:
    async with api(rt, auth_requests_per_minute_per_ip=1, proxy_hops=1) as client:

        async def signup(i: int, forwarded: str) -> Any:
            return await client.post(
                "/api/v1/auth/signup",
                json={"email": f"p{i}@example.com", "password": "long enough password"},
                headers={"X-Forwarded-For": forwarded},
            )

        assert (await signup(0, "203.0.113.1")).status == 202
        assert (await signup(1, "203.0.113.2")).status == 202  # another client
        # What the client itself put in front of the proxy's entry changes nothing.
        await refusal(await signup(2, "198.51.100.9, 203.0.113.1"), "rate_limited")
    async with api(rt, auth_requests_per_minute_per_ip=1) as client:
        # Without proxies configured the header is the client's word: ignored.
        first = await client.post(
            "/api/v1/auth/signup",
            json={"email": "q1@example.com", "password": "long enough password"},
            headers={"X-Forwarded-For": "203.0.113.7"},
        )
        second = await client.post(
            "/api/v1/auth/signup",
            json={"email": "q2@example.com", "password": "long enough password"},
            headers={"X-Forwarded-For": "203.0.113.8"},
        )
        assert first.status == 202
        await refusal(second, "rate_limited")
