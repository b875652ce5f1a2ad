"""``core.generations.Creator`` on real Postgres: concurrent creates share one
transaction, and each still gets the answer it would get alone (idempotency keys,
limits, a bad row failing only its own create)."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from typing import Any

import asyncpg
import pytest

from core.errors import Conflict, TooManyRequests
from core.generations import CreateGeneration, Creator
from core.limits import GenerationLimits
from core.runtime import Runtime
from tests.conftest import UserAuth

GRACE, DEADLINE = timedelta(seconds=30), timedelta(seconds=600)
UNLIMITED = GenerationLimits(0, 0)


def body(prompt: str = "a lighthouse at dusk") -> CreateGeneration:
    return CreateGeneration(prompt=prompt, width=256, height=256)


class Recorder:
    """A creator whose batch sizes and announced rows the test reads."""

    def __init__(self, rt: Runtime, **kwargs: Any) -> None:
        self.batches: list[int] = []
        self.announced: list[uuid.UUID] = []
        self.creator = Creator(
            rt.pool,
            dispatch_grace=GRACE,
            deadline=DEADLINE,
            on_created=self._announce,
            observe=self.batches.append,
            **kwargs,
        )

    async def _announce(self, row: asyncpg.Record) -> None:
        self.announced.append(row["id"])

    async def create(self, user: UserAuth, b: CreateGeneration | None = None, **kw: Any) -> Any:
        kw.setdefault("provider", "local")
        return await self.creator.create(user.user_id, b or body(), **kw)


async def settle(*aws: Any) -> list[Any]:
    return list(await asyncio.gather(*aws, return_exceptions=True))


async def test_concurrent_creates_share_a_transaction_and_each_gets_its_own_row(
    rt: Runtime, alice: UserAuth, bob: UserAuth
) -> None:
    rec = Recorder(rt, concurrency=1)
    results = await settle(
        *(rec.create(alice if i % 2 else bob, body(f"prompt {i}")) for i in range(40))
    )
    assert all(isinstance(r, tuple) and r[1] for r in results), results
    # One transaction at a time: the first create goes alone, the rest wait together.
    assert sum(rec.batches) == 40 and len(rec.batches) < 40, rec.batches
    for i, (row, _) in enumerate(results):
        assert row["prompt"] == f"prompt {i}"
        assert row["user_id"] == (alice if i % 2 else bob).user_id
        assert row["status"] == "queued" and row["attempt"] == 1
    ids = [row["id"] for row, _ in results]
    assert len(set(ids)) == 40 and sorted(rec.announced) == sorted(ids)
    # Each row with its history and its dispatch check, as a create alone writes them.
    events = await rt.pool.fetchval(
        "SELECT count(*) FROM generation_events WHERE generation_id = ANY($1)", ids
    )
    checks = await rt.pool.fetch(
        "SELECT due_at - g.created_at AS wait FROM generation_checks c"
        " JOIN generations g ON g.id = c.generation_id WHERE c.generation_id = ANY($1)",
        ids,
    )
    assert events == 40 and len(checks) == 40
    assert {c["wait"] for c in checks} == {GRACE}


async def test_one_key_twice_in_a_batch_is_one_generation(rt: Runtime, alice: UserAuth) -> None:
    rec = Recorder(rt)
    for limits in (UNLIMITED, GenerationLimits(5, 0)):
        key = f"k-{limits.max_active}"
        first, again, other = await settle(
            rec.create(alice, idempotency_key=key, limits=limits),
            rec.create(alice, idempotency_key=key, limits=limits),
            rec.create(alice, body("another body"), idempotency_key=key, limits=limits),
        )
        assert rec.batches[-1] == 3
        assert first[1] is True and again[1] is False and again[0]["id"] == first[0]["id"]
        assert isinstance(other, Conflict) and other.code == "idempotency_key_reused"
        # A later batch replays it from the table.
        replay = await rec.create(alice, idempotency_key=key, limits=limits)
        assert replay[1] is False and replay[0]["id"] == first[0]["id"]
    assert await rt.pool.fetchval("SELECT count(*) FROM generations") == 2
    assert len(rec.announced) == 2


async def test_limits_count_the_earlier_creates_of_the_batch(
    rt: Runtime, alice: UserAuth, bob: UserAuth
) -> None:
    rec = Recorder(rt)
    limits = GenerationLimits(max_active=3, daily_quota=0)
    await rec.create(alice, limits=limits)  # one active before the batch
    results = await settle(*(rec.create(user, limits=limits) for user in [alice] * 5 + [bob] * 5))
    assert rec.batches[-1] == 10
    alice_r, bob_r = results[:5], results[5:]
    assert [isinstance(r, tuple) for r in alice_r] == [True, True, False, False, False]
    assert [isinstance(r, tuple) for r in bob_r] == [True, True, True, False, False]
    for refused in alice_r[2:] + bob_r[3:]:
        assert isinstance(refused, TooManyRequests) and refused.code == "too_many_active"
    assert refused.details["active"] == 3 and refused.details["limit"] == 3
    counts = dict(await rt.pool.fetch("SELECT user_id, count(*) FROM generations GROUP BY user_id"))
    assert counts == {alice.user_id: 3, bob.user_id: 3}


async def test_a_replay_at_the_limit_is_not_refused(rt: Runtime, alice: UserAuth) -> None:
    rec = Recorder(rt)
    limits = GenerationLimits(max_active=0, daily_quota=2)
    original = await rec.create(alice, idempotency_key="once", limits=limits)
    await rec.create(alice, limits=limits)
    replay, new = await settle(
        rec.create(alice, idempotency_key="once", limits=limits),
        rec.create(alice, limits=limits),
    )
    assert replay == (original[0], False)
    assert isinstance(new, TooManyRequests) and new.code == "daily_quota"
    assert new.details == {"limit": 2, "used": 2, "retry_after_s": new.retry_after_s}


async def test_a_bad_row_fails_only_its_own_create(rt: Runtime, alice: UserAuth) -> None:
    rec = Recorder(rt)
    gone = UserAuth(user_id=uuid.uuid4(), token="")  # no such user: a foreign key error
    results = await settle(
        rec.create(alice, body("one")),
        rec.create(gone),
        rec.create(alice, body("two")),
    )
    assert rec.batches == [3, 1, 1, 1]  # the batch, then each create alone
    assert isinstance(results[1], asyncpg.ForeignKeyViolationError)
    assert [r[0]["prompt"] for r in (results[0], results[2])] == ["one", "two"]
    assert await rt.pool.fetchval("SELECT count(*) FROM generations") == 2
    assert len(rec.announced) == 2


async def test_a_caller_that_stops_waiting_still_gets_its_row_announced(
    rt: Runtime, alice: UserAuth
) -> None:
    rec = Recorder(rt)
    task = asyncio.create_task(rec.create(alice))
    await asyncio.sleep(0)  # queued, its transaction not started yet
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await rec.creator.aclose()
    gid = await rt.pool.fetchval("SELECT id FROM generations WHERE user_id = $1", alice.user_id)
    assert gid is not None and rec.announced == [gid]
