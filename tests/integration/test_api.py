"""The REST API on real Postgres + Redis: validation, idempotency, ownership, pagination."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer, unused_port
from redis.backoff import NoBackoff
from redis.retry import Retry
from structlog.testing import capture_logs

from core.api.app import create_app
from core.api.generations import announcer_key
from core.events import GenerationRequested, LocalJob
from core.metrics import REGISTRY
from core.runtime import Runtime
from core.streams import Publisher, SharedRedis
from tests.conftest import UserAuth, make_user

BODY = {"prompt": "a red fox in snow"}


async def _count(rt: Runtime) -> int:
    return int(await rt.pool.fetchval("SELECT count(*) FROM generations"))


async def _jobs(rt: Runtime) -> list[LocalJob]:
    """The jobs on the local workers' queue, oldest first."""
    entries = await rt.redis.xrange(rt.settings.keys.jobs_local)
    return [LocalJob.model_validate_json(f[b"__data__"]) for _, f in entries]


async def _notices(rt: Runtime, user: UserAuth) -> list[tuple[str, str]]:
    """(type, generation id) of the user's notices, oldest first."""
    entries = await rt.redis.xrange(rt.settings.keys.user_events(user.user_id))
    notices = [orjson.loads(f[b"__data__"]) for _, f in entries]
    return [(n["type"], n["generation"]["id"]) for n in notices]


async def test_create_returns_202_with_the_resource_and_publishes(
    client, alice: UserAuth, rt: Runtime
) -> None:
    resp = await client.post("/api/v1/generations", json=BODY, headers=alice.headers)
    assert resp.status == 202
    body = await resp.json()
    assert resp.headers["Location"] == f"/api/v1/generations/{body['id']}"
    assert {
        "id",
        "status",
        "attempt",
        "provider",
        "prompt",
        "negative_prompt",
        "width",
        "height",
        "seed",
        "error",
        "image_url",
        "thumbnail_url",
        "created_at",
        "updated_at",
        "completed_at",
    } <= body.keys()
    # A local job goes straight to the workers' queue (Settings.api_dispatch).
    assert (body["width"], body["height"], body["status"]) == (1024, 1024, "submitted")
    assert body["provider"] == "local"
    assert 0 <= body["seed"] <= 2**32 - 1
    assert body["image_url"] is None and body["thumbnail_url"] is None
    [job] = await _jobs(rt)
    assert (job.generation_id, job.attempt, job.prompt, job.seed, job.user_id) == (
        uuid.UUID(body["id"]),
        1,
        BODY["prompt"],
        body["seed"],
        alice.user_id,
    )
    assert await _notices(rt, alice) == [("generation.submitted", body["id"])]
    assert await rt.redis.exists(rt.settings.keys.requested) == 0
    row = await rt.pool.fetchrow(
        "SELECT g.submitted_at, c.due_at - g.created_at AS check_in"
        " FROM generations g JOIN generation_checks c ON c.generation_id = g.id"
        " WHERE g.id = $1",
        uuid.UUID(body["id"]),
    )
    assert row["submitted_at"] is not None
    # Looked at after the local check interval, as a dispatcher's claim sets it.
    assert abs(row["check_in"].total_seconds() - rt.settings.local_check_s) < 5
    history = await rt.pool.fetch(
        "SELECT status FROM generation_events WHERE generation_id = $1", uuid.UUID(body["id"])
    )
    assert [h["status"] for h in history] == ["submitted"]


async def test_with_api_dispatch_off_a_create_is_queued_for_the_dispatchers(
    alice: UserAuth, rt: Runtime
) -> None:
    settings = rt.settings.model_copy(update={"api_dispatch": False})
    app = create_app(settings, dataclasses.replace(rt, settings=settings))
    async with TestClient(TestServer(app)) as c:
        resp = await c.post("/api/v1/generations", json=BODY, headers=alice.headers)
        assert resp.status == 202
        body = await resp.json()
    assert body["status"] == "queued"
    entries = await rt.redis.xrange(rt.settings.keys.requested)
    assert [GenerationRequested.model_validate_json(f[b"__data__"]) for _, f in entries] == [
        GenerationRequested(generation_id=uuid.UUID(body["id"]), attempt=1, provider="local")
    ]
    assert await _jobs(rt) == []
    assert await _notices(rt, alice) == [("generation.queued", body["id"])]


@pytest.mark.parametrize(
    ("body", "code", "field"),
    [
        ({}, "validation_error", "prompt"),
        ({"prompt": ""}, "validation_error", "prompt"),
        ({"prompt": "   "}, "validation_error", "prompt"),
        ({"prompt": "x" * 4001}, "validation_error", "prompt"),
        ({"prompt": "ok", "width": 300}, "validation_error", "width"),
        ({"prompt": "ok", "width": 192}, "validation_error", "width"),
        ({"prompt": "ok", "height": 2112}, "validation_error", "height"),
        ({"prompt": "ok", "seed": -1}, "validation_error", "seed"),
        ({"prompt": "ok", "seed": 2**32}, "validation_error", "seed"),
        ({"prompt": "ok", "width": "512"}, "validation_error", "width"),
        ({"prompt": "ok", "extra": 1}, "validation_error", "extra"),
        ({"prompt": "nul\x00byte"}, "validation_error", "prompt"),
        ({"prompt": 5}, "validation_error", "prompt"),
    ],
)
async def test_invalid_bodies_get_400_with_a_code_and_write_nothing(
    client, alice: UserAuth, rt: Runtime, body: dict, code: str, field: str
) -> None:
    resp = await client.post("/api/v1/generations", json=body, headers=alice.headers)
    assert resp.status == 400
    err = (await resp.json())["error"]
    assert err["code"] == code
    assert field in {d["field"] for d in err["details"]}
    assert await _count(rt) == 0
    assert await rt.redis.exists(rt.settings.keys.jobs_local, rt.settings.keys.requested) == 0


@pytest.mark.parametrize(
    ("data", "content_type", "code"),
    [
        (b"{not json", "application/json", "invalid_json"),
        (b"[1, 2]", "application/json", "invalid_json"),
        (b"prompt=x", "application/x-www-form-urlencoded", "unsupported_media_type"),
    ],
)
async def test_malformed_requests_get_400(
    client, alice: UserAuth, rt: Runtime, data: bytes, content_type: str, code: str
) -> None:
    resp = await client.post(
        "/api/v1/generations", data=data, headers={**alice.headers, "Content-Type": content_type}
    )
    assert resp.status == 400
    assert (await resp.json())["error"]["code"] == code
    assert await _count(rt) == 0


async def test_idempotency_key_replays_and_rejects_a_different_body(
    client, alice: UserAuth, rt: Runtime
) -> None:
    headers = {**alice.headers, "Idempotency-Key": "order-42"}
    first = await client.post("/api/v1/generations", json={**BODY, "seed": 1}, headers=headers)
    second = await client.post("/api/v1/generations", json={**BODY, "seed": 1}, headers=headers)
    assert first.status == second.status == 202
    assert (await first.json())["id"] == (await second.json())["id"]
    assert second.headers["Idempotent-Replayed"] == "true"
    other = await client.post("/api/v1/generations", json={**BODY, "seed": 2}, headers=headers)
    assert other.status == 409
    assert (await other.json())["error"]["code"] == "idempotency_key_reused"
    assert await _count(rt) == 1
    assert len(await _jobs(rt)) == 1


async def test_idempotency_key_under_concurrent_requests_creates_one(
    client, alice: UserAuth, rt: Runtime
) -> None:
    headers = {**alice.headers, "Idempotency-Key": "burst"}
    responses = await asyncio.gather(
        *(client.post("/api/v1/generations", json=BODY, headers=headers) for _ in range(10))
    )
    ids = {(await r.json())["id"] for r in responses}
    assert [r.status for r in responses] == [202] * 10
    assert len(ids) == 1 and await _count(rt) == 1


async def test_same_key_for_two_users_is_two_generations(
    client, alice: UserAuth, bob: UserAuth, rt: Runtime
) -> None:
    for user in (alice, bob):
        resp = await client.post(
            "/api/v1/generations", json=BODY, headers={**user.headers, "Idempotency-Key": "k"}
        )
        assert resp.status == 202
    assert await _count(rt) == 2


@pytest.mark.parametrize(
    "header", [None, "Bearer", "Bearer gg_not-a-token", "Basic dXNlcjpwYXNz", "gg_x"]
)
async def test_requests_without_a_valid_token_get_401(
    client, rt: Runtime, header: str | None
) -> None:
    headers = {"Authorization": header} if header else {}
    for method, path in [
        ("POST", "/api/v1/generations"),
        ("GET", "/api/v1/generations"),
        ("GET", "/api/v1/generations/latest"),
        ("GET", f"/api/v1/generations/{uuid.uuid4()}"),
    ]:
        resp = await client.request(method, path, json=BODY, headers=headers)
        assert resp.status == 401, (method, path)
        assert (await resp.json())["error"]["code"] in {"unauthorized", "invalid_token"}
    assert await _count(rt) == 0


async def test_revoked_token_is_refused(client, alice: UserAuth, rt: Runtime) -> None:
    await rt.pool.execute(
        "UPDATE api_tokens SET revoked_at = now() WHERE user_id = $1", alice.user_id
    )
    resp = await client.get("/api/v1/generations", headers=alice.headers)
    assert resp.status == 401


async def test_another_users_generation_is_404_everywhere(
    client, alice: UserAuth, bob: UserAuth, rt: Runtime
) -> None:
    created = await (
        await client.post("/api/v1/generations", json=BODY, headers=alice.headers)
    ).json()
    gid = created["id"]
    await rt.pool.execute(
        """UPDATE generations SET status = 'completed', image_key = 'k', thumbnail_key = 't'
            WHERE id = $1""",
        uuid.UUID(gid),
    )
    for path in [
        f"/api/v1/generations/{gid}",
        f"/api/v1/generations/{gid}/image",
        f"/api/v1/generations/{gid}/thumbnail",
    ]:
        resp = await client.get(path, headers=bob.headers)
        assert resp.status == 404, path
        body = await resp.json()
        assert body["error"]["code"] == "not_found"
        assert gid not in str(body)
    listing = await (await client.get("/api/v1/generations", headers=bob.headers)).json()
    assert listing == {"items": [], "next_cursor": None}
    assert (await client.get("/api/v1/generations/latest", headers=bob.headers)).status == 404


async def test_image_is_404_until_ready_and_bad_ids_are_404(client, alice: UserAuth) -> None:
    created = await (
        await client.post("/api/v1/generations", json=BODY, headers=alice.headers)
    ).json()
    resp = await client.get(f"/api/v1/generations/{created['id']}/image", headers=alice.headers)
    assert resp.status == 404 and (await resp.json())["error"]["code"] == "not_ready"
    resp = await client.get("/api/v1/generations/not-a-uuid", headers=alice.headers)
    assert resp.status == 404


async def test_latest_returns_the_newest(client, alice: UserAuth) -> None:
    ids = []
    for i in range(3):
        ids.append(
            (
                await (
                    await client.post(
                        "/api/v1/generations", json={"prompt": f"p{i}"}, headers=alice.headers
                    )
                ).json()
            )["id"]
        )
    latest = await (await client.get("/api/v1/generations/latest", headers=alice.headers)).json()
    assert latest["id"] == ids[-1]


@pytest.mark.parametrize(
    ("query", "code"),
    [
        ("limit=0", "invalid_limit"),
        ("limit=101", "invalid_limit"),
        ("limit=x", "invalid_limit"),
        ("status=done", "invalid_status"),
        ("cursor=@@@", "invalid_cursor"),
        ("cursor=Zm9v", "invalid_cursor"),
    ],
)
async def test_bad_list_queries_get_400(client, alice: UserAuth, query: str, code: str) -> None:
    resp = await client.get(f"/api/v1/generations?{query}", headers=alice.headers)
    assert resp.status == 400
    assert (await resp.json())["error"]["code"] == code


async def test_keyset_pagination_returns_every_row_once_while_rows_are_added(
    client, alice: UserAuth, bob: UserAuth
) -> None:
    existing = set()
    for i in range(23):
        resp = await client.post(
            "/api/v1/generations", json={"prompt": f"old {i}"}, headers=alice.headers
        )
        existing.add((await resp.json())["id"])
    await client.post("/api/v1/generations", json=BODY, headers=bob.headers)
    seen: list[str] = []
    cursor = None
    while True:
        url = "/api/v1/generations?limit=5" + (f"&cursor={cursor}" if cursor else "")
        page = await (await client.get(url, headers=alice.headers)).json()
        seen += [item["id"] for item in page["items"]]
        # Rows added between pages land above the cursor and never shift what follows.
        await client.post("/api/v1/generations", json={"prompt": "new"}, headers=alice.headers)
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == len(set(seen)), "a row was returned twice"
    assert existing <= set(seen), "a row was skipped"
    created_order = [s for s in seen if s in existing]
    assert created_order == sorted(created_order, key=seen.index)


async def test_status_filter(client, alice: UserAuth, rt: Runtime) -> None:
    for _ in range(3):
        await client.post("/api/v1/generations", json=BODY, headers=alice.headers)
    await rt.pool.execute(
        "UPDATE generations SET status = 'failed' WHERE id = (SELECT id FROM generations LIMIT 1)"
    )
    failed = await (
        await client.get("/api/v1/generations?status=failed", headers=alice.headers)
    ).json()
    submitted = await (
        await client.get("/api/v1/generations?status=submitted", headers=alice.headers)
    ).json()
    queued = await (
        await client.get("/api/v1/generations?status=queued", headers=alice.headers)
    ).json()
    assert [i["status"] for i in failed["items"]] == ["failed"]
    assert [i["status"] for i in submitted["items"]] == ["submitted", "submitted"]
    assert queued["items"] == []


def _events(logs: list[dict[str, Any]], event: str) -> list[str]:
    return [line["generation_id"] for line in logs if line["event"] == event]


def _batches() -> tuple[float, float]:
    """(Redis calls, generations announced) so far, from the API's own histogram."""
    count = REGISTRY.get_sample_value("gengui_api_publish_batch_size_count") or 0.0
    total = REGISTRY.get_sample_value("gengui_api_publish_batch_size_sum") or 0.0
    return count, total


async def test_generations_announced_in_one_loop_turn_share_one_redis_call(
    client, alice: UserAuth, rt: Runtime
) -> None:
    """Creates whose INSERTs return together pay one Redis call between them, and each
    still gets its notice and its job (or, queued, its dispatch request), in order of
    arrival."""
    gids = []
    for _ in range(4):
        resp = await client.post("/api/v1/generations", json=BODY, headers=alice.headers)
        gids.append((await resp.json())["id"])
    # The last as a retry would leave it: queued, for the dispatchers.
    await rt.pool.execute(
        "UPDATE generations SET status = 'queued' WHERE id = $1", uuid.UUID(gids[-1])
    )
    keys = rt.settings.keys
    await rt.redis.delete(keys.requested, keys.jobs_local, keys.user_events(alice.user_id))
    rows = [
        await rt.pool.fetchrow("SELECT * FROM generations WHERE id = $1", uuid.UUID(gid))
        for gid in gids
    ]
    calls, announced = _batches()
    await asyncio.gather(*(client.app[announcer_key].announce(row) for row in rows))
    assert _batches() == (calls + 1, announced + 4)
    assert [str(j.generation_id) for j in await _jobs(rt)] == gids[:3]
    entries = await rt.redis.xrange(keys.requested)
    assert [orjson.loads(f[b"__data__"])["generation_id"] for _, f in entries] == gids[3:]
    assert await _notices(rt, alice) == [
        *(("generation.submitted", gid) for gid in gids[:3]),
        ("generation.queued", gids[3]),
    ]


async def test_create_survives_a_failed_job_send(client, alice: UserAuth, rt: Runtime) -> None:
    """The row is the truth: a failed XADD of the job still answers 202 and is logged,
    the notice (sent first) still went out, and the reconciler, finding the workers'
    queue empty when the check is due, retries the generation as a lost job."""
    from reconciler.loop import Reconciler

    jobs = rt.settings.keys.jobs_local
    await rt.redis.set(jobs, "not a stream")  # every XADD to it fails: WRONGTYPE
    with capture_logs() as logs:
        resp = await client.post("/api/v1/generations", json=BODY, headers=alice.headers)
    assert resp.status == 202
    gid = (await resp.json())["id"]
    assert _events(logs, "api.publish_failed") == [gid]
    assert await _notices(rt, alice) == [("generation.submitted", gid)]
    await rt.redis.delete(jobs)
    # Created with a check after the local check interval: made due now.
    made_due = await rt.pool.execute(
        "UPDATE generation_checks SET due_at = now() - interval '1 second'"
        " WHERE generation_id = $1 AND due_at > now()",
        uuid.UUID(gid),
    )
    assert made_due == "UPDATE 1"
    counts = await Reconciler(rt).tick()
    assert counts["retry"] == 1
    row = await rt.pool.fetchrow(
        "SELECT status, attempt FROM generations WHERE id = $1", uuid.UUID(gid)
    )
    assert (row["status"], row["attempt"]) == ("queued", 2)


async def test_create_answers_202_when_redis_is_unreachable(alice: UserAuth, rt: Runtime) -> None:
    """Neither the notice nor the request can go out (nothing listens on the port): the
    failure is logged and the row stays submitted for the reconciler."""
    unreachable = SharedRedis(aioredis.Redis(port=unused_port(), retry=Retry(NoBackoff(), 0)))
    publisher = Publisher(unreachable, rt.settings.keys)
    app = create_app(rt.settings, dataclasses.replace(rt, publisher=publisher))
    try:
        async with TestClient(TestServer(app)) as c:
            with capture_logs() as logs:
                resp = await c.post("/api/v1/generations", json=BODY, headers=alice.headers)
                assert resp.status == 202
                gid = (await resp.json())["id"]
    finally:
        await unreachable.aclose()
    assert _events(logs, "api.publish_failed") == [gid]
    status = await rt.pool.fetchval("SELECT status FROM generations WHERE id = $1", uuid.UUID(gid))
    assert status == "submitted"


async def test_health_and_readiness(client) -> None:
    assert (await client.get("/healthz")).status == 200
    ready = await client.get("/readyz")
    assert ready.status == 200
    assert (await ready.json())["checks"] == {"postgres": "ok", "redis": "ok"}


async def test_request_id_is_honoured_and_unknown_routes_are_json(client) -> None:
    resp = await client.get("/nope", headers={"X-Request-ID": "abc-123"})
    assert resp.status == 404
    assert resp.headers["X-Request-ID"] == "abc-123"
    assert (await resp.json())["error"]["code"] == "not_found"


async def test_users_see_only_their_own_list(client, rt: Runtime) -> None:
    users = [await make_user(rt) for _ in range(3)]
    for n, user in enumerate(users):
        for _ in range(n + 1):
            await client.post("/api/v1/generations", json=BODY, headers=user.headers)
    for n, user in enumerate(users):
        page = await (await client.get("/api/v1/generations", headers=user.headers)).json()
        assert len(page["items"]) == n + 1
