"""Redis Streams wiring: a shared pool for commands and publishing, dedicated connections
for blocking reads, and the consumer loop every stream consumer runs.

Why our own loop rather than FastStream's subscribers (measured on FastStream 0.7.8):
its subscribers share the publishers' pool, a deleted group (``FLUSHALL``, a Redis
restart without persistence) stops a subscriber for good, its reclaimer claims one
entry per round trip, and per-message handling tops out near 2k msg/s where one
``XREADGROUP COUNT n`` + one ``XACK`` per batch drains ~50x more. The wire format
stays FastStream-compatible (JSON in ``__data__``).

The loop gives at-least-once delivery: an entry is acked only after its handler
returned; a failure leaves it pending; pending entries idle past ``reclaim_idle_ms``
are claimed again, and one delivered ``max_deliveries`` times goes to the dead-letter
stream with its last error. Handlers must therefore be idempotent (lifecycle CAS).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, NewType, TypeVar, cast

import redis.asyncio as aioredis
from pydantic import ValidationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from core.events import DATA_FIELD, DeadLetter, Message, UserEvent, json_bytes
from core.keys import Keys
from core.logging import get_logger
from core.metrics import StreamSeries

if TYPE_CHECKING:
    from core.notify import Outbox, OutboxQueue

log = get_logger(__name__)

# Two kinds of client, kept apart by type: a blocking read parks its connection for
# the whole BLOCK, so it must never sit on the pool that publishers wait on.
SharedRedis = NewType("SharedRedis", aioredis.Redis)
DedicatedRedis = NewType("DedicatedRedis", aioredis.Redis)

M = TypeVar("M", bound=Message)


def shared_client(url: str, *, max_connections: int = 64) -> SharedRedis:
    """A client on a blocking pool: past ``max_connections`` callers wait, never fail."""
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=10, health_check_interval=30
    )
    return SharedRedis(aioredis.Redis.from_pool(pool))


def dedicated_client(url: str) -> DedicatedRedis:
    """A client with exactly one connection, for one blocking reader or subscriber."""
    pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=1, timeout=None)
    return DedicatedRedis(aioredis.Redis.from_pool(pool))


Fields = dict[Any, Any]  # redis-py's stream field mapping, typed loosely upstream
Entry = tuple[bytes, dict[bytes, bytes] | None]


def encode(message: Message) -> Fields:
    return {DATA_FIELD: json_bytes(message)}


class Publisher:
    """Writes messages to streams and notices to user channels over the shared pool."""

    def __init__(self, redis: SharedRedis, keys: Keys, *, maxlen: int = 100_000) -> None:
        self.redis = redis
        self.keys = keys
        self.maxlen = maxlen

    async def send(self, stream: str, message: Message) -> bytes:
        entry_id = await self.redis.xadd(
            stream, encode(message), maxlen=self.maxlen, approximate=True
        )
        return cast(bytes, entry_id)

    async def send_many(self, stream: str, messages: Sequence[Message]) -> None:
        """All of them with one script call (``core.notify.Outbox``): far less Python
        than a pipeline of XADDs, whose every argument redis-py packs one by one."""
        from core.notify import Outbox  # core.notify imports this module

        outbox = Outbox(self)
        for message in messages:
            outbox.send(stream, message)
        await outbox.flush()

    async def notify(self, user_id: Any, event: UserEvent) -> str:
        """Log the notice in the user's replay log and publish it; returns its id."""
        # Imported here: core.notify imports this module.
        from core.notify import publish_user_event

        return await publish_user_event(self.redis, self.keys, user_id, event)


# Consumers of a group that have nothing pending and have not read for ARGV[2] ms, deleted
# (ARGV[3]: only that one): checked and deleted in one step, so no read can take an
# entry in between. A deleted consumer that reads again is simply made anew; one with
# entries pending is kept (its entries are reclaimed by idle time). Returns how many.
_PRUNE = """
local ok, consumers = pcall(redis.call, 'XINFO', 'CONSUMERS', KEYS[1], ARGV[1])
if not ok then return 0 end
local n = 0
for _, c in ipairs(consumers) do
  local f = {}
  for i = 1, #c, 2 do f[c[i]] = c[i + 1] end
  if f['pending'] == 0 and f['idle'] >= tonumber(ARGV[2])
      and (ARGV[3] == '' or f['name'] == ARGV[3]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], f['name'])
    n = n + 1
  end
end
return n
"""


async def prune_consumers(
    redis: SharedRedis, stream: str, group: str, *, idle_ms: int, only: str = ""
) -> int:
    """Delete the group's consumers with nothing pending, idle ``idle_ms`` or more (just
    ``only``, when named): a process that stopped or crashed leaves its consumer in every
    group it read, and Redis keeps them for good. Returns how many went."""
    return int(await redis.eval(_PRUNE, 1, stream, group, idle_ms, only))


@dataclass(frozen=True)
class ConsumerConfig:
    stream: str
    group: str
    consumer: str
    batch: int = 100
    block_ms: int = 1000
    concurrency: int = 16
    reclaim_idle_ms: int = 60_000
    reclaim_interval_s: float = 5.0
    max_deliveries: int = 5
    dead_stream: str = "gengui:dead"
    # True where someone else owns retries (the reconciler, with a new attempt): idle
    # entries are then acked away instead of being run again under the same attempt.
    drop_idle: bool = False
    # Reads applied at once (with an ``order_key``): while one batch waits on its
    # statements the next is read and applied, unless it shares a key with one in flight.
    pipeline: int = 1
    # Keep ``concurrency`` messages in hand, each acked once its own handler returned,
    # and read as slots free up (GPU workers, hosted runners): a batch waits for its
    # slowest message, so one long job would idle every other slot until it ends.
    continuous: bool = False


Handler = Callable[[M], Awaitable[None]]
# Applies what it can of a batch in bulk; returns the messages it leaves to ``Handler``.
# With the consumer's ``publisher`` it is also handed an ``Outbox`` to fill, sent with
# the batch's XACK.
BatchHandler = Callable[..., Awaitable[Sequence[M]]]


@dataclass
class StreamConsumer(Generic[M]):
    """Reads a stream as one member of a consumer group and runs ``handler`` per message.

    With a ``batch_handler``, a whole read (up to ``batch`` messages, in stream order) is
    handed to it in one call, so it can apply them with one statement and one pipeline;
    the messages it returns (those that need the slow path) then run one at a time
    through ``handler``. If the call raises, every message of the batch is run again
    alone, so one bad message fails only itself; handlers are idempotent, so the re-run
    is harmless.

    With an ``order_key`` and ``config.pipeline`` > 1, up to ``pipeline`` reads are
    applied at once; a read that shares a key (a generation) with one in flight waits
    for it, so each key's messages are still applied in stream order.

    With a ``publisher`` too, the batch handler fills an ``Outbox`` (``core.notify``)
    instead of sending its own, and the consumer sends it with the batch's XACK in one
    script call: one round trip fewer per batch, and no crash can fall between what a
    batch sends and its ack (which would have the batch handled again).

    With ``config.continuous`` (and a ``publisher``), messages are not batched at all:
    up to ``concurrency`` run at once, a read takes as many as there are free slots, and
    the acks of the messages that finish together share one call (``OutboxQueue``).
    """

    reader: DedicatedRedis
    ops: SharedRedis
    config: ConsumerConfig
    schema: type[M]
    handler: Handler[M]
    batch_handler: BatchHandler[M] | None = None
    order_key: Callable[[M], Hashable] | None = None
    publisher: Publisher | None = None
    _last_error: dict[bytes, str] = field(default_factory=dict)
    _series: StreamSeries = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._series = StreamSeries.of(self.config.stream, self.config.group)
        if self.config.continuous and self.publisher is None:
            raise ValueError("a continuous consumer sends its acks through a publisher")

    async def ensure_group(self) -> None:
        # From "0", not "$": entries added while the group was missing (after a
        # FLUSHALL) are still read; handlers are idempotent, so a re-read is harmless.
        with contextlib.suppress(ResponseError):  # BUSYGROUP: it exists
            await self.ops.xgroup_create(
                self.config.stream, self.config.group, id="0", mkstream=True
            )

    async def run(self, stop: asyncio.Event) -> None:
        cfg = self.config
        log.info("consumer.started", stream=cfg.stream, group=cfg.group, consumer=cfg.consumer)
        need_group = True  # also after a vanished group; retried while Redis is away
        next_reclaim = 0.0
        backoff_s = 0.1
        stopping = asyncio.ensure_future(stop.wait())
        inflight: dict[asyncio.Task[None], set[Hashable]] = {}
        running: set[asyncio.Task[None]] = set()  # continuous: one task per message
        acks = self._ack_queue()
        stopped = False
        try:
            while not stop.is_set():
                try:
                    if need_group:
                        await self.ensure_group()
                        need_group = False
                    if time.monotonic() >= next_reclaim:
                        await self.reclaim()
                        next_reclaim = time.monotonic() + cfg.reclaim_interval_s
                    count = cfg.batch
                    if cfg.continuous:
                        count = await self._free_slots(running, stopping)
                        if not count:
                            continue  # stop was asked while every slot was taken
                    response = await self._read(stopping, count)
                    entries: list[Entry] = [
                        entry
                        for _, stream_entries in cast(list[Any], response)
                        for entry in stream_entries
                    ]
                    if entries and acks is not None:
                        await self._start_each(entries, running, acks)
                    elif entries:
                        # A failed XACK here (Redis gone) leaves entries pending; they
                        # are handled again after a reclaim, which handlers allow.
                        await self._handle(entries, inflight)
                    backoff_s = 0.1
                except ResponseError as exc:
                    # NOGROUP on the next read, or UNBLOCKED for a read parked on the key
                    # when it was deleted: the stream or group vanished (FLUSHALL, a
                    # restart without persistence). Make them again and read on.
                    if not str(exc).startswith(("NOGROUP", "UNBLOCKED")):
                        raise
                    log.warning("consumer.group_recreated", stream=cfg.stream, group=cfg.group)
                    need_group = True
                    continue
                except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                    log.warning("consumer.redis_unavailable", stream=cfg.stream, error=str(exc))
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), backoff_s)
                    backoff_s = min(backoff_s * 2, 5.0)
                    continue
            stopped = True
        finally:
            tasks = [*inflight, *running]
            if tasks:
                # Asked to stop: finish the batches or messages in hand. Failing or
                # cancelled: drop them; their entries stay pending and are reclaimed.
                if not stopped:
                    for task in tasks:
                        task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            if acks is not None:
                await acks.aclose()
            stopping.cancel()
            # The consumer owns its dedicated connection: nothing else may use it.
            await self.reader.aclose()
            if stopped:
                await self._leave()
        log.info("consumer.stopped", stream=cfg.stream, group=cfg.group, consumer=cfg.consumer)

    async def _leave(self) -> None:
        """A clean stop leaves the group, unless entries are still pending (a failed ack:
        they are reclaimed, and the janitor deletes the consumer once they are)."""
        cfg = self.config
        with contextlib.suppress(Exception):  # Redis away: the janitor's pass does it
            await prune_consumers(self.ops, cfg.stream, cfg.group, idle_ms=0, only=cfg.consumer)

    async def _read(self, stopping: asyncio.Future[Any], count: int) -> Any:
        """One XREADGROUP BLOCK, abandoned when stop is asked (returns []): shutdown never
        waits out a long block. Entries a cancelled read had already taken stay pending
        and are reclaimed like any other."""
        cfg = self.config
        read = asyncio.ensure_future(
            self.reader.xreadgroup(
                cfg.group, cfg.consumer, {cfg.stream: ">"}, count=count, block=cfg.block_ms
            )
        )
        await asyncio.wait({read, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if read.done():
            return read.result()
        read.cancel()
        await asyncio.gather(read, return_exceptions=True)
        return []

    async def _free_slots(
        self, running: set[asyncio.Task[None]], stopping: asyncio.Future[Any]
    ) -> int:
        """Continuous: wait until a quarter of the slots are free, or all of them (or stop
        is asked: 0); how many are. Reads of one entry each would cost a round trip per
        message; a quarter still keeps most slots busy while one message runs long."""
        n = self.config.concurrency
        want = max(1, n // 4)
        while running and n - len(running) < want and not stopping.done():
            await asyncio.wait({*running, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if stopping.done():
            return 0
        return n - len(running)

    def _ack_queue(self) -> OutboxQueue | None:
        """Continuous: where the messages' acks go, those finishing together in one call."""
        if not self.config.continuous or self.publisher is None:
            return None
        from core.notify import OutboxQueue  # core.notify imports this module

        return OutboxQueue(self.publisher)

    async def _start_each(
        self, entries: Sequence[Entry], running: set[asyncio.Task[None]], acks: OutboxQueue
    ) -> None:
        """Continuous: a task per message, acked (with others) when it succeeded."""
        cfg = self.config

        def acked(sent: asyncio.Future[None]) -> None:
            # A failed ack (Redis gone) leaves the entry pending: a reclaim hands it on.
            if sent.cancelled():
                return
            if (exc := sent.exception()) is not None:
                log.warning("consumer.ack_failed", stream=cfg.stream, error=repr(exc))
            else:
                self._series.acked.inc()

        async def one(entry_id: bytes, message: M) -> None:
            if await self._run_one(entry_id, message):
                ack = acks.add(lambda outbox: outbox.ack(cfg.stream, cfg.group, [entry_id]))
                ack.add_done_callback(acked)

        for entry_id, message in await self._parse(entries):
            task = asyncio.create_task(one(entry_id, message))
            running.add(task)
            task.add_done_callback(running.discard)

    async def _handle(
        self, entries: Sequence[Entry], inflight: dict[asyncio.Task[None], set[Hashable]]
    ) -> None:
        """Apply a read now, or, pipelined, start it once nothing in flight shares a key."""
        key = self.order_key
        if key is None or self.config.pipeline <= 1:
            await self.process(entries)
            return
        messages = await self._parse(entries)
        keys = {key(message) for _, message in messages}
        while inflight:
            blocking = [t for t, k in inflight.items() if k & keys]
            if not blocking and len(inflight) < self.config.pipeline:
                break
            await asyncio.wait(blocking or inflight, return_when=asyncio.FIRST_COMPLETED)
            for task in [t for t in inflight if t.done()]:
                del inflight[task]
                if not task.cancelled() and task.exception() is not None:
                    # Its entries stay pending and are reclaimed; this read goes on.
                    log.warning(
                        "consumer.batch_unacked",
                        stream=self.config.stream,
                        error=repr(task.exception()),
                    )
        inflight[asyncio.create_task(self._apply(messages))] = keys

    async def _parse(self, entries: Sequence[Entry]) -> list[tuple[bytes, M]]:
        """The entries' messages; one that does not parse is dead-lettered at once."""
        messages: list[tuple[bytes, M]] = []
        for entry_id, fields in entries:
            raw = (fields or {}).get(DATA_FIELD, b"")
            try:
                messages.append((entry_id, self.schema.model_validate_json(raw)))
            except ValidationError as exc:
                # Poison: no retry can fix it.
                await self.dead_letter(entry_id, raw, deliveries=1, error=f"invalid: {exc}")
        return messages

    async def process(self, entries: Sequence[Entry]) -> None:
        await self._apply(await self._parse(entries))

    async def _apply(self, messages: list[tuple[bytes, M]]) -> None:
        """Handle a batch: bounded concurrency, one XACK for everything that succeeded."""
        cfg = self.config
        sem = asyncio.Semaphore(cfg.concurrency)
        done: list[bytes] = []
        batch = self.batch_handler
        if batch is not None and messages:
            outbox = None
            if self.publisher is not None:
                from core.notify import Outbox  # core.notify imports this module

                outbox = Outbox(self.publisher)
            left = await self._run_batch(batch, messages, outbox)
            if left is None:
                if outbox is not None:
                    await self._send_batch(outbox, [])  # what did move is told
            else:
                left_ids = {entry_id for entry_id, _ in left}
                handled = [entry_id for entry_id, _ in messages if entry_id not in left_ids]
                if outbox is None:
                    await self._ack(handled)
                else:
                    await self._send_batch(outbox, handled)
                messages = left

        async def one(entry_id: bytes, message: M) -> None:
            async with sem:
                if await self._run_one(entry_id, message):
                    done.append(entry_id)

        await asyncio.gather(*(one(entry_id, message) for entry_id, message in messages))
        await self._ack(done)

    async def _run_one(self, entry_id: bytes, message: M) -> bool:
        """``handler`` on one message; False (logged, its error kept) if it failed."""
        self._series.consumed.inc()
        started = time.perf_counter()
        try:
            await self.handler(message)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._series.failures.inc()
            if len(self._last_error) > 10_000:
                # Entries reclaimed by another consumer never come back here.
                self._last_error.clear()
            self._last_error[entry_id] = repr(exc)
            log.exception(
                "consumer.handler_failed", stream=self.config.stream, entry_id=entry_id.decode()
            )
            return False
        finally:
            self._series.handler_duration.observe(time.perf_counter() - started)
        self._last_error.pop(entry_id, None)
        return True

    async def _send_batch(self, outbox: Outbox, handled: list[bytes]) -> None:
        """What a batch handler put in ``outbox``, then the XACK of ``handled``, in one
        call. If it fails the entries stay pending: a reclaim hands them to ``handler``
        again, which finds them applied (handlers are idempotent)."""
        outbox.ack(self.config.stream, self.config.group, handled)
        try:
            await outbox.flush()
        except Exception as exc:
            log.warning("consumer.batch_unacked", stream=self.config.stream, error=repr(exc))
            return
        self._series.acked.inc(len(handled))

    async def _run_batch(
        self, handler: BatchHandler[M], messages: list[tuple[bytes, M]], outbox: Outbox | None
    ) -> list[tuple[bytes, M]] | None:
        """The whole batch in one call: the entries it left for ``handler``, or None
        (logged) when it raised."""
        started = time.perf_counter()
        batch = [m for _, m in messages]
        try:
            returned = await (handler(batch) if outbox is None else handler(batch, outbox))
            left = {id(message) for message in returned}
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("consumer.batch_failed", stream=self.config.stream, count=len(messages))
            return None
        finally:
            self._series.handler_duration.observe(time.perf_counter() - started)
        self._series.consumed.inc(len(messages) - len(left))
        rest = []
        for entry_id, message in messages:
            if id(message) in left:
                rest.append((entry_id, message))
            else:
                self._last_error.pop(entry_id, None)
        return rest

    async def _ack(self, entry_ids: list[bytes]) -> None:
        if entry_ids:
            await self.ops.xack(self.config.stream, self.config.group, *entry_ids)
            self._series.acked.inc(len(entry_ids))

    async def reclaim(self) -> None:
        """Claim entries whose consumer died or failed; dead-letter the hopeless ones."""
        cfg = self.config
        pending: list[dict[str, Any]] = await self.ops.xpending_range(
            cfg.stream, cfg.group, min="-", max="+", count=cfg.batch, idle=cfg.reclaim_idle_ms
        )
        if not pending:
            return
        deliveries: dict[bytes, int] = {p["message_id"]: p["times_delivered"] for p in pending}
        if cfg.drop_idle:
            await self.ops.xack(cfg.stream, cfg.group, *deliveries)
            log.info("consumer.idle_dropped", stream=cfg.stream, count=len(deliveries))
            return
        # XCLAIM re-checks idleness, so two reclaiming replicas never both win an entry.
        claimed = await self.ops.xclaim(
            cfg.stream,
            cfg.group,
            cfg.consumer,
            min_idle_time=cfg.reclaim_idle_ms,
            message_ids=list(deliveries),
        )
        retry: list[Entry] = []
        for entry_id, fields in cast(list[Entry], claimed):
            if fields is None:
                continue
            if deliveries.get(entry_id, 0) >= cfg.max_deliveries:
                error = self._last_error.pop(entry_id, "handler failed or consumer died")
                raw = fields.get(DATA_FIELD, b"")
                await self.dead_letter(entry_id, raw, deliveries=deliveries[entry_id], error=error)
            else:
                retry.append((entry_id, fields))
        if retry:
            log.info("consumer.reclaimed", stream=cfg.stream, count=len(retry))
            await self.process(retry)

    async def dead_letter(
        self, entry_id: bytes, raw: bytes, *, deliveries: int, error: str
    ) -> None:
        cfg = self.config
        letter = DeadLetter(
            stream=cfg.stream,
            group=cfg.group,
            message_id=entry_id.decode(),
            deliveries=deliveries,
            error=error[:2000],
            data=raw.decode(errors="replace"),
        )
        async with self.ops.pipeline(transaction=True) as pipe:
            pipe.xadd(cfg.dead_stream, encode(letter))
            pipe.xack(cfg.stream, cfg.group, entry_id)
            await pipe.execute()
        self._series.dead_lettered.inc()
        log.error(
            "consumer.dead_lettered",
            stream=cfg.stream,
            entry_id=entry_id.decode(),
            generation_id=_generation_id(raw),
            error=error[:200],
        )


def _generation_id(raw: bytes) -> str | None:
    """The generation a raw message is about, when it says so: for the operator's logs."""
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    value = data.get("generation_id") if isinstance(data, dict) else None
    return value if isinstance(value, str) else None
