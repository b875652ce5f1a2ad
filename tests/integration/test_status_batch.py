"""Status reports applied a batch at a time: the same outcomes as one at a time."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Sequence
from datetime import timedelta

import pytest

from consumers.status import StatusProcessor, moot, rounds
from core import lifecycle
from core.events import DATA_FIELD, JobStatus, UserEvent
from core.lifecycle import Change, Status
from core.runtime import Runtime
from core.storage import original_key
from core.streams import StreamConsumer, dedicated_client, encode
from tests.conftest import UserAuth


async def _submitted(rt: Runtime, user: UserAuth, n: int) -> list[uuid.UUID]:
    ids: list[uuid.UUID] = [
        r["id"]
        for r in await rt.pool.fetch(
            """INSERT INTO generations (id, user_id, status, provider, prompt, width, height, seed)
               SELECT gen_random_uuid(), $1, 'submitted', 'local', 'p', 64, 64, i
                 FROM generate_series(1, $2::int) AS i RETURNING id""",
            user.user_id,
            n,
        )
    ]
    return ids


def _completed(user: UserAuth, gid: uuid.UUID, attempt: int = 1) -> JobStatus:
    return JobStatus(
        generation_id=gid,
        attempt=attempt,
        state="completed",
        image_key=original_key(user.user_id, gid, attempt, "png"),
        content_type="image/png",
        source="w1",
    )


def _processing(gid: uuid.UUID, attempt: int = 1) -> JobStatus:
    return JobStatus(generation_id=gid, attempt=attempt, state="processing", source="w1")


async def _notices(rt: Runtime, user: UserAuth) -> list[tuple[str, str]]:
    """(generation id, event type) of the user's replay log, oldest first."""
    entries = await rt.redis.xrange(rt.settings.keys.user_events(user.user_id))
    out = []
    for _, fields in entries:
        event = UserEvent.model_validate_json(fields[DATA_FIELD])
        out.append((str(event.generation["id"]), event.type))
    return out


def test_an_outcome_makes_the_processing_and_progress_of_its_attempt_moot() -> None:
    a, b, c, d = (uuid.uuid4() for _ in range(4))
    user = UserAuth(user_id=uuid.uuid4(), token="t")
    reports = [
        _processing(a),
        JobStatus(generation_id=a, attempt=1, state="progress", progress=0.5),
        _processing(b),  # its completed is for another attempt: kept
        _processing(c),  # its completed has no image: it is refused, so kept
        _processing(d),
        _completed(user, a),
        _completed(user, b, attempt=2),
        JobStatus(generation_id=c, attempt=1, state="completed"),
        JobStatus(generation_id=d, attempt=1, state="failed", error_code="nsfw"),
    ]
    assert [(r.generation_id, r.state) for r in moot(reports)] == [
        (b, "processing"),
        (c, "processing"),
        (a, "completed"),
        (b, "completed"),
        (c, "completed"),
        (d, "failed"),
    ]


def test_rounds_name_each_generation_once_and_keep_its_order() -> None:
    a, b = uuid.uuid4(), uuid.uuid4()
    reports = [_processing(a), _processing(b), _processing(a, 2), _processing(a, 3)]
    assert [[(r.generation_id, r.attempt) for r in rnd] for rnd in rounds(reports)] == [
        [(a, 1), (b, 1)],
        [(a, 2)],
        [(a, 3)],
    ]


async def test_transition_many_moves_only_rows_whose_status_and_attempt_match(
    rt: Runtime, alice: UserAuth
) -> None:
    ids = await _submitted(rt, alice, 3)
    fresh, stale, done = ids
    await rt.pool.execute("UPDATE generations SET attempt = 2 WHERE id = $1", stale)
    await rt.pool.execute("UPDATE generations SET status = 'completed' WHERE id = $1", done)
    due = lifecycle.due_in(timedelta(minutes=1))
    changes = [Change(g, 1, {"next_check_at": due}, {"source": "w1"}) for g in ids]
    rows = await lifecycle.transition_many(rt.pool, Status.PROCESSING, changes)
    assert [r["id"] for r in rows] == [fresh]
    statuses = {
        r["id"]: (r["status"], r["due_at"])
        for r in await rt.pool.fetch(
            """SELECT g.id, g.status, c.due_at
                 FROM generations g LEFT JOIN generation_checks c ON c.generation_id = g.id
                WHERE g.id = ANY($1::uuid[])""",
            ids,
        )
    }
    # The check is written with the transition, only where it moved.
    assert statuses == {
        fresh: ("processing", due),
        stale: ("submitted", None),
        done: ("completed", None),
    }
    history = await rt.pool.fetch(
        "SELECT generation_id, attempt, status, detail FROM generation_events"
    )
    assert [dict(h) for h in history] == [
        {"generation_id": fresh, "attempt": 1, "status": "processing", "detail": {"source": "w1"}}
    ]


async def test_transition_many_refuses_a_batch_it_cannot_apply_in_one_statement(
    rt: Runtime,
) -> None:
    gid = uuid.uuid4()
    with pytest.raises(ValueError, match="twice"):
        await lifecycle.transition_many(
            rt.pool, Status.PROCESSING, [Change(gid, 1), Change(gid, 1)]
        )
    with pytest.raises(ValueError, match="same columns"):
        await lifecycle.transition_many(
            rt.pool,
            Status.FAILED,
            [Change(gid, 1, {"error_code": "x"}), Change(uuid.uuid4(), 1)],
        )
    with pytest.raises(ValueError, match="not settable"):
        await lifecycle.transition_many(rt.pool, Status.FAILED, [Change(gid, 1, {"status": "x"})])


async def test_a_batch_applies_each_generations_reports_in_order(
    rt: Runtime, alice: UserAuth
) -> None:
    """Processing + completed of the same generations in one batch, a duplicate, a stale
    attempt, progress and a failure: every row ends where one-at-a-time would put it,
    without the processing step of the rows whose outcome is in the batch (``moot``)."""
    ids = await _submitted(rt, alice, 5)
    ok1, ok2, stale, progressing, failing = ids
    await rt.pool.execute("UPDATE generations SET attempt = 2 WHERE id = $1", stale)
    for gid in (ok1, ok2):
        await rt.storage.put(original_key(alice.user_id, gid, 1, "png"), b"png", "image/png")
    stale_key = original_key(alice.user_id, stale, 1, "png")
    await rt.storage.put(stale_key, b"old", "image/png")
    batch = [
        _processing(ok1),
        _processing(ok2),
        _processing(progressing),
        _completed(alice, ok1),
        _completed(alice, ok1),  # duplicate
        _completed(alice, stale),  # attempt 1, the row is on attempt 2
        JobStatus(generation_id=progressing, attempt=1, state="progress", progress=0.5),
        JobStatus(generation_id=progressing, attempt=1, state="progress", progress=0.25),
        _completed(alice, ok2),
        JobStatus(
            generation_id=failing, attempt=1, state="failed", error_code="nsfw", error_message="x"
        ),
    ]
    await StatusProcessor(rt).handle_batch(batch)

    rows = {
        r["id"]: r
        for r in await rt.pool.fetch("SELECT * FROM generations WHERE id = ANY($1::uuid[])", ids)
    }
    assert {g: rows[g]["status"] for g in ids} == {
        ok1: "completed",
        ok2: "completed",
        stale: "submitted",
        progressing: "processing",
        failing: "failed",
    }
    assert rows[progressing]["progress"] == 0.5  # never backwards
    assert rows[failing]["error_code"] == "nsfw"
    assert rows[ok1]["image_key"] == original_key(alice.user_id, ok1, 1, "png")
    assert not await rt.storage.exists(stale_key), "a refused image is deleted"

    history = await rt.pool.fetch("SELECT generation_id, status FROM generation_events ORDER BY id")
    per_gen: dict[uuid.UUID, list[str]] = {}
    for h in history:
        per_gen.setdefault(h["generation_id"], []).append(h["status"])
    assert per_gen == {
        ok1: ["completed"],
        ok2: ["completed"],
        progressing: ["processing"],
        failing: ["failed"],
    }

    thumbs = await rt.redis.xrange(rt.settings.keys.thumbnails)
    requested = sorted(json.loads(f[DATA_FIELD])["generation_id"] for _, f in thumbs)
    assert requested == sorted([str(ok1), str(ok2)])

    notices = await _notices(rt, alice)
    assert notices.index((str(progressing), "generation.processing")) < notices.index(
        (str(progressing), "generation.progress")
    )
    assert sorted(notices) == sorted(
        [
            (str(progressing), "generation.processing"),
            (str(progressing), "generation.progress"),
            (str(ok1), "generation.completed"),
            (str(ok2), "generation.completed"),
            (str(failing), "generation.failed"),
        ]
    )


async def test_a_failing_batch_is_run_message_by_message(rt: Runtime) -> None:
    """One bad message fails only itself: the batch handler raises, each message is run
    alone, the good ones are acked and the bad one stays pending for a retry."""
    stream, group = rt.settings.keys.job_status, "batch-test"
    batches: list[int] = []
    singles: list[str] = []

    async def batch_handler(messages: Sequence[JobStatus]) -> list[JobStatus]:
        batches.append(len(messages))
        raise RuntimeError("one of these is bad")

    async def handler(message: JobStatus) -> None:
        singles.append(message.source or "")
        if message.source == "bad":
            raise RuntimeError("bad")

    for source in ("a", "bad", "c"):
        fields = encode(
            JobStatus(generation_id=uuid.uuid4(), attempt=1, state="processing", source=source)
        )
        await rt.redis.xadd(stream, fields)
    consumer = StreamConsumer(
        dedicated_client(rt.redis_url),
        rt.redis,
        rt.consumer_config(stream, group, "test"),
        JobStatus,
        handler,
        batch_handler,
    )
    await consumer.ensure_group()
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))
    for _ in range(200):
        if len(singles) == 3:
            break
        await asyncio.sleep(0.02)
    stop.set()
    await task
    assert batches == [3]
    assert sorted(singles) == ["a", "bad", "c"]
    pending = await rt.redis.xpending(stream, group)
    assert pending["pending"] == 1


async def test_pipelined_reads_overlap_but_keep_each_generations_order(rt: Runtime) -> None:
    """pipeline=2, one message per read: A's first report waits (in its handler) until
    B's has started, which only a second batch in flight allows; A's second report
    starts only after A's first is done."""
    stream, group = rt.settings.keys.job_status, "pipeline-test"
    a, b = uuid.uuid4(), uuid.uuid4()
    events: list[str] = []
    b_started = asyncio.Event()

    async def batch_handler(messages: Sequence[JobStatus]) -> list[JobStatus]:
        [message] = messages
        name = f"{'A' if message.generation_id == a else 'B'}{message.attempt}"
        events.append(f"{name} start")
        if name == "B1":
            b_started.set()
        if name == "A1":
            await asyncio.wait_for(b_started.wait(), 5)
        events.append(f"{name} end")
        return []

    async def handler(message: JobStatus) -> None:
        raise AssertionError("the batch path handles everything here")

    for gid, attempt in ((a, 1), (b, 1), (a, 2)):
        report = JobStatus(generation_id=gid, attempt=attempt, state="processing")
        await rt.redis.xadd(stream, encode(report))
    consumer = StreamConsumer(
        dedicated_client(rt.redis_url),
        rt.redis,
        rt.consumer_config(stream, group, "test", batch=1, pipeline=2),
        JobStatus,
        handler,
        batch_handler,
        lambda report: report.generation_id,
    )
    await consumer.ensure_group()
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))
    async with asyncio.timeout(10):
        while len(events) < 6:
            await asyncio.sleep(0.01)
    stop.set()
    await task
    assert events.index("B1 start") < events.index("A1 end")  # two batches in flight
    assert events.index("A1 end") < events.index("A2 start")  # A stays in order
    assert (await rt.redis.xpending(stream, group))["pending"] == 0


async def test_status_consumer_reads_status_batch_entries(rt: Runtime) -> None:
    """The status consumer's reads are ``status_batch`` long; the others keep
    ``consumer_batch`` (a thumbnailer holding 500 entries would starve its replicas)."""
    from consumers.runner import consumer_loops

    settings = rt.settings.model_copy(update={"status_batch": 321, "consumer_batch": 7})
    loops = consumer_loops(
        Runtime(settings, rt.pool, rt.redis, rt.publisher, rt.storage),
        roles=("status", "thumbnails"),
    )
    configs = {name: loop.__self__.config for name, loop in loops.items()}  # type: ignore[attr-defined]
    assert configs["consumer:status"].batch == 321
    assert configs["consumer:thumbnails"].batch == 7
    for loop in loops.values():
        await loop.__self__.reader.aclose()  # type: ignore[attr-defined]


async def test_processing_names_the_runner_on_the_row_and_a_retry_clears_it(
    rt: Runtime, alice: UserAuth
) -> None:
    (gid,) = await _submitted(rt, alice, 1)
    await StatusProcessor(rt).handle_batch([_processing(gid)])
    assert await rt.pool.fetchval("SELECT runner FROM generations WHERE id = $1", gid) == "w1"
    retried = await lifecycle.retry(
        rt.pool, gid, attempt=1, allowed_from=frozenset({Status.PROCESSING})
    )
    assert retried is not None and retried["attempt"] == 2 and retried["runner"] is None
