"""Users and API tokens.

Tokens are 256 random bits shown once; only their SHA-256 is stored. A fast hash is
right here (unlike passwords): the input has full entropy, so there is nothing to
brute-force, and a lookup stays one indexed equality.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

import asyncpg

TOKEN_PREFIX = "gg_"


@dataclass(frozen=True)
class Principal:
    user_id: UUID
    email: str
    plan: str
    # Creating generations needs a verified address (core.accounts mails the link).
    email_verified: bool = False


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


async def create_user(
    pool: asyncpg.Pool,
    email: str,
    plan: str = "free",
    *,
    verified: bool = True,
    password_hash: str | None = None,
) -> UUID:
    """An account made by an operator (``gengui users create``, tests): trusted, so
    verified unless asked otherwise; without a password hash it signs in with API
    tokens only. Self-service sign-up goes through ``core.accounts`` instead."""
    user_id: UUID = await pool.fetchval(
        """INSERT INTO users (id, email, plan, email_verified_at, password_hash)
           VALUES (gen_random_uuid(), lower($1), $2, CASE WHEN $3 THEN now() END, $4)
           RETURNING id""",
        email.strip(),
        plan,
        verified,
        password_hash,
    )
    return user_id


async def issue_token(
    pool: asyncpg.Pool, user_id: UUID, name: str = "default", *, expires_at: datetime | None = None
) -> str:
    token = new_token()
    await pool.execute(
        """INSERT INTO api_tokens (id, user_id, token_hash, name, expires_at)
           VALUES (gen_random_uuid(), $1, $2, $3, $4)""",
        user_id,
        hash_token(token),
        name,
        expires_at,
    )
    return token


class TokenCache:
    """Valid API tokens seen in the last few seconds, so a busy client costs no query per
    request. Only hits are kept (an unknown token always asks the database). A token
    revoked in this process is forgotten at once; in another replica it may work for
    up to ``auth_cache_s`` more (the documented trade-off; 0 turns the cache off)."""

    def __init__(self, max_entries: int = 50_000) -> None:
        self.max_entries = max_entries
        self._entries: dict[bytes, tuple[float, Principal]] = {}

    def get(self, key: bytes) -> Principal | None:
        hit = self._entries.get(key)
        if hit is None:
            return None
        if hit[0] <= time.monotonic():
            del self._entries[key]
            return None
        return hit[1]

    def put(self, key: bytes, principal: Principal, ttl_s: float) -> None:
        if len(self._entries) >= self.max_entries:
            self._entries.clear()  # rare; a cold cache only costs queries
        self._entries[key] = (time.monotonic() + ttl_s, principal)

    def forget_user(self, user_id: UUID) -> None:
        for key in [k for k, (_, p) in self._entries.items() if p.user_id == user_id]:
            del self._entries[key]


TOKEN_CACHE = TokenCache()


async def authenticate(pool: asyncpg.Pool, token: str, *, cache_s: float = 0.0) -> Principal | None:
    if not token.startswith(TOKEN_PREFIX) or len(token) > 200:
        return None
    key = hash_token(token)
    if cache_s > 0:
        cached = TOKEN_CACHE.get(key)
        if cached is not None:
            return cached
    row = await pool.fetchrow(
        """SELECT u.id, u.email, u.plan, u.email_verified_at IS NOT NULL AS email_verified
             FROM api_tokens t JOIN users u ON u.id = t.user_id
            WHERE t.token_hash = $1 AND t.revoked_at IS NULL
              AND (t.expires_at IS NULL OR t.expires_at > now())""",
        key,
    )
    if row is None:
        return None
    found = principal(row)
    if cache_s > 0:
        TOKEN_CACHE.put(key, found, cache_s)
    return found


def principal(row: asyncpg.Record) -> Principal:
    """From a row with ``id, email, plan, email_verified``."""
    return Principal(row["id"], row["email"], row["plan"], row["email_verified"])
