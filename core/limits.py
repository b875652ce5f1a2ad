"""Fair-use limits, each refused with a 429, a ``Retry-After`` and a code.

- requests per minute per user: a Redis token bucket (``RequestLimiter``), taken in
  ``require_user`` for every authenticated route; ``rate_limited``.
- sign-up and reset requests per client IP: the same bucket, keyed by IP; ``rate_limited``.
- failed sign-ins per account and per IP: Redis counters and a lock (``LoginThrottle``);
  ``login_locked``.
- active (queued or running) generations per user: Postgres, in the INSERT's
  transaction; ``too_many_active``.
- generations per UTC day, by plan: Postgres, the same transaction; ``daily_quota``.

None is check-then-act. The Redis limits are one Lua script each, so replicas and
concurrent requests cannot both pass a check. The generation limits count the rows
themselves (no counter to drift) under a per-user advisory lock held by the
transaction that inserts: two creates of one user are serialised, the second counts
the first. Other users never wait on that lock.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import asyncpg

from core.errors import TooManyRequests
from core.lifecycle import NON_TERMINAL
from core.ratelimit import TokenBucket
from core.settings import Settings
from core.streams import SharedRedis

# KEYS: account count, account lock, ip count, ip lock.
# ARGV: account max, ip max, window ms, lockout ms. Returns ms to wait (0: go on).
# Every attempt is counted *before* its password is checked, so N parallel guesses
# cannot all slip through one check; a success gives its slot back (``_SUCCEEDED``).
_ATTEMPT = """
local locked = math.max(redis.call('PTTL', KEYS[2]), redis.call('PTTL', KEYS[4]))
if locked > 0 then return locked end
local function reserve(count, lock, max)
  local n = redis.call('INCR', count)
  if n == 1 then redis.call('PEXPIRE', count, ARGV[3]) end
  if n > tonumber(max) then
    redis.call('SET', lock, '1', 'PX', ARGV[4])
    redis.call('DEL', count)
    return tonumber(ARGV[4])
  end
  return 0
end
return math.max(reserve(KEYS[1], KEYS[2], ARGV[1]), reserve(KEYS[3], KEYS[4], ARGV[2]))
"""

# KEYS: account count, ip count. The account starts afresh; the IP gets its slot back.
_SUCCEEDED = """
redis.call('DEL', KEYS[1])
if tonumber(redis.call('GET', KEYS[2]) or '0') > 0 then redis.call('DECR', KEYS[2]) end
return 0
"""


def _digest(value: str) -> str:
    """E-mail addresses stay out of Redis key names (they show in MONITOR, dumps)."""
    return hashlib.sha256(value.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class LimitKeys:
    """Redis key names of the limits, under the deployment's prefix."""

    prefix: str

    def user_rate(self, user_id: UUID) -> str:
        return f"{self.prefix}:limit:rpm:{user_id}"

    def ip_rate(self, scope: str, ip: str) -> str:
        return f"{self.prefix}:limit:ip:{scope}:{ip}"

    def login(self, what: str, subject: str) -> tuple[str, str]:
        """(failure count, lock) for an account (``what="acct"``) or an IP."""
        base = f"{self.prefix}:login:{what}:{_digest(subject)}"
        return f"{base}:count", f"{base}:lock"

    def mail_cooldown(self, purpose: str, email: str) -> str:
        return f"{self.prefix}:mail:{purpose}:{_digest(email)}"


class RequestLimiter:
    """Token buckets in Redis: ``per_minute`` requests, refilled evenly over a minute."""

    def __init__(self, redis: SharedRedis, prefix: str) -> None:
        self.redis = redis
        self.keys = LimitKeys(prefix)
        self._bucket = TokenBucket(redis)

    async def take(self, key: str, per_minute: int) -> float:
        """Seconds to wait before the next request may pass; 0.0: this one passes."""
        if per_minute <= 0:
            return 0.0
        return await self._bucket.take(key, per_minute / 60, per_minute)

    async def check_user(self, user_id: UUID, per_minute: int) -> None:
        wait = await self.take(self.keys.user_rate(user_id), per_minute)
        if wait > 0:
            raise TooManyRequests(f"more than {per_minute} requests a minute", retry_after_s=wait)

    async def check_ip(self, scope: str, ip: str, per_minute: int) -> None:
        wait = await self.take(self.keys.ip_rate(scope, ip), per_minute)
        if wait > 0:
            raise TooManyRequests("too many requests from this address", retry_after_s=wait)

    async def cooldown(self, key: str, seconds: int) -> bool:
        """True at most once per ``seconds`` for ``key`` (SET NX: atomic)."""
        if seconds <= 0:
            return True
        return bool(await self.redis.set(key, "1", ex=seconds, nx=True))


class LoginThrottle:
    """Lockout after too many failed sign-ins, per account and per client IP."""

    def __init__(self, redis: SharedRedis, settings: Settings) -> None:
        self.settings = settings
        self.keys = LimitKeys(settings.stream_prefix)
        self._attempt: Any = redis.register_script(_ATTEMPT)
        self._succeeded: Any = redis.register_script(_SUCCEEDED)

    async def attempt(self, email: str, ip: str) -> None:
        """Count one attempt; ``login_locked`` while either the account or the IP is locked."""
        s = self.settings
        acct_count, acct_lock = self.keys.login("acct", email)
        ip_count, ip_lock = self.keys.login("ip", ip)
        wait_ms = await self._attempt(
            keys=[acct_count, acct_lock, ip_count, ip_lock],
            args=[
                s.login_max_failures,
                s.login_ip_max_failures,
                s.login_window_s * 1000,
                s.login_lockout_s * 1000,
            ],
        )
        if int(wait_ms) > 0:
            raise TooManyRequests(
                "too many failed sign-ins; try again later",
                code="login_locked",
                retry_after_s=int(wait_ms) / 1000,
            )

    async def succeeded(self, email: str, ip: str) -> None:
        acct_count, _ = self.keys.login("acct", email)
        ip_count, _ = self.keys.login("ip", ip)
        await self._succeeded(keys=[acct_count, ip_count], args=[])


# ---- generations ------------------------------------------------------------------

# Retry-After for "too many active": a generation takes seconds to a minute.
ACTIVE_RETRY_AFTER_S = 5
# pg_advisory_xact_lock(class, key): the two-int form, class "gl" (generation limits),
# so these locks cannot collide with any other advisory lock of the application.
_LOCK_CLASS = 0x676C

# Same literal as the partial index ix_generations_user_active, so the planner uses it.
_ACTIVE = ", ".join(f"'{s.value}'" for s in sorted(NON_TERMINAL))
_COUNTS = f"""
    SELECT u.id AS user_id,
           (SELECT count(*) FROM generations
             WHERE user_id = u.id AND status IN ({_ACTIVE})) AS active,
           (SELECT count(*) FROM generations
             WHERE user_id = u.id AND created_at >= d.start) AS today,
           extract(epoch FROM d.start + interval '1 day' - now())::float8 AS reset_s
      FROM unnest($1::uuid[]) AS u(id),
           (SELECT date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' AS start) d
"""
# Each lock once, in one order: two transactions locking overlapping sets of users
# cannot deadlock. (Postgres calls the lock function on the sorted rows.)
_LOCK_USERS = """
    SELECT pg_advisory_xact_lock($1, h)
      FROM (SELECT DISTINCT hashtext(u) AS h FROM unnest($2::text[]) AS u ORDER BY h) AS s
"""


@dataclass(frozen=True)
class GenerationLimits:
    """A user's generation limits; 0 means none."""

    max_active: int
    daily_quota: int

    @classmethod
    def for_plan(cls, settings: Settings, plan: str) -> GenerationLimits:
        quotas = settings.plan_quotas
        return cls(settings.max_active_generations, quotas.get(plan, quotas.get("free", 0)))

    @property
    def enforced(self) -> bool:
        return self.max_active > 0 or self.daily_quota > 0

    def refusal(self, used: Usage, taken: int = 0) -> TooManyRequests | None:
        """Why one more generation does not fit, or None; ``taken`` counts the ones
        accepted since ``used`` was read (earlier creates of the same transaction)."""
        active, today = used.active + taken, used.today + taken
        if self.max_active and active >= self.max_active:
            return TooManyRequests(
                f"at most {self.max_active} generations may be queued or running at once",
                code="too_many_active",
                retry_after_s=ACTIVE_RETRY_AFTER_S,
                details={"limit": self.max_active, "active": active},
            )
        if self.daily_quota and today >= self.daily_quota:
            return TooManyRequests(
                f"the daily quota of {self.daily_quota} generations is used up",
                code="daily_quota",
                retry_after_s=used.reset_s,
                details={"limit": self.daily_quota, "used": today},
            )
        return None


@dataclass(frozen=True)
class Usage:
    """A user's generations active now and created today (UTC); ``reset_s`` until midnight."""

    active: int
    today: int
    reset_s: float


async def lock_users(conn: asyncpg.Connection, user_ids: Iterable[UUID]) -> None:
    """Serialise these users' creates until the transaction ends (commit or rollback)."""
    await conn.execute(_LOCK_USERS, _LOCK_CLASS, [str(u) for u in user_ids])


async def usages(
    conn: asyncpg.Pool | asyncpg.Connection, user_ids: Sequence[UUID]
) -> dict[UUID, Usage]:
    """Each user's ``Usage``, in one statement. For a limit check, call it under
    ``lock_users`` in the transaction that then inserts: a READ COMMITTED statement after
    the lock sees every row committed by the previous holder."""
    rows = await conn.fetch(_COUNTS, list(user_ids))
    return {r["user_id"]: Usage(r["active"], r["today"], r["reset_s"]) for r in rows}


async def usage(conn: asyncpg.Pool | asyncpg.Connection, user_id: UUID) -> dict[str, int]:
    """What ``/auth/me`` shows: generations active now and created today (UTC)."""
    used = (await usages(conn, [user_id]))[user_id]
    return {"active": used.active, "today": used.today}
