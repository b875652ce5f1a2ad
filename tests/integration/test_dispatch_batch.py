"""Dispatch a batch at a time: queue providers in bulk, the rest one by one."""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest

from consumers.dispatch import Dispatcher
from consumers.runner import consumer_loops
from core.events import DATA_FIELD, GenerationRequested, UserEvent
from core.ratelimit import RateLimiter
from core.runtime import Runtime
from core.streams import encode
from providers.registry import ProviderSet
from tests.conftest import UserAuth, running


async def _queued(rt: Runtime, user: UserAuth, n: int, provider: str = "local") -> list[uuid.UUID]:
    rows = await rt.pool.fetch(
        """INSERT INTO generations (id, user_id, status, provider, prompt, width, height, seed)
           SELECT gen_random_uuid(), $1, 'queued', $2, 'p', 64, 64, i
             FROM generate_series(1, $3::int) AS i RETURNING id""",
        user.user_id,
        provider,
        n,
    )
    return [r["id"] for r in rows]


def _dispatcher(rt: Runtime) -> Dispatcher:
    limiter = RateLimiter(rt.redis, rt.settings.keys, {})
    return Dispatcher(rt, ProviderSet.local_only(rt.publisher), limiter)


async def _jobs(rt: Runtime) -> list[tuple[str, int]]:
    entries = await rt.redis.xrange(rt.settings.keys.jobs_local)
    return [
        (job["generation_id"], job["attempt"])
        for job in (json.loads(fields[DATA_FIELD]) for _, fields in entries)
    ]


@pytest.mark.parametrize("named", [True, False], ids=["provider named", "looked up"])
async def test_a_batch_claims_queue_jobs_once_and_leaves_other_providers_to_handle(
    rt: Runtime, alice: UserAuth, named: bool
) -> None:
    """Requests name their provider (the API's, the reconciler's) or, published by an
    older version, do not and are looked up: either way the claim's CAS fences
    duplicates, superseded attempts and rows that moved on."""
    local = await _queued(rt, alice, 3)
    [remote] = await _queued(rt, alice, 1, provider="elsewhere")
    [done] = await _queued(rt, alice, 1)
    await rt.pool.execute("UPDATE generations SET status = 'submitted' WHERE id = $1", done)
    [retried] = await _queued(rt, alice, 1)
    await rt.pool.execute("UPDATE generations SET attempt = 2 WHERE id = $1", retried)
    [cancelled] = await _queued(rt, alice, 1)
    await rt.pool.execute("UPDATE generations SET status = 'cancelled' WHERE id = $1", cancelled)

    def ask(gid: uuid.UUID, attempt: int = 1, provider: str = "local") -> GenerationRequested:
        return GenerationRequested(
            generation_id=gid, attempt=attempt, provider=provider if named else None
        )

    requests = [ask(g) for g in local] + [
        ask(local[0]),  # a duplicate
        ask(remote, provider="elsewhere"),
        ask(done),
        ask(retried, attempt=1),  # an older attempt: attempt 2 is queued
        ask(cancelled),
    ]

    left = await _dispatcher(rt).handle_batch(requests)

    assert [(r.generation_id, r.attempt) for r in left] == [(remote, 1)]
    assert sorted(await _jobs(rt)) == sorted((str(g), 1) for g in local)
    statuses = {
        r["id"]: r["status"] for r in await rt.pool.fetch("SELECT id, status FROM generations")
    }
    assert statuses == {
        **{g: "submitted" for g in local},
        remote: "queued",
        done: "submitted",
        retried: "queued",
        cancelled: "cancelled",
    }
    history = await rt.pool.fetch("SELECT generation_id, status FROM generation_events")
    assert sorted((h["generation_id"], h["status"]) for h in history) == sorted(
        (g, "submitted") for g in local
    )
    log = await rt.redis.xrange(rt.settings.keys.user_events(alice.user_id))
    notices = [UserEvent.model_validate_json(f[DATA_FIELD]) for _, f in log]
    assert sorted((n.generation["id"], n.type) for n in notices) == sorted(
        (str(g), "generation.submitted") for g in local
    )
    # Again: nothing is queued any more, so nothing moves and nothing is published.
    assert await _dispatcher(rt).handle_batch(requests[:3]) == []
    assert len(await _jobs(rt)) == 3


@pytest.mark.parametrize("named", [True, False], ids=["provider named", "looked up"])
async def test_a_batch_asking_for_two_attempts_claims_the_queued_one(
    rt: Runtime, alice: UserAuth, named: bool
) -> None:
    """A stale request and the retry's, read together: one claim, for attempt 2."""
    [gid] = await _queued(rt, alice, 1)
    await rt.pool.execute("UPDATE generations SET attempt = 2 WHERE id = $1", gid)
    provider = "local" if named else None
    requests = [
        GenerationRequested(generation_id=gid, attempt=a, provider=provider) for a in (2, 1)
    ]

    assert await _dispatcher(rt).handle_batch(requests) == []

    assert await _jobs(rt) == [(str(gid), 2)]
    row = await rt.pool.fetchrow("SELECT status, attempt FROM generations WHERE id = $1", gid)
    assert (row["status"], row["attempt"]) == ("submitted", 2)


async def test_the_dispatch_consumer_runs_a_batch_and_its_leftovers(
    rt: Runtime, alice: UserAuth
) -> None:
    """Through the stream: the local requests are dispatched in bulk, the one for an
    unknown provider takes the one-at-a-time path and fails, and all are acked."""
    local = await _queued(rt, alice, 5)
    [unknown] = await _queued(rt, alice, 1, provider="nope")
    for gid in [*local, unknown]:
        await rt.redis.xadd(
            rt.settings.keys.requested, encode(GenerationRequested(generation_id=gid, attempt=1))
        )
    async with running(consumer_loops(rt, roles=["dispatch"])):
        for _ in range(250):
            rows = await rt.pool.fetch("SELECT id, status, error_code FROM generations")
            if all(r["status"] != "queued" for r in rows):
                break
            await asyncio.sleep(0.02)
    final = {r["id"]: (r["status"], r["error_code"]) for r in rows}
    assert final == {
        **{g: ("submitted", None) for g in local},
        unknown: ("failed", "provider_unknown"),
    }
    assert len(await _jobs(rt)) == 5
    groups = await rt.redis.xinfo_groups(rt.settings.keys.requested)
    assert [g["pending"] for g in groups] == [0]
