"""Runner heartbeats name the jobs in hand; the reconciler retries a finished job whose
report was lost even though its runner is alive."""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest

from core import heartbeats, lifecycle
from core.heartbeats import InHand, covers, holds, jobs_held
from core.lifecycle import Status
from core.runtime import Runtime
from reconciler.loop import Reconciler
from tests.conftest import UserAuth
from tests.integration.test_reconciler import _generation, _row


async def _value(rt: Runtime, runner: str) -> dict[str, object] | None:
    raw = await rt.redis.get(rt.settings.keys.worker_heartbeat(runner))
    return json.loads(raw) if raw is not None else None


async def _until(predicate, limit_s: float = 3.0) -> None:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(limit_s):
        while not await predicate():
            await asyncio.sleep(0.01)


def _lists(rt: Runtime, runner: str, *refs: str):  # type: ignore[no-untyped-def]
    """A predicate for ``_until``: the runner's key names exactly ``refs``."""

    async def listed() -> bool:
        value = await _value(rt, runner)
        return value is not None and value["jobs"] == list(refs)

    return listed


async def test_beat_names_the_jobs_in_hand_and_goes_on_stop(rt: Runtime) -> None:
    in_hand = InHand()
    stop = asyncio.Event()
    task = asyncio.create_task(heartbeats.beat(rt, "w1", in_hand, stop))
    gid = uuid.uuid4()
    await _until(lambda: _value(rt, "w1"))
    with in_hand.holding(gid, 2):
        # Published at once, not at the next regular beat (worker_heartbeat_s).
        await _until(_lists(rt, "w1", f"{gid}:2"), limit_s=1.0)
    stop.set()
    await task
    assert await _value(rt, "w1") is None


@pytest.mark.settings(worker_heartbeat_s=30)  # no regular beat in the window
async def test_a_job_done_before_the_eager_write_costs_no_write(rt: Runtime) -> None:
    """Jobs of a fast engine are finished before the write that would list them: no
    write for them; a job still in hand is written as before, and the regular beat
    keeps the key alive."""
    in_hand = InHand()
    stop = asyncio.Event()
    task = asyncio.create_task(heartbeats.beat(rt, "w1", in_hand, stop))
    key = rt.settings.keys.worker_heartbeat("w1")
    await _until(lambda: _value(rt, "w1"))
    first = await rt.redis.get(key)
    for _ in range(5):
        with in_hand.holding(uuid.uuid4(), 1):
            pass  # done at once
        await asyncio.sleep(0.1)  # past the eager delay: the beat looked and did not write
    assert await rt.redis.get(key) == first
    gid = uuid.uuid4()
    with in_hand.holding(gid, 1):
        await _until(_lists(rt, "w1", f"{gid}:1"), limit_s=1.0)
    stop.set()
    await task


@pytest.mark.settings(worker_heartbeat_s=0.3)
async def test_the_key_stays_alive_while_fast_jobs_come_and_go(rt: Runtime) -> None:
    """Jobs that start and end all the time wake the beat over and over, each write
    skipped: the regular beat must still come every interval, or the TTL (1 s here)
    runs out and a live worker's long job looks abandoned."""
    in_hand = InHand()
    stop = asyncio.Event()
    task = asyncio.create_task(heartbeats.beat(rt, "w1", in_hand, stop))
    key = rt.settings.keys.worker_heartbeat("w1")
    long_job = uuid.uuid4()
    try:
        with in_hand.holding(long_job, 1):
            await _until(_lists(rt, "w1", f"{long_job}:1"), limit_s=1.0)
            seen = set()
            for _ in range(100):  # 2 s of churn, twice the TTL
                with in_hand.holding(uuid.uuid4(), 1):
                    pass
                await asyncio.sleep(0.02)
                value = await rt.redis.get(key)
                assert value is not None, "the heartbeat key expired under churn"
                seen.add(value)
            assert len(seen) >= 3  # rewritten every 0.3 s, not only once
    finally:
        stop.set()
        await task


def test_holds_reads_the_jobs_and_trusts_an_older_runner() -> None:
    gid = uuid.uuid4()
    value = json.dumps({"at": "2026-11-23T00:00:00+00:00", "jobs": [f"{gid}:1"]})
    assert holds(value, gid, 1)
    assert not holds(value, gid, 2)  # an older or newer attempt is not this job
    assert not holds(value, uuid.uuid4(), 1)
    assert not holds(None, gid, 1)
    assert holds("2026-11-23T00:00:00+00:00", gid, 1)  # the format before job lists
    held = jobs_held(value)
    assert held == {f"{gid}:1"} and covers(held, gid, 1) and not covers(held, gid, 2)
    assert jobs_held(None) == frozenset() and jobs_held("not json") is None


async def test_a_live_runner_that_no_longer_holds_a_job_gets_it_retried(
    rt: Runtime, alice: UserAuth
) -> None:
    """Both jobs were taken by w1, which still beats; it still works on one, and finished
    the other, whose completed report was lost. Only that one gets a new attempt."""
    held = await _generation(rt, alice, status="submitted")
    lost = await _generation(rt, alice, status="submitted")
    for gid in (held, lost):
        assert await lifecycle.transition(
            rt.pool, gid, attempt=1, to=Status.PROCESSING, detail={"source": "w1"}, runner="w1"
        )
    await rt.pool.execute("UPDATE generation_checks SET due_at = now()")
    in_hand = InHand()
    stop = asyncio.Event()
    task = asyncio.create_task(heartbeats.beat(rt, "w1", in_hand, stop))
    try:
        with in_hand.holding(held, 1):
            await _until(_lists(rt, "w1", f"{held}:1"))
            counts = await Reconciler(rt).tick()
    finally:
        stop.set()
        await task
    assert counts["retry"] == 1
    kept, retried = await _row(rt, held), await _row(rt, lost)
    assert (kept["status"], kept["attempt"]) == ("processing", 1)
    assert (retried["status"], retried["attempt"]) == ("queued", 2)
