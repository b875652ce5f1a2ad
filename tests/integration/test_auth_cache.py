"""The per-process API token cache: hits skip the database; revocation here is at once."""

from __future__ import annotations

from core.auth import TOKEN_CACHE, authenticate, hash_token
from core.runtime import Runtime
from tests.conftest import UserAuth


async def _revoke_in_db(rt: Runtime, user: UserAuth) -> None:
    await rt.pool.execute(
        "UPDATE api_tokens SET revoked_at = now() WHERE user_id = $1", user.user_id
    )


async def test_cached_token_is_served_without_the_database(rt: Runtime, alice: UserAuth) -> None:
    first = await authenticate(rt.pool, alice.token, cache_s=60)
    assert first is not None and first.user_id == alice.user_id
    # Revoked by another replica: this process keeps its answer until the TTL ends...
    await _revoke_in_db(rt, alice)
    assert await authenticate(rt.pool, alice.token, cache_s=60) == first
    # ...and without the cache the database says no at once.
    assert await authenticate(rt.pool, alice.token) is None
    # A revocation made in this process forgets the user's tokens immediately.
    TOKEN_CACHE.forget_user(alice.user_id)
    assert await authenticate(rt.pool, alice.token, cache_s=60) is None


async def test_unknown_tokens_are_never_cached(rt: Runtime, bob: UserAuth) -> None:
    assert await authenticate(rt.pool, "gg_not-a-real-token", cache_s=60) is None
    assert TOKEN_CACHE.get(hash_token("gg_not-a-real-token")) is None
    await _revoke_in_db(rt, bob)
    assert await authenticate(rt.pool, bob.token, cache_s=60) is None


async def test_revoking_through_the_api_ends_a_cached_token(client, rt: Runtime) -> None:  # type: ignore[no-untyped-def]
    from core.auth import create_user, issue_token

    user_id = await create_user(rt.pool, "carol@example.com")
    token = await issue_token(rt.pool, user_id)
    headers = {"Authorization": f"Bearer {token}"}
    assert (await client.get("/api/v1/generations", headers=headers)).status == 200
    token_id = await rt.pool.fetchval("SELECT id FROM api_tokens WHERE user_id = $1", user_id)
    from core.api.http import accounts_key

    assert await client.app[accounts_key].revoke_api_token(user_id, token_id)
    assert (await client.get("/api/v1/generations", headers=headers)).status == 401
