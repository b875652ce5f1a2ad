"""The reconciler settles its rows by kind: many rows of every kind in one tick, each
with the outcome it would get alone, on real Postgres + Redis (and the mock RunPod)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import aiohttp
import pytest
import structlog.testing
from pydantic import SecretStr

from core import heartbeats, lifecycle
from core.events import DATA_FIELD, ProviderCancel, UserEvent
from core.keys import GROUP_GPU_WORKERS, GROUP_STATUS
from core.lifecycle import Status
from core.runtime import Runtime
from providers.base import Job
from providers.mock.config import MockConfig
from providers.mock.server import create_mock_app
from providers.registry import ProviderSet, open_providers
from reconciler.loop import BATCH, Reconciler
from tests.conftest import UserAuth
from tests.integration.test_provider_pipeline import _serve
from tests.integration.test_reconciler import _requested, _row, check_due, check_of

_INSERT = """
    WITH ins AS (
        INSERT INTO generations (id, user_id, status, attempt, provider, prompt, width,
                                 height, seed, updated_at, deadline_at)
        SELECT gen_random_uuid(), $1, $2, $3, $4, $5, 512, 512, i, now() - $6::interval,
               now() + interval '1 hour'
          FROM generate_series(1, $7::int) AS i
        RETURNING id
    ), chk AS (
        INSERT INTO generation_checks (generation_id, due_at)
        SELECT id, now() - interval '1 second' FROM ins
    )
    SELECT id FROM ins
"""


async def _stuck(
    rt: Runtime,
    user: UserAuth,
    n: int,
    status: str,
    *,
    provider: str = "local",
    attempt: int = 1,
    prompt: str = "p",
    silent_for: timedelta = timedelta(0),
) -> list[uuid.UUID]:
    """``n`` live rows, due now, last changed ``silent_for`` ago."""
    rows = await rt.pool.fetch(
        _INSERT, user.user_id, status, attempt, provider, prompt, silent_for, n
    )
    return [r["id"] for r in rows]


async def _ran_on(rt: Runtime, ids: list[uuid.UUID], worker: str, attempt: int = 1) -> None:
    """As the status consumer records a worker's report: the worker is the row's runner
    and the source of its ``processing`` history row."""
    await rt.pool.execute(
        """INSERT INTO generation_events (generation_id, attempt, status, detail)
           SELECT id, $2, 'processing', $3::jsonb FROM unnest($1::uuid[]) AS id""",
        ids,
        attempt,
        {"source": worker},
    )
    # Only where the attempt matches, like the consumer's CAS (a retry clears the runner).
    await rt.pool.execute(
        "UPDATE generations SET runner = $2 WHERE id = ANY($1) AND attempt = $3",
        ids,
        worker,
        attempt,
    )


async def _heartbeat(rt: Runtime, worker: str) -> None:
    await rt.redis.set(rt.settings.keys.worker_heartbeat(worker), "alive", ex=60)


async def _states(rt: Runtime, ids: list[uuid.UUID]) -> set[tuple[str, int]]:
    rows = await rt.pool.fetch("SELECT status, attempt FROM generations WHERE id = ANY($1)", ids)
    return {(r["status"], r["attempt"]) for r in rows}


async def _next_check_in_s(rt: Runtime, ids: list[uuid.UUID]) -> tuple[float, float]:
    """Shortest and longest wait until the rows' next check, in seconds from now."""
    lo, hi = await rt.pool.fetchrow(
        """SELECT extract(epoch FROM min(due_at) - now()),
                  extract(epoch FROM max(due_at) - now())
             FROM generation_checks WHERE generation_id = ANY($1)""",
        ids,
    )
    return float(lo), float(hi)


async def _retry_reasons(rt: Runtime, ids: list[uuid.UUID]) -> set[str]:
    rows = await rt.pool.fetch(
        """SELECT DISTINCT detail->>'reason' AS reason FROM generation_events
            WHERE generation_id = ANY($1) AND status IN ('queued', 'failed')""",
        ids,
    )
    return {r["reason"] for r in rows}


async def _notices(rt: Runtime, user: UserAuth) -> Counter[str]:
    entries = await rt.redis.xrange(rt.settings.keys.user_events(user.user_id))
    return Counter(UserEvent.model_validate_json(f[DATA_FIELD]).type for _, f in entries)


async def _backlog_in_local_queue(rt: Runtime) -> None:
    """One entry no worker took yet: the local queue is slow, not lost."""
    stream = rt.settings.keys.jobs_local
    await rt.redis.xadd(stream, {DATA_FIELD: b"{}"})
    await rt.redis.xgroup_create(stream, GROUP_GPU_WORKERS, id="0")


async def test_one_tick_settles_many_rows_of_every_kind(rt: Runtime, alice: UserAuth) -> None:
    s = rt.settings
    queued = await _stuck(rt, alice, 20, "queued")
    behind_backlog = await _stuck(rt, alice, 20, "submitted")  # local: its queue has a backlog
    lost = await _stuck(rt, alice, 20, "submitted", provider="gemini")  # no gemini queue at all
    on_live_worker = await _stuck(rt, alice, 20, "processing")
    on_dead_worker = await _stuck(rt, alice, 20, "processing")
    # Attempt 2's runner never said "processing": attempt 1's live worker does not count.
    older_attempt_ran = await _stuck(rt, alice, 5, "processing", attempt=2)
    never_ran = await _stuck(rt, alice, 5, "processing")
    last_attempt = await _stuck(rt, alice, 5, "processing", attempt=s.max_attempts)
    not_due = await _stuck(rt, alice, 5, "submitted")
    await check_due(rt, *not_due, at="now() + interval '1 hour'")
    await _backlog_in_local_queue(rt)
    await _ran_on(rt, on_live_worker + older_attempt_ran, "worker-a")
    await _ran_on(rt, on_dead_worker, "worker-b")
    await _ran_on(rt, last_attempt, "worker-b", attempt=s.max_attempts)
    await _heartbeat(rt, "worker-a")

    rec = Reconciler(rt)
    counts = await rec.tick()

    assert counts == {
        "requeue": 20,
        "polled": 0,
        "retry": 20 + 20 + 5 + 5,
        "exhausted": 5,
        "deadline": 0,
        "thumbnail": 0,
    }
    assert sorted(m.generation_id for m in await _requested(rt)) == sorted(queued)
    # Left alone, and not looked at again before the provider's check interval.
    assert await _states(rt, behind_backlog) == {("submitted", 1)}
    assert await _states(rt, on_live_worker) == {("processing", 1)}
    lo, hi = await _next_check_in_s(rt, behind_backlog + on_live_worker)
    assert s.local_check_s - 10 < lo <= hi <= s.local_check_s
    # Gone: a new attempt each, waiting out its backoff, or failed after the last one.
    assert await _states(rt, lost) == {("queued", 2)}
    assert await _retry_reasons(rt, lost) == {"job_lost"}
    gone = on_dead_worker + never_ran
    assert await _states(rt, gone) == {("queued", 2)}
    assert await _states(rt, older_attempt_ran) == {("queued", 3)}
    assert await _retry_reasons(rt, gone + older_attempt_ran) == {"runner_gone"}
    assert await _states(rt, last_attempt) == {("failed", s.max_attempts)}
    assert await _retry_reasons(rt, last_attempt) == {"runner_gone"}
    assert await _notices(rt, alice) == {"generation.queued": 50, "generation.failed": 5}
    assert await _next_check_in_s(rt, not_due) > (3000, 3000)
    # Every leased row was pushed forward: nothing is due again at once.
    assert sum((await rec.tick()).values()) == 0


async def test_a_full_batch_of_stuck_rows_takes_one_tick(rt: Runtime, alice: UserAuth) -> None:
    assert BATCH >= 1000  # the 1,000 stuck rows in one tick
    ids = await _stuck(rt, alice, BATCH, "processing")
    alive, dead = ids[: BATCH // 2], ids[BATCH // 2 :]
    await _ran_on(rt, alive, "worker-a")
    await _ran_on(rt, dead, "worker-b")
    await _heartbeat(rt, "worker-a")
    started = datetime.now(UTC)
    counts = await Reconciler(rt).tick()
    assert (counts["retry"], counts["exhausted"]) == (len(dead), 0)
    assert await _states(rt, alive) == {("processing", 1)}
    assert await _states(rt, dead) == {("queued", 2)}
    # Every row pushed forward from the tick's start: the retries by their backoff (at
    # least half of retry_base_s), the others by the check interval. Not "from now":
    # on a slow machine the tick itself may outlast the shortest backoff.
    early = await rt.pool.fetchval(
        "SELECT count(*) FROM generation_checks WHERE generation_id = ANY($1) AND due_at < $2",
        ids,
        started + timedelta(seconds=rt.settings.retry_base_s / 2),
    )
    assert early == 0


async def test_many_rows_past_deadline_fail_in_one_tick(rt: Runtime, alice: UserAuth) -> None:
    local = await _stuck(rt, alice, 10, "processing")
    remote = await _stuck(rt, alice, 10, "submitted", provider="runpod")
    ids = local + remote
    await rt.pool.execute(
        """UPDATE generations SET deadline_at = now() - interval '1 second',
                  provider_job_id = CASE WHEN provider = 'runpod' THEN 'rp-' || seed END
            WHERE id = ANY($1)""",
        ids,
    )
    counts = await Reconciler(rt).tick()
    assert (counts["deadline"], counts["retry"]) == (len(ids), 0)
    assert await _states(rt, ids) == {("failed", 1)}
    codes = await rt.pool.fetch(
        "SELECT DISTINCT error_code FROM generations WHERE id = ANY($1)", ids
    )
    assert [r["error_code"] for r in codes] == ["timed_out"]
    entries = await rt.redis.xrange(rt.settings.keys.cancels)
    cancels = [ProviderCancel.model_validate_json(f[DATA_FIELD]) for _, f in entries]
    assert sorted(c.generation_id for c in cancels) == sorted(remote)
    assert await _notices(rt, alice) == {"generation.failed": len(ids)}


@contextlib.asynccontextmanager
async def _runpod(rt: Runtime) -> AsyncIterator[tuple[Runtime, ProviderSet, str]]:
    """The mock RunPod on a real port and the runtime and providers that reach it; its
    jobs are checked every 300 s, far from the 30 s lease, to tell the two apart."""
    runner, url = await _serve(create_mock_app(MockConfig()))
    settings = rt.settings.model_copy(
        update={
            "runpod_api_url": f"{url}/v2",
            "runpod_endpoint_id": "endpoint",
            "runpod_api_key": SecretStr("rp-key"),
            "runpod_check_s": 300.0,
            "provider_timeout_s": 5.0,
        }
    )
    remote_rt = dataclasses.replace(rt, settings=settings)
    try:
        async with open_providers(settings, rt.publisher) as providers:
            yield remote_rt, providers, url
    finally:
        await runner.cleanup()


async def _submitted(
    rt: Runtime, providers: ProviderSet, user: UserAuth, prompt: str
) -> tuple[uuid.UUID, str]:
    """A RunPod row whose job the mock holds; returns (generation id, job id)."""
    [gid] = await _stuck(rt, user, 1, "submitted", provider="runpod", prompt=prompt)
    row = await _row(rt, gid)
    submission = await providers.polling["runpod"].submit(Job.from_row(row))
    assert submission.provider_job_id
    await rt.pool.execute(
        "UPDATE generations SET provider_job_id = $2 WHERE id = $1", gid, submission.provider_job_id
    )
    return gid, submission.provider_job_id


async def _mock_job_status(mock_url: str, job_id: str, status: str) -> None:
    async with aiohttp.ClientSession(mock_url) as http, asyncio.timeout(10):
        while True:
            async with http.get(f"/_mock/jobs/{job_id}") as resp:
                if (await resp.json())["status"] == status:
                    return
            await asyncio.sleep(0.02)


async def test_remote_rows_are_polled_beside_local_ones(rt: Runtime, alice: UserAuth) -> None:
    async with _runpod(rt) as (rt, providers, mock_url):
        running, _ = await _submitted(rt, providers, alice, "a cat [mock:stuck]")
        _, finished = await _submitted(rt, providers, alice, "a cat [mock:nowebhook]")
        await _mock_job_status(mock_url, finished, "COMPLETED")
        submitting = await _stuck(rt, alice, 3, "submitted", provider="runpod")
        never_submitted = await _stuck(
            rt, alice, 3, "submitted", provider="runpod", silent_for=timedelta(hours=1)
        )
        on_live_worker = await _stuck(rt, alice, 3, "processing")
        await _ran_on(rt, on_live_worker, "worker-a")
        await _heartbeat(rt, "worker-a")

        counts = await Reconciler(rt, providers).tick()

        assert (counts["polled"], counts["retry"]) == (1, len(never_submitted))
        # The finished job's result was found by the poll and reported like a webhook.
        reports = await rt.redis.xrange(rt.settings.keys.job_status)
        assert any(b'"state":"completed"' in f[DATA_FIELD] for _, f in reports)
        # Still running, or an in-flight submit: looked at after RunPod's check interval.
        lo, hi = await _next_check_in_s(rt, [running, *submitting])
        assert 290 < lo <= hi <= 300
        assert await _states(rt, [running, *submitting]) == {("submitted", 1)}
        assert await _states(rt, never_submitted) == {("queued", 2)}
        assert await _retry_reasons(rt, never_submitted) == {"not_submitted"}
        lo, hi = await _next_check_in_s(rt, on_live_worker)
        assert rt.settings.local_check_s - 10 < lo <= hi <= rt.settings.local_check_s


async def test_a_row_that_moved_on_is_not_extended(rt: Runtime, alice: UserAuth) -> None:
    """Between the lease and the write, a result or another attempt wins: the batched
    write is fenced by attempt and status like a transition, row by row."""
    async with _runpod(rt) as (rt, providers, _):
        ids = await _stuck(rt, alice, 3, "submitted", provider="runpod")
        leased = [await _row(rt, gid) for gid in ids]
        current, redispatched, completed = ids
        # Attempt 2 started and is out at the provider again: same status, newer attempt.
        assert await lifecycle.retry(rt.pool, redispatched, attempt=1)
        assert await lifecycle.transition(rt.pool, redispatched, attempt=2, to=Status.SUBMITTED)
        assert await lifecycle.transition(
            rt.pool, completed, attempt=1, to=Status.COMPLETED, image_key="k"
        )
        before = {gid: await check_of(rt, gid) for gid in (redispatched, completed)}
        assert before[redispatched] is not None and before[completed] is None  # finished
        await Reconciler(rt, providers)._extend(leased)
        lo, _ = await _next_check_in_s(rt, [current])
        assert lo > 290
        assert await check_of(rt, redispatched) == before[redispatched]
        assert await check_of(rt, completed) is None


async def _taken_by(rt: Runtime, worker: str, ids: list[uuid.UUID], *, names: bool) -> None:
    """Jobs read from the local queue by ``worker`` (pending, not acked), before any
    processing report: its heartbeat names them when ``names``, else it holds nothing."""
    stream = rt.settings.keys.jobs_local
    await rt.redis.xgroup_create(stream, GROUP_GPU_WORKERS, id="$", mkstream=True)
    for gid in ids:
        await rt.redis.xadd(stream, {DATA_FIELD: str(gid).encode()})
    await rt.redis.xreadgroup(GROUP_GPU_WORKERS, worker, {stream: ">"}, count=len(ids))
    in_hand = heartbeats.InHand()
    for gid in ids if names else ():
        in_hand.jobs.add(heartbeats.job_ref(gid, 1))
    await rt.redis.set(rt.settings.keys.worker_heartbeat(worker), in_hand.value(), ex=60)


@pytest.mark.parametrize("names", [True, False])
async def test_a_submitted_job_a_live_worker_took_is_not_lost(
    rt: Runtime, alice: UserAuth, names: bool
) -> None:
    """Its queue has no backlog and its processing report has not landed yet (a slow
    machine, or a job within worker_processing_after_s): the worker's heartbeat names it,
    so it is left alone; a worker that holds something else does not save it."""
    ids = await _stuck(rt, alice, 3, "submitted")
    await _taken_by(rt, "worker-a", ids, names=names)
    counts = await Reconciler(rt).tick()
    if names:
        assert counts["retry"] == 0
        assert await _states(rt, ids) == {("submitted", 1)}
    else:
        assert counts["retry"] == len(ids)
        assert await _retry_reasons(rt, ids) == {"job_lost"}


@pytest.mark.parametrize("last_attempt", [False, True])
async def test_a_job_found_gone_is_not_retried_once_it_moved_on(
    rt: Runtime, alice: UserAuth, last_attempt: bool
) -> None:
    """Found submitted with no backlog, then its processing report landed before the
    retry's write: the write is fenced by the status the job was found in, so the live
    job is neither retried nor failed."""
    attempt = rt.settings.max_attempts if last_attempt else 1
    (gid,) = await _stuck(rt, alice, 1, "submitted", attempt=attempt)
    seen = await _row(rt, gid)
    assert await lifecycle.transition(rt.pool, gid, attempt=attempt, to=Status.PROCESSING)
    assert sum((await Reconciler(rt)._retry([(seen, "job_lost")])).values()) == 0
    assert await _states(rt, [gid]) == {("processing", attempt)}


@pytest.mark.parametrize("unapplied", ["unread", "read, not acked"])
async def test_a_gone_job_waits_for_the_reports_already_sent(
    rt: Runtime, alice: UserAuth, unapplied: str
) -> None:
    """The status consumers are behind (or down): a report sent before the jobs were
    found gone may be theirs, so they are looked at again soon instead of run again;
    once every report sent by then is applied and they are still where they were, they
    are retried, whatever was sent since."""
    keys, s = rt.settings.keys, rt.settings
    processing = await _stuck(rt, alice, 2, "processing")
    await _ran_on(rt, processing, "worker-b")  # no heartbeat: its runner is gone
    submitted = await _stuck(rt, alice, 2, "submitted")  # no backlog, no runner holds it
    ids = processing + submitted
    await rt.redis.xgroup_create(keys.job_status, GROUP_STATUS, id="$", mkstream=True)
    await rt.redis.xadd(keys.job_status, {DATA_FIELD: b"{}"})
    if unapplied != "unread":
        await rt.redis.xreadgroup(GROUP_STATUS, "status-1", {keys.job_status: ">"}, count=1)
    rec = Reconciler(rt)

    with structlog.testing.capture_logs() as logs:
        assert (await rec.tick())["retry"] == 0
    assert [e["count"] for e in logs if e["event"] == "reconciler.waiting_for_reports"] == [4]
    assert await _states(rt, ids) == {("processing", 1), ("submitted", 1)}
    lo, hi = await _next_check_in_s(rt, ids)
    assert 0 < lo <= hi <= s.reconcile_interval_s
    # Still behind at the next look: still waiting.
    await check_due(rt, *ids)
    assert (await rec.tick())["retry"] == 0

    # The old report applied; a newer one, unread, does not hold them back.
    await rt.redis.xreadgroup(GROUP_STATUS, "status-1", {keys.job_status: ">"}, count=1)
    (old_id,) = [e[0] for e in await rt.redis.xrange(keys.job_status)]
    await rt.redis.xack(keys.job_status, GROUP_STATUS, old_id)
    await rt.redis.xadd(keys.job_status, {DATA_FIELD: b"{}"})
    await check_due(rt, *ids)
    assert (await rec.tick())["retry"] == len(ids)
    assert await _states(rt, ids) == {("queued", 2)}
    assert await _retry_reasons(rt, processing) == {"runner_gone"}
    assert await _retry_reasons(rt, submitted) == {"job_lost"}


async def test_a_job_waiting_for_reports_keeps_its_place_however_long(
    rt: Runtime, alice: UserAuth
) -> None:
    """Looked at again and again while the status consumers stay behind, past the hour
    after which a suspect not seen is forgotten: it keeps the stream position it was
    first found gone at, so newer reports never hold it back."""
    keys = rt.settings.keys
    (gid,) = await _stuck(rt, alice, 1, "processing")
    await _ran_on(rt, [gid], "worker-b")
    await rt.redis.xgroup_create(keys.job_status, GROUP_STATUS, id="$", mkstream=True)
    first = await rt.redis.xadd(keys.job_status, {DATA_FIELD: b"{}"})
    rec = Reconciler(rt)
    now = [0.0]
    rec._clock = lambda: now[0]
    for minutes in (0, 50, 100):  # seen every 50 minutes, each time with a newer report
        now[0] = minutes * 60.0
        await check_due(rt, gid)
        assert (await rec.tick())["retry"] == 0
        await rt.redis.xadd(keys.job_status, {DATA_FIELD: b"{}"})
    # The report that was there first is applied; the newer ones are not.
    await rt.redis.xreadgroup(GROUP_STATUS, "status-1", {keys.job_status: ">"}, count=1)
    await rt.redis.xack(keys.job_status, GROUP_STATUS, first)
    now[0] = 150 * 60.0
    await check_due(rt, gid)
    assert (await rec.tick())["retry"] == 1
    assert await _states(rt, [gid]) == {("queued", 2)}
