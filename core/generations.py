"""Generations as the API sees them: input validation, creation, reads and the resource shape."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import secrets
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

import asyncpg
from pydantic import BaseModel, ConfigDict, Field, field_validator

from core.errors import Conflict, InvalidInput
from core.lifecycle import Status
from core.limits import GenerationLimits, Usage, lock_users, usages

MAX_SEED = 2**32 - 1


class CreateGeneration(BaseModel):
    """Body of ``POST /api/v1/generations``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(min_length=1, max_length=4000)
    negative_prompt: str | None = Field(default=None, max_length=4000)
    width: int = Field(default=1024, ge=256, le=2048, multiple_of=64)
    height: int = Field(default=1024, ge=256, le=2048, multiple_of=64)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt must not be blank")
        return value

    @field_validator("prompt", "negative_prompt")
    @classmethod
    def _no_nul(cls, value: str | None) -> str | None:
        # Postgres text cannot hold NUL; reject it here rather than fail at INSERT.
        if value is not None and "\x00" in value:
            raise ValueError("must not contain NUL characters")
        return value

    def request_hash(self) -> str:
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()


def resource(row: asyncpg.Record | dict[str, Any]) -> dict[str, Any]:
    """The public JSON shape of a generation."""
    gid = row["id"]
    error = (
        {"code": row["error_code"], "message": row["error_message"]} if row["error_code"] else None
    )
    return {
        "id": str(gid),
        "status": row["status"],
        "attempt": row["attempt"],
        "provider": row["provider"],
        "prompt": row["prompt"],
        "negative_prompt": row["negative_prompt"],
        "width": row["width"],
        "height": row["height"],
        "seed": row["seed"],
        "progress": row["progress"],
        "error": error,
        "image_url": f"/api/v1/generations/{gid}/image" if row["image_key"] else None,
        "thumbnail_url": f"/api/v1/generations/{gid}/thumbnail" if row["thumbnail_key"] else None,
        "created_at": _iso(row["created_at"]),
        "updated_at": _iso(row["updated_at"]),
        "completed_at": _iso(row["completed_at"]),
    }


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


# One statement for a batch of creates; each array holds one element per generation.
# The ids come from the caller, which matches the rows that come back to its creates.
_INSERT = """
    WITH v AS (
        SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[],
                             $6::int[], $7::int[], $8::bigint[], $9::text[], $10::text[],
                             $11::text[], $12::text[], $13::interval[]) WITH ORDINALITY
                   AS v(id, user_id, provider, prompt, negative_prompt, width, height, seed,
                        idempotency_key, request_hash, flag_rule, status, check_in, n)
    ), ins AS (
        INSERT INTO generations (id, user_id, status, attempt, provider, prompt, negative_prompt,
                                 width, height, seed, idempotency_key, request_hash,
                                 deadline_at, flag_rule, submitted_at)
        SELECT id, user_id, status, 1, provider, prompt, negative_prompt, width, height, seed,
               idempotency_key, request_hash, now() + $14::interval, flag_rule,
               CASE WHEN status = 'submitted' THEN now() END
          FROM v ORDER BY n
        ON CONFLICT (user_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
        RETURNING *
    ), hist AS (
        INSERT INTO generation_events (generation_id, attempt, status)
        SELECT id, attempt, status FROM ins
    ), chk AS (
        -- A queued row is published again after the grace period if its request was
        -- lost; a submitted one is looked at after its provider's check interval.
        INSERT INTO generation_checks (generation_id, due_at)
        SELECT ins.id, now() + v.check_in FROM ins JOIN v ON v.id = ins.id
    )
    SELECT * FROM ins
"""

_BY_KEYS = """
    SELECT g.* FROM generations g
      JOIN unnest($1::uuid[], $2::text[]) AS k(user_id, idempotency_key)
        ON g.user_id = k.user_id AND g.idempotency_key = k.idempotency_key
"""

Created = tuple[asyncpg.Record, bool]
"""(row, created): created is False for a replay of an earlier create with the same key."""
Key = tuple[UUID, str]


@dataclass(eq=False)
class _Create:
    user_id: UUID
    body: CreateGeneration
    provider: str
    flag_rule: str | None
    key: str | None
    limits: GenerationLimits | None
    done: asyncio.Future[Created]
    id: UUID = field(default_factory=uuid4)  # ours: the INSERT's rows come back by id
    seed: int = field(init=False)
    request_hash: str = field(init=False)

    def __post_init__(self) -> None:
        body = self.body
        self.seed = body.seed if body.seed is not None else secrets.randbelow(MAX_SEED + 1)
        self.request_hash = body.request_hash()

    @property
    def limited(self) -> bool:
        return self.limits is not None and self.limits.enforced

    @property
    def idempotency(self) -> Key | None:
        return (self.user_id, self.key) if self.key is not None else None


Outcome = Created | Exception


class Creator:
    """Inserts new generations; the creates of one loop turn, or of the time the
    transactions in flight take, share one transaction and one ``INSERT``.

    Under load a Postgres round trip and commit are paid per batch, not per request
    (``bench/README.md``: a create's own Postgres CPU falls about fivefold at 16 per
    statement). At most ``concurrency`` transactions run at once; what arrives
    meanwhile waits for the next. Each create's answer is its own, as if the batch had
    run one by one in arrival order:

    - a replayed ``Idempotency-Key`` returns the original (``created`` False), or a 409
      ``idempotency_key_reused`` for another body; two creates of one batch with one
      key are one generation;
    - with ``limits``, the user's active count and daily quota are checked in the
      inserting transaction, under the users' advisory locks (``core.limits``), the
      batch's earlier creates counted; a replay is answered before the check, so it is
      never refused and never counted twice.

    A constraint or data error of the batch's statement is retried one create per
    transaction, so it fails only the create that caused it. A create for one of the
    ``direct`` providers (queue providers, their check interval each) is written
    ``submitted``, the others ``queued``. ``on_created`` (the row's notice and its job
    or dispatch request) is awaited for every new row once committed, before the
    creates are answered, even for a caller that stopped waiting.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        dispatch_grace: timedelta,
        deadline: timedelta,
        concurrency: int = 2,
        max_batch: int = 256,
        direct: Mapping[str, timedelta] | None = None,
        on_created: Callable[[asyncpg.Record], Awaitable[None]] | None = None,
        observe: Callable[[int], None] | None = None,
    ) -> None:
        self._pool = pool
        self._grace, self._deadline = dispatch_grace, deadline
        self._concurrency, self._max_batch = concurrency, max_batch
        self._direct = dict(direct or {})
        self._on_created, self._observe = on_created, observe
        self._pending: list[_Create] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._scheduled = False

    async def create(
        self,
        user_id: UUID,
        body: CreateGeneration,
        *,
        provider: str,
        idempotency_key: str | None = None,
        flag_rule: str | None = None,
        limits: GenerationLimits | None = None,
    ) -> Created:
        """Insert one generation; ``flag_rule`` says why ``provider`` was chosen
        (``core.flags.Choice``). Raises the create's own 409 or 429."""
        done: asyncio.Future[Created] = asyncio.get_running_loop().create_future()
        self._pending.append(
            _Create(user_id, body, provider, flag_rule, idempotency_key, limits, done)
        )
        self._kick()
        return await done

    async def aclose(self) -> None:
        """Wait for the transactions in flight and the creates already queued (shutdown)."""
        while self._tasks or self._pending:
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
            else:
                await asyncio.sleep(0)

    def _kick(self) -> None:
        if self._pending and not self._scheduled and len(self._tasks) < self._concurrency:
            # Starts on the next loop turn: the creates of this one go with it.
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._start)

    def _start(self) -> None:
        self._scheduled = False
        if not self._pending or len(self._tasks) >= self._concurrency:
            return
        batch = self._pending[: self._max_batch]
        del self._pending[: self._max_batch]
        task = asyncio.create_task(self._run(batch))
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._kick()

    async def _run(self, batch: list[_Create]) -> None:
        try:
            try:
                outcomes = await self._transaction(batch)
            except (asyncpg.IntegrityConstraintViolationError, asyncpg.DataError):
                if len(batch) == 1:
                    raise
                outcomes = {}
                for one in batch:  # isolate the create that caused it
                    try:
                        outcomes.update(await self._transaction([one]))
                    except (asyncpg.IntegrityConstraintViolationError, asyncpg.DataError) as e:
                        outcomes[one] = e
            if self._on_created is not None:
                new = [o[0] for o in outcomes.values() if isinstance(o, tuple) and o[1]]
                await asyncio.gather(*(self._on_created(row) for row in new))
        except asyncio.CancelledError:
            for c in batch:
                c.done.cancel()
            raise
        except Exception as exc:
            for c in batch:
                if not c.done.done():
                    c.done.set_exception(exc)
            return
        for c, outcome in outcomes.items():
            if c.done.done():  # its caller stopped waiting
                continue
            if isinstance(outcome, tuple):
                c.done.set_result(outcome)
            else:
                c.done.set_exception(outcome)

    async def _transaction(self, batch: list[_Create]) -> dict[_Create, Outcome]:
        if self._observe is not None:
            self._observe(len(batch))
        outcomes: dict[_Create, Outcome] = {}
        followers: list[tuple[_Create, _Create]] = []  # (create, leader with its key)
        limited = [c for c in batch if c.limited]
        if not limited:
            # One statement is atomic by itself: no BEGIN and COMMIT round trips.
            accepted = _sort(batch, {}, {}, outcomes, followers)
            rows = await self._insert(self._pool, accepted) if accepted else []
        else:
            async with self._pool.acquire() as conn, conn.transaction():
                users = list({c.user_id for c in limited})
                await lock_users(conn, users)
                used = await usages(conn, users)
                existing = await _by_keys(conn, [k for c in limited if (k := c.idempotency)])
                accepted = _sort(batch, used, existing, outcomes, followers)
                rows = await self._insert(conn, accepted) if accepted else []
        inserted = {r["id"]: r for r in rows}
        # A key another transaction inserted first: that one is the original.
        lost = [k for c in accepted if c.id not in inserted and (k := c.idempotency)]
        others = await _by_keys(self._pool, lost) if lost else {}
        for c in accepted:
            row = inserted.get(c.id)
            if row is not None:
                outcomes[c] = (row, True)
                continue
            key = c.idempotency
            original = others.get(key) if key is not None else None
            outcomes[c] = (
                _replay(original, c.request_hash)
                if original is not None  # else deleted between the two statements
                else Conflict("retry the request", code="idempotency_conflict")
            )
        for c, leader in followers:
            first = outcomes[leader]
            outcomes[c] = _replay(first[0], c.request_hash) if isinstance(first, tuple) else first
        return outcomes

    async def _insert(
        self, conn: asyncpg.Pool | asyncpg.Connection, batch: list[_Create]
    ) -> list[asyncpg.Record]:
        statuses: list[str] = []
        checks: list[timedelta] = []
        for c in batch:
            check = self._direct.get(c.provider)
            statuses.append(Status.QUEUED if check is None else Status.SUBMITTED)
            checks.append(self._grace if check is None else check)
        return await conn.fetch(
            _INSERT,
            [c.id for c in batch],
            [c.user_id for c in batch],
            [c.provider for c in batch],
            [c.body.prompt for c in batch],
            [c.body.negative_prompt for c in batch],
            [c.body.width for c in batch],
            [c.body.height for c in batch],
            [c.seed for c in batch],
            [c.key for c in batch],
            [c.request_hash for c in batch],
            [c.flag_rule for c in batch],
            statuses,
            checks,
            self._deadline,
        )


def _sort(
    batch: list[_Create],
    used: dict[UUID, Usage],
    existing: dict[Key, asyncpg.Record],
    outcomes: dict[_Create, Outcome],
    followers: list[tuple[_Create, _Create]],
) -> list[_Create]:
    """The creates of ``batch`` that go to the INSERT, in order. The others get their
    outcome (a replay of ``existing``, a limit's refusal), or, for a key an earlier
    create of the batch has, a place in ``followers`` beside that create."""
    leaders: dict[Key, _Create] = {}  # the create of a key that goes to the INSERT
    accepted: list[_Create] = []
    taken: Counter[UUID] = Counter()
    for c in batch:
        key = c.idempotency
        if key is not None and key in leaders:
            followers.append((c, leaders[key]))
            continue
        if c.limited:
            assert c.limits is not None
            if key is not None and key in existing:
                outcomes[c] = _replay(existing[key], c.request_hash)
                continue
            refusal = c.limits.refusal(used[c.user_id], taken[c.user_id])
            if refusal is not None:
                outcomes[c] = refusal
                continue
        taken[c.user_id] += 1
        if key is not None:
            leaders[key] = c
        accepted.append(c)
    return accepted


async def _by_keys(
    conn: asyncpg.Pool | asyncpg.Connection, keys: list[Key]
) -> dict[Key, asyncpg.Record]:
    if not keys:
        return {}
    rows = await conn.fetch(_BY_KEYS, [k[0] for k in keys], [k[1] for k in keys])
    return {(r["user_id"], r["idempotency_key"]): r for r in rows}


def _replay(existing: asyncpg.Record, request_hash: str) -> Outcome:
    if existing["request_hash"] != request_hash:
        return Conflict(
            "this Idempotency-Key was used with a different request body",
            code="idempotency_key_reused",
        )
    return existing, False


async def get(pool: asyncpg.Pool, user_id: UUID, generation_id: UUID) -> asyncpg.Record | None:
    # Filtering by owner in SQL: another user's id is simply "not found".
    return await pool.fetchrow(
        "SELECT * FROM generations WHERE id = $1 AND user_id = $2", generation_id, user_id
    )


async def latest(pool: asyncpg.Pool, user_id: UUID) -> asyncpg.Record | None:
    return await pool.fetchrow(
        "SELECT * FROM generations WHERE user_id = $1 ORDER BY created_at DESC, id DESC LIMIT 1",
        user_id,
    )


def encode_cursor(created_at: datetime, generation_id: UUID) -> str:
    raw = f"{created_at.isoformat()}|{generation_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, UUID]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        created, gid = raw.split("|", 1)
        return datetime.fromisoformat(created), UUID(gid)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInput("cursor is not valid", code="invalid_cursor") from exc


async def list_page(
    pool: asyncpg.Pool,
    user_id: UUID,
    *,
    limit: int,
    cursor: str | None,
    status: Status | None,
) -> tuple[list[asyncpg.Record], str | None]:
    """Newest first, keyset-paginated on (created_at, id): stable while rows are added."""
    after = decode_cursor(cursor) if cursor else None
    rows = await pool.fetch(
        """SELECT * FROM generations
            WHERE user_id = $1
              AND ($2::text IS NULL OR status = $2)
              AND ($3::timestamptz IS NULL OR (created_at, id) < ($3, $4::uuid))
            ORDER BY created_at DESC, id DESC
            LIMIT $5""",
        user_id,
        status.value if status else None,
        after[0] if after else None,
        after[1] if after else None,
        limit + 1,
    )
    page = rows[:limit]
    next_cursor = (
        encode_cursor(page[-1]["created_at"], page[-1]["id"]) if len(rows) > limit else None
    )
    return page, next_cursor
