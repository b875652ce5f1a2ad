"""The reconciler on real Postgres + Redis: each recovery, and replicas side by side."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from core import lifecycle
from core.events import GenerationRequested
from core.lifecycle import Status
from core.runtime import Runtime
from reconciler.loop import Reconciler
from tests.conftest import UserAuth


async def _generation(
    rt: Runtime, user: UserAuth, status: str = "queued", attempt: int = 1, **cols: str
) -> uuid.UUID:
    """A generation with a check that is due (whatever its status)."""
    extra = "".join(f", {k} = {v}" for k, v in cols.items())
    gid: uuid.UUID = await rt.pool.fetchval(
        """INSERT INTO generations (id, user_id, status, attempt, provider, prompt,
                                    width, height, seed, deadline_at)
           VALUES (gen_random_uuid(), $1, $2, $3, 'local', 'p', 512, 512, 1,
                   now() + interval '1 hour')
           RETURNING id""",
        user.user_id,
        status,
        attempt,
    )
    if extra:
        await rt.pool.execute(f"UPDATE generations SET {extra[2:]} WHERE id = $1", gid)
    await check_due(rt, gid, at="now() - interval '1 second'")
    return gid


async def check_due(rt: Runtime, *ids: uuid.UUID, at: str = "now()") -> None:
    """Sets the generations' checks to ``at`` (an SQL expression), as if now due."""
    await rt.pool.execute(
        f"""INSERT INTO generation_checks (generation_id, due_at)
            SELECT id, {at} FROM unnest($1::uuid[]) AS id
                ON CONFLICT (generation_id) DO UPDATE SET due_at = EXCLUDED.due_at""",
        list(ids),
    )


async def check_of(rt: Runtime, gid: uuid.UUID) -> datetime | None:
    """When the reconciler looks at the generation next; None: never."""
    due: datetime | None = await rt.pool.fetchval(
        "SELECT due_at FROM generation_checks WHERE generation_id = $1", gid
    )
    return due


async def _requested(rt: Runtime) -> list[GenerationRequested]:
    entries = await rt.redis.xrange(rt.settings.keys.requested)
    return [GenerationRequested.model_validate_json(f[b"__data__"]) for _, f in entries]


async def _row(rt: Runtime, gid: uuid.UUID):  # type: ignore[no-untyped-def]
    return await rt.pool.fetchrow("SELECT * FROM generations WHERE id = $1", gid)


async def test_queued_past_grace_is_published_again_once_per_grace(
    rt: Runtime, alice: UserAuth
) -> None:
    gid = await _generation(rt, alice)
    rec = Reconciler(rt)
    assert (await rec.tick())["requeue"] == 1
    assert (await rec.tick())["requeue"] == 0  # leased: next check pushed out by the grace period
    # It names its provider, as the API's does: the dispatcher need not read the row.
    assert await _requested(rt) == [
        GenerationRequested(generation_id=gid, attempt=1, provider="local")
    ]


async def test_silent_submitted_job_gets_a_new_attempt_after_a_backoff(
    rt: Runtime, alice: UserAuth
) -> None:
    gid = await _generation(rt, alice, status="submitted")
    rec = Reconciler(rt)
    counts = await rec.tick()
    assert counts["retry"] == 1
    row = await _row(rt, gid)
    assert (row["status"], row["attempt"]) == ("queued", 2)
    # It waits out its backoff (1..2 s for the first retry) before it is published.
    due = await check_of(rt, gid)
    assert due is not None
    wait_s = (due - row["updated_at"]).total_seconds()
    assert rt.settings.retry_base_s / 2 <= wait_s <= rt.settings.retry_base_s + 0.5
    assert await _requested(rt) == []
    await check_due(rt, gid)
    assert (await rec.tick())["requeue"] == 1
    assert await _requested(rt) == [
        GenerationRequested(generation_id=gid, attempt=2, provider="local")
    ]


async def test_last_attempt_without_result_fails(rt: Runtime, alice: UserAuth) -> None:
    gid = await _generation(rt, alice, status="processing", attempt=rt.settings.max_attempts)
    assert (await Reconciler(rt).tick())["exhausted"] == 1
    row = await _row(rt, gid)
    assert (row["status"], row["error_code"]) == ("failed", "no_result")
    assert await check_of(rt, gid) is None  # finished: never looked at again


async def test_past_deadline_fails_with_timed_out(rt: Runtime, alice: UserAuth) -> None:
    gid = await _generation(
        rt, alice, status="processing", deadline_at="now() - interval '1 second'"
    )
    counts = await Reconciler(rt).tick()
    assert counts["deadline"] == 1 and counts["retry"] == 0
    row = await _row(rt, gid)
    assert (row["status"], row["error_code"]) == ("failed", "timed_out")


async def test_completed_without_thumbnail_is_asked_again(rt: Runtime, alice: UserAuth) -> None:
    missing = await _generation(rt, alice, status="completed", image_key="'users/x/original.png'")
    done = await _generation(rt, alice, status="completed", image_key="'a'", thumbnail_key="'b'")
    await rt.pool.execute("DELETE FROM generation_checks WHERE generation_id = $1", done)
    assert (await Reconciler(rt).tick())["thumbnail"] == 1
    assert await rt.redis.xlen(rt.settings.keys.thumbnails) == 1
    # Asked again after another grace period, if this one never comes either.
    due = await check_of(rt, missing)
    wait_s = (due - datetime.now(UTC)).total_seconds() if due else 0.0
    assert rt.settings.thumbnail_grace_s - 10 < wait_s <= rt.settings.thumbnail_grace_s


async def test_terminal_rows_are_left_alone(rt: Runtime, alice: UserAuth) -> None:
    """Finished generations are not acted on, and a check one left behind is deleted."""
    ids = [await _generation(rt, alice, status=status) for status in ("failed", "cancelled")]
    ids.append(
        await _generation(rt, alice, status="completed", image_key="'a'", thumbnail_key="'b'")
    )
    assert sum((await Reconciler(rt).tick()).values()) == 0
    assert [await check_of(rt, gid) for gid in ids] == [None, None, None]
    assert await _requested(rt) == []
    assert await rt.redis.xlen(rt.settings.keys.thumbnails) == 0


async def test_two_reconcilers_never_act_on_one_row(rt: Runtime, alice: UserAuth) -> None:
    ids = [await _generation(rt, alice) for _ in range(300)]
    a, b = Reconciler(rt), Reconciler(rt)
    counts = await asyncio.gather(a.tick(), b.tick(), a.tick(), b.tick())
    assert sum(c["requeue"] for c in counts) == 300
    requested = await _requested(rt)
    assert sorted(m.generation_id for m in requested) == sorted(ids)


async def test_retry_after_a_result_arrived_changes_nothing(rt: Runtime, alice: UserAuth) -> None:
    """The reconciler's CAS loses to a completion that landed after the lease."""
    gid = await _generation(rt, alice, status="submitted")
    assert await lifecycle.transition(rt.pool, gid, attempt=1, to=Status.COMPLETED, image_key="k")
    assert await lifecycle.retry(rt.pool, gid, attempt=1) is None
    assert (await _row(rt, gid))["status"] == "completed"


async def test_failing_a_generation_clears_its_unreported_image(
    rt: Runtime, alice: UserAuth
) -> None:
    from core.storage import original_key

    gid = await _generation(
        rt, alice, status="processing", deadline_at="now() - interval '1 second'"
    )
    keep = original_key(alice.user_id, uuid.uuid4(), 1, "png")  # another generation's image
    await rt.storage.put(original_key(alice.user_id, gid, 1, "png"), b"lost", "image/png")
    await rt.storage.put(keep, b"other", "image/png")
    assert (await Reconciler(rt).tick())["deadline"] == 1
    assert await rt.storage.list_keys(f"users/{alice.user_id}/") == [keep]


async def test_submitted_job_behind_a_backlog_is_left_to_wait(rt: Runtime, alice: UserAuth) -> None:
    """A long queue is not a lost job: with entries not yet taken, nothing is retried."""
    from core.events import LocalJob
    from core.keys import GROUP_GPU_WORKERS

    gid = await _generation(rt, alice, status="submitted")
    stream = rt.settings.keys.jobs_local
    await rt.redis.xgroup_create(stream, GROUP_GPU_WORKERS, id="0", mkstream=True)
    job = LocalJob(
        generation_id=gid, attempt=1, user_id=alice.user_id, prompt="p", width=64, height=64, seed=1
    )
    await rt.publisher.send(stream, job)
    counts = await Reconciler(rt).tick()
    assert counts["retry"] == 0
    row = await _row(rt, gid)
    assert (row["status"], row["attempt"]) == ("submitted", 1)
    due = await check_of(rt, gid)
    assert due is not None and due > row["updated_at"]  # looked at again later
    # Once the backlog is drained and the row is still silent, the job was lost.
    await rt.redis.xreadgroup(GROUP_GPU_WORKERS, "w", {stream: ">"})
    await check_due(rt, gid)
    assert (await Reconciler(rt).tick())["retry"] == 1
    assert (await _row(rt, gid))["attempt"] == 2


async def test_processing_job_on_a_live_worker_is_not_retried(rt: Runtime, alice: UserAuth) -> None:
    gid = await _generation(rt, alice, status="submitted")
    assert await lifecycle.transition(
        rt.pool,
        gid,
        attempt=1,
        to=Status.PROCESSING,
        detail={"source": "worker-a"},
        runner="worker-a",
    )
    await check_due(rt, gid)
    await rt.redis.set(rt.settings.keys.worker_heartbeat("worker-a"), "alive", ex=60)
    assert (await Reconciler(rt).tick())["retry"] == 0
    assert (await _row(rt, gid))["status"] == "processing"
    # The worker's heartbeat stops: its job goes to another worker as attempt 2.
    await rt.redis.delete(rt.settings.keys.worker_heartbeat("worker-a"))
    await check_due(rt, gid)
    assert (await Reconciler(rt).tick())["retry"] == 1
    row = await _row(rt, gid)
    assert (row["status"], row["attempt"]) == ("queued", 2)
    reason = await rt.pool.fetchval(
        "SELECT detail->>'reason' FROM generation_events WHERE generation_id = $1"
        " AND status = 'queued' AND attempt = 2",
        gid,
    )
    assert reason == "runner_gone"


async def test_deadline_queues_a_cancel_for_a_remote_job(rt: Runtime, alice: UserAuth) -> None:
    from core.events import ProviderCancel

    gid = await _generation(
        rt,
        alice,
        status="processing",
        provider="'runpod'",
        provider_job_id="'rp-1'",
        deadline_at="now() - interval '1 second'",
    )
    assert (await Reconciler(rt).tick())["deadline"] == 1
    entries = await rt.redis.xrange(rt.settings.keys.cancels)
    cancels = [ProviderCancel.model_validate_json(f[b"__data__"]) for _, f in entries]
    assert cancels == [
        ProviderCancel(generation_id=gid, attempt=1, provider="runpod", provider_job_id="rp-1")
    ]


async def test_history_detail_is_stored_as_a_json_object(rt: Runtime, alice: UserAuth) -> None:
    gid = await _generation(rt, alice, status="submitted")
    await lifecycle.transition(
        rt.pool, gid, attempt=1, to=Status.PROCESSING, detail={"source": "w"}, runner="w"
    )
    kind, source = await rt.pool.fetchrow(
        "SELECT jsonb_typeof(detail), detail->>'source' FROM generation_events"
        " WHERE generation_id = $1 AND status = 'processing'",
        gid,
    )
    assert (kind, source) == ("object", "w")


async def test_a_check_goes_with_each_change_of_a_generation(rt: Runtime, alice: UserAuth) -> None:
    """Written by the statement that moves the generation: named, kept, or deleted."""
    gid = await _generation(rt, alice)
    soon, later, thumb = (
        lifecycle.due_in(timedelta(seconds=s)) for s in (30, 120, rt.settings.thumbnail_grace_s)
    )
    assert await lifecycle.transition(
        rt.pool, gid, attempt=1, to=Status.SUBMITTED, next_check_at=soon
    )
    assert await check_of(rt, gid) == soon
    # A change that names no check keeps the one it had.
    assert await lifecycle.transition(rt.pool, gid, attempt=1, to=Status.PROCESSING)
    assert await check_of(rt, gid) == soon
    assert await lifecycle.record_progress(
        rt.pool, [lifecycle.Change(gid, 1, {"progress": 0.5, "next_check_at": later})]
    )
    assert await check_of(rt, gid) == later
    # Completed: looked at again only if its thumbnail never comes.
    assert await lifecycle.transition(
        rt.pool, gid, attempt=1, to=Status.COMPLETED, image_key="k", next_check_at=thumb
    )
    assert await check_of(rt, gid) == thumb
    # A stale change matches nothing and leaves the check alone.
    assert await lifecycle.transition(rt.pool, gid, attempt=1, to=Status.FAILED) is None
    assert await check_of(rt, gid) == thumb
    # A check is a time: None is refused by the database, and the transition with it.
    other = await _generation(rt, alice)
    due = await check_of(rt, other)
    with pytest.raises(asyncpg.NotNullViolationError):
        await lifecycle.transition(
            rt.pool, other, attempt=1, to=Status.SUBMITTED, next_check_at=None
        )
    assert ((await _row(rt, other))["status"], await check_of(rt, other)) == ("queued", due)


async def test_a_reschedule_is_fenced_by_attempt_and_status(rt: Runtime, alice: UserAuth) -> None:
    waiting, dispatched = [await _generation(rt, alice) for _ in range(2)]
    retried = await _generation(rt, alice, status="failed")
    before = {gid: await check_of(rt, gid) for gid in (dispatched, retried)}
    assert await lifecycle.transition(rt.pool, dispatched, attempt=1, to=Status.SUBMITTED)
    assert await lifecycle.retry(  # queued again, as attempt 2
        rt.pool, retried, attempt=1, allowed_from=frozenset({Status.FAILED})
    )
    later = lifecycle.due_in(timedelta(minutes=5))
    changes = [
        lifecycle.Change(gid, 1, {"next_check_at": later}) for gid in (waiting, dispatched, retried)
    ]
    await lifecycle.reschedule(rt.pool, changes, frozenset({Status.QUEUED}))
    assert await check_of(rt, waiting) == later
    assert {gid: await check_of(rt, gid) for gid in (dispatched, retried)} == before


async def test_a_retried_generation_keeps_its_check(rt: Runtime, alice: UserAuth) -> None:
    """A check is deleted as left behind only while its generation is still finished."""
    failed = await _generation(rt, alice, status="failed")
    assert await lifecycle.retry(
        rt.pool,
        failed,
        attempt=1,
        allowed_from=frozenset({Status.FAILED}),
        next_check_at=lifecycle.due_in(timedelta(seconds=-1)),
    )
    rec = Reconciler(rt)
    await rec._forget([failed])  # as if leased while it was failed
    assert await check_of(rt, failed) is not None
    assert (await rec.tick())["requeue"] == 1
