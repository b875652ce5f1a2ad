"""The janitor deletes sessions and tokens that can never be used again, after a while,
and the stream consumers of processes that are gone."""

from __future__ import annotations

import hashlib
import secrets
from datetime import timedelta

from core import janitor
from core.keys import GROUP_GPU_WORKERS, GROUP_STATUS
from core.runtime import Runtime
from tests.conftest import UserAuth


def _hash() -> bytes:
    return hashlib.sha256(secrets.token_bytes(16)).digest()


async def _session(rt: Runtime, user: UserAuth, expires: str, revoked: str | None) -> None:
    await rt.pool.execute(
        f"""INSERT INTO sessions (id, user_id, token_hash, expires_at, revoked_at)
            VALUES (gen_random_uuid(), $1, $2, now() + interval '{expires}',
                    {f"now() + interval '{revoked}'" if revoked else "NULL"})""",
        user.user_id,
        _hash(),
    )


async def _mail_token(rt: Runtime, user: UserAuth, expires: str, used: str | None) -> None:
    await rt.pool.execute(
        f"""INSERT INTO account_tokens (id, user_id, purpose, token_hash, email, expires_at,
                                        used_at)
            VALUES (gen_random_uuid(), $1, 'verify_email', $2, 'a@example.com',
                    now() + interval '{expires}',
                    {f"now() + interval '{used}'" if used else "NULL"})""",
        user.user_id,
        _hash(),
    )


async def _api_token(rt: Runtime, user: UserAuth, expires: str | None, revoked: str | None) -> None:
    await rt.pool.execute(
        f"""INSERT INTO api_tokens (id, user_id, token_hash, name, expires_at, revoked_at)
            VALUES (gen_random_uuid(), $1, $2, 'x',
                    {f"now() + interval '{expires}'" if expires else "NULL"},
                    {f"now() + interval '{revoked}'" if revoked else "NULL"})""",
        user.user_id,
        _hash(),
    )


async def test_purge_deletes_only_what_has_been_dead_longer_than_kept(
    rt: Runtime, alice: UserAuth
) -> None:
    keep = timedelta(days=7)
    # Dead for 8 days: deleted.
    await _session(rt, alice, "-8 days", None)
    await _session(rt, alice, "+20 days", "-8 days")
    await _mail_token(rt, alice, "-8 days", None)
    await _mail_token(rt, alice, "+1 day", "-8 days")
    await _api_token(rt, alice, "-8 days", None)
    await _api_token(rt, alice, None, "-8 days")
    # Live, or dead for less than the keep: kept.
    await _session(rt, alice, "+1 day", None)
    await _session(rt, alice, "-6 days", None)
    await _mail_token(rt, alice, "+1 day", None)
    await _mail_token(rt, alice, "+1 day", "-1 day")
    await _api_token(rt, alice, None, None)
    await _api_token(rt, alice, "-6 days", None)
    api_before = await rt.pool.fetchval("SELECT count(*) FROM api_tokens")

    assert await janitor.purge(rt.pool, keep) == {
        "sessions": 2,
        "account_tokens": 2,
        "api_tokens": 2,
    }
    assert await rt.pool.fetchval("SELECT count(*) FROM sessions") == 2
    assert await rt.pool.fetchval("SELECT count(*) FROM account_tokens") == 2
    # alice's own API token (from the fixture) is among those kept.
    assert await rt.pool.fetchval("SELECT count(*) FROM api_tokens") == api_before - 2
    assert await janitor.purge(rt.pool, keep) == dict.fromkeys(janitor._DEAD_SINCE, 0)


async def test_purge_goes_on_past_one_chunk(rt: Runtime, alice: UserAuth) -> None:
    await rt.pool.execute(
        """INSERT INTO sessions (id, user_id, token_hash, expires_at)
           SELECT gen_random_uuid(), $1, sha256(i::text::bytea), now() - interval '30 days'
             FROM generate_series(1, $2::int) AS i""",
        alice.user_id,
        janitor.CHUNK * 2 + 5,
    )
    deleted = await janitor.purge(rt.pool, timedelta(days=7))
    assert deleted["sessions"] == janitor.CHUNK * 2 + 5
    assert await rt.pool.fetchval("SELECT count(*) FROM sessions") == 0


async def _group_with(rt: Runtime, stream: str, group: str, pending: dict[str, int]) -> None:
    """A group whose consumers took ``pending[name]`` entries each (0: read nothing)."""
    await rt.redis.xgroup_create(stream, group, id="$", mkstream=True)
    for name, n in pending.items():
        await rt.redis.xgroup_createconsumer(stream, group, name)
        for _ in range(n):
            await rt.redis.xadd(stream, {"__data__": b"{}"})
        if n:
            await rt.redis.xreadgroup(group, name, {stream: ">"}, count=n)


async def _left(rt: Runtime, stream: str, group: str) -> dict[str, int]:
    found = await rt.redis.xinfo_consumers(stream, group)
    return {c["name"].decode(): c["pending"] for c in found}


async def test_prune_deletes_idle_consumers_with_nothing_pending(rt: Runtime) -> None:
    keys = rt.settings.keys
    await _group_with(rt, keys.job_status, GROUP_STATUS, {"gone": 0, "crashed": 2})
    await _group_with(rt, keys.jobs_local, GROUP_GPU_WORKERS, {"worker-gone": 0, "busy": 1})
    # Every one of them read just now: none idle for the default 15 minutes.
    assert await janitor.prune_consumers(rt) == 0
    assert await janitor.prune_consumers(rt, idle_s=0) == 2
    # Those holding entries stay: their entries go to other consumers by idle time first.
    assert await _left(rt, keys.job_status, GROUP_STATUS) == {"crashed": 2}
    assert await _left(rt, keys.jobs_local, GROUP_GPU_WORKERS) == {"busy": 1}
    await rt.redis.xack(
        keys.jobs_local,
        GROUP_GPU_WORKERS,
        *[e[0] for e in (await rt.redis.xrange(keys.jobs_local))],
    )
    assert await janitor.prune_consumers(rt, idle_s=0) == 1
    assert await _left(rt, keys.jobs_local, GROUP_GPU_WORKERS) == {}
