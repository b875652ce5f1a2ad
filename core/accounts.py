"""Accounts: sign-up, e-mail verification, sign-in, browser sessions, password reset
and API tokens. The HTTP routes are ``core.api.auth``; this module knows no HTTP.

Every secret handed out is 256 random bits shown once; only its SHA-256 is stored
(``core.auth.hash_token``). Each kind has its own prefix (``gg_`` API token, ``gs_``
session, ``gv_`` verification, ``gr_`` reset), so a secret scanner can tell them
apart and one kind is never accepted where another is expected.

What sign-up reveals: it always answers the same (202, "check your mail") and does
the same work (one password hash, one INSERT); what happens next goes to the
address's owner only: a verification link for a new account, a "you already have
an account" notice for an existing one. So the response does not tell whether an
address has an account. (Whoever controls the mailbox learns it; that is
unavoidable and harmless.) Password reset requests answer 202 whatever the address.

A password reset proves control of the address: it verifies the address, and it
signs out every session *and revokes every API token*, because a reset is how an
account is taken back after a compromise, and a token minted by the intruder would
otherwise outlive it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal
from uuid import UUID

import asyncpg

from core import limits as lim
from core.auth import TOKEN_CACHE, Principal, hash_token, new_token, principal
from core.errors import Conflict, Forbidden, InvalidInput, TooManyRequests, Unauthorized
from core.logging import get_logger
from core.mail import Mail, Mailer
from core.passwords import check_policy, hash_password, verify_password
from core.runtime import Runtime
from core.settings import Settings

log = get_logger("gengui.accounts")

Purpose = Literal["verify_email", "reset_password"]
SESSION_PREFIX = "gs_"
_PREFIX: dict[Purpose, str] = {"verify_email": "gv_", "reset_password": "gr_"}
MAX_API_TOKENS = 100  # live tokens per user; a soft cap against runaway scripts

# Deliberately simple: one @, no spaces or controls, a dotted domain. The real test
# of an address is the verification mail.
_EMAIL = re.compile(r"^[^@\s\x00-\x1f\x7f]{1,64}@[^@\s\x00-\x1f\x7f]+\.[^@\s\x00-\x1f\x7f]+$")


def normalize_email(raw: str) -> str:
    """Trimmed and lower-cased: one account per address, however it is typed."""
    email = raw.strip().lower()
    if len(email) > 320 or not _EMAIL.match(email) or ".." in email.rpartition("@")[2]:
        raise InvalidInput(
            "that is not an e-mail address",
            code="invalid_email",
            details=[{"field": "email", "message": "not an e-mail address"}],
        )
    return email


def csrf_token(session_token: str) -> str:
    """The CSRF token of a session: derived from the HttpOnly session secret, so only a
    page that was handed it (by sign-in, or the readable CSRF cookie) can send it, and a
    cookie planted by a sibling subdomain cannot match (signed double-submit)."""
    mac = hmac.new(session_token.encode(), b"gengui-csrf-v1", hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).decode().rstrip("=")


@dataclass(frozen=True)
class NewSession:
    token: str
    csrf_token: str
    expires_at: datetime


_USER_COLUMNS = "u.id, u.email, u.plan, u.email_verified_at IS NOT NULL AS email_verified"


class Accounts:
    """Account operations over one runtime; ``core.api.auth`` holds one per process."""

    def __init__(self, rt: Runtime) -> None:
        self.pool: asyncpg.Pool = rt.pool
        self.settings: Settings = rt.settings
        self.mailer = Mailer(rt.settings)
        self.limiter = lim.RequestLimiter(rt.redis, rt.settings.stream_prefix)
        self.throttle = lim.LoginThrottle(rt.redis, rt.settings)

    async def aclose(self) -> None:
        await self.mailer.aclose()

    # ---- sign-up and verification ------------------------------------------------

    async def signup(self, raw_email: str, password: str) -> None:
        email = normalize_email(raw_email)
        allowed = self.settings.signup_allowed_domains
        if allowed and email.rpartition("@")[2] not in allowed:
            raise Forbidden(
                "sign-up is not open to addresses at this domain",
                code="email_domain_not_allowed",
            )
        check_policy(password)
        password_hash = await hash_password(password)
        async with self.pool.acquire() as conn, conn.transaction():
            user_id = await conn.fetchval(
                """INSERT INTO users (id, email, plan, password_hash)
                   VALUES (gen_random_uuid(), $1, 'free', $2)
                   ON CONFLICT (email) DO NOTHING RETURNING id""",
                email,
                password_hash,
            )
            token = await self._issue(conn, user_id, email, "verify_email") if user_id else None
        if token is None:
            # The account stays as it is (its password is not touched); its owner hears.
            if await self._cooldown("exists", email):
                self.mailer.send_soon(self._exists_mail(email))
            log.info("account.signup_existing")
            return
        self.mailer.send_soon(self._verification_mail(email, token))
        log.info("account.signed_up", user_id=str(user_id))

    async def resend_verification(self, who: Principal) -> None:
        if who.email_verified:
            raise Conflict("the e-mail address is already verified", code="already_verified")
        if not await self._cooldown("verify_email", who.email):
            raise TooManyRequests(
                "a verification mail was sent a moment ago",
                code="mail_cooldown",
                retry_after_s=self.settings.mail_cooldown_s,
            )
        async with self.pool.acquire() as conn:
            token = await self._issue(conn, who.user_id, who.email, "verify_email")
        self.mailer.send_soon(self._verification_mail(who.email, token))

    async def verify_email(self, token: str) -> Principal:
        row = await self.pool.fetchrow(
            """WITH t AS (
                    UPDATE account_tokens SET used_at = now()
                     WHERE token_hash = $1 AND purpose = 'verify_email'
                       AND used_at IS NULL AND expires_at > now()
                    RETURNING user_id, email)
                UPDATE users u SET email_verified_at = coalesce(u.email_verified_at, now())
                  FROM t WHERE u.id = t.user_id AND u.email = t.email
                RETURNING u.id, u.email, u.plan, true AS email_verified""",
            hash_token(token),
        )
        if row is None:
            raise _bad_token()
        log.info("account.verified", user_id=str(row["id"]))
        return principal(row)

    # ---- sign-in and sessions ----------------------------------------------------

    async def login(self, raw_email: str, password: str, ip: str) -> Principal:
        """The account, or ``invalid_credentials``; ``login_locked`` after too many
        failures. Unknown addresses cost the same password check as known ones."""
        email = raw_email.strip().lower()
        await self.throttle.attempt(email, ip)
        row = await self.pool.fetchrow(
            f"SELECT {_USER_COLUMNS}, u.password_hash FROM users u WHERE u.email = $1", email
        )
        ok, rehash = await verify_password(row["password_hash"] if row else None, password)
        if row is None or not ok:
            log.info("account.login_failed")
            raise Unauthorized(
                "the e-mail address or password is wrong", code="invalid_credentials"
            )
        await self.throttle.succeeded(email, ip)
        if rehash:  # the hashing parameters were raised since this hash was made
            await self.pool.execute(
                "UPDATE users SET password_hash = $2 WHERE id = $1",
                row["id"],
                await hash_password(password),
            )
        log.info("account.login", user_id=str(row["id"]))
        return principal(row)

    async def create_session(self, user_id: UUID) -> NewSession:
        token = SESSION_PREFIX + secrets.token_urlsafe(32)
        expires_at: datetime = await self.pool.fetchval(
            """INSERT INTO sessions (id, user_id, token_hash, expires_at)
               VALUES (gen_random_uuid(), $1, $2, now() + $3::interval) RETURNING expires_at""",
            user_id,
            hash_token(token),
            timedelta(seconds=self.settings.session_lifetime_s),
        )
        return NewSession(token, csrf_token(token), expires_at)

    async def authenticate_session(self, token: str) -> tuple[Principal, UUID] | None:
        """The session's user and the session id, while it is live."""
        if not token.startswith(SESSION_PREFIX) or len(token) > 200:
            return None
        row = await self.pool.fetchrow(
            f"""SELECT {_USER_COLUMNS}, s.id AS session_id
                  FROM sessions s JOIN users u ON u.id = s.user_id
                 WHERE s.token_hash = $1 AND s.revoked_at IS NULL AND s.expires_at > now()""",
            hash_token(token),
        )
        return (principal(row), row["session_id"]) if row else None

    async def end_session(self, token: str) -> None:
        await self.pool.execute(
            "UPDATE sessions SET revoked_at = now() WHERE token_hash = $1 AND revoked_at IS NULL",
            hash_token(token),
        )

    # ---- password reset ------------------------------------------------------------

    async def request_password_reset(self, raw_email: str) -> None:
        """Mails a reset link if the address has an account; silent either way."""
        email = normalize_email(raw_email)
        user_id = await self.pool.fetchval("SELECT id FROM users WHERE email = $1", email)
        if user_id is None or not await self._cooldown("reset_password", email):
            return
        async with self.pool.acquire() as conn:
            token = await self._issue(conn, user_id, email, "reset_password")
        self.mailer.send_soon(self._reset_mail(email, token))
        log.info("account.reset_requested", user_id=str(user_id))

    async def reset_password(self, token: str, password: str) -> None:
        check_policy(password)
        password_hash = await hash_password(password)
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                """WITH t AS (
                       UPDATE account_tokens SET used_at = now()
                        WHERE token_hash = $1 AND purpose = 'reset_password'
                          AND used_at IS NULL AND expires_at > now()
                       RETURNING user_id, email)
                   UPDATE users u SET password_hash = $2,
                          email_verified_at = coalesce(u.email_verified_at, now())
                     FROM t WHERE u.id = t.user_id AND u.email = t.email
                   RETURNING u.id""",
                hash_token(token),
                password_hash,
            )
            if row is None:
                raise _bad_token()
            user_id = row["id"]
            # One reset ends everything the old password (or an intruder) opened.
            await conn.execute(
                """UPDATE account_tokens SET used_at = now()
                    WHERE user_id = $1 AND purpose = 'reset_password' AND used_at IS NULL""",
                user_id,
            )
            await conn.execute(
                "UPDATE sessions SET revoked_at = now() WHERE user_id = $1 AND revoked_at IS NULL",
                user_id,
            )
            await conn.execute(
                """UPDATE api_tokens SET revoked_at = now()
                    WHERE user_id = $1 AND revoked_at IS NULL""",
                user_id,
            )
        TOKEN_CACHE.forget_user(user_id)
        log.info("account.password_reset", user_id=str(user_id))

    # ---- API tokens ----------------------------------------------------------------

    async def create_api_token(
        self, user_id: UUID, name: str, expires_in_days: int | None
    ) -> dict[str, Any]:
        token = new_token()
        row = await self.pool.fetchrow(
            """INSERT INTO api_tokens (id, user_id, token_hash, name, expires_at)
               SELECT gen_random_uuid(), $1, $2, $3, now() + $4::interval
                WHERE (SELECT count(*) FROM api_tokens
                        WHERE user_id = $1 AND revoked_at IS NULL
                          AND (expires_at IS NULL OR expires_at > now())) < $5
               RETURNING id, name, created_at, expires_at""",
            user_id,
            hash_token(token),
            name,
            timedelta(days=expires_in_days) if expires_in_days else None,
            MAX_API_TOKENS,
        )
        if row is None:
            raise Conflict(
                f"at most {MAX_API_TOKENS} API tokens; revoke one first", code="too_many_tokens"
            )
        log.info("account.token_created", token_id=str(row["id"]))
        return {**token_resource(row), "token": token}

    async def list_api_tokens(self, user_id: UUID) -> list[dict[str, Any]]:
        rows = await self.pool.fetch(
            """SELECT id, name, created_at, expires_at FROM api_tokens
                WHERE user_id = $1 AND revoked_at IS NULL
                  AND (expires_at IS NULL OR expires_at > now())
                ORDER BY created_at DESC, id DESC""",
            user_id,
        )
        return [token_resource(r) for r in rows]

    async def revoke_api_token(self, user_id: UUID, token_id: UUID) -> bool:
        # The owner is in the WHERE: another user's token id is simply "not found".
        done = await self.pool.execute(
            """UPDATE api_tokens SET revoked_at = now()
                WHERE id = $1 AND user_id = $2 AND revoked_at IS NULL""",
            token_id,
            user_id,
        )
        TOKEN_CACHE.forget_user(user_id)
        return bool(done == "UPDATE 1")

    # ---- reading --------------------------------------------------------------------

    async def user(self, user_id: UUID) -> dict[str, Any]:
        row = await self.pool.fetchrow(
            "SELECT id, email, plan, email_verified_at, created_at FROM users WHERE id = $1",
            user_id,
        )
        if row is None:  # deleted while the request ran
            raise Unauthorized()
        return user_resource(row)

    async def me(self, who: Principal) -> dict[str, Any]:
        """The account with its limits and usage (what a web client shows)."""
        user = await self.user(who.user_id)
        quota = lim.GenerationLimits.for_plan(self.settings, user["plan"])
        used = await lim.usage(self.pool, who.user_id)
        return {
            **user,
            "limits": {
                "max_active_generations": quota.max_active or None,
                "daily_quota": quota.daily_quota or None,
                "requests_per_minute": self.settings.requests_per_minute or None,
                "active_generations": used["active"],
                "generations_today": used["today"],
            },
        }

    # ---- helpers ---------------------------------------------------------------------

    async def _issue(
        self, conn: asyncpg.Connection, user_id: UUID, email: str, purpose: Purpose
    ) -> str:
        ttl = (
            self.settings.email_verification_ttl_s
            if purpose == "verify_email"
            else self.settings.password_reset_ttl_s
        )
        token = _PREFIX[purpose] + secrets.token_urlsafe(32)
        await conn.execute(
            """INSERT INTO account_tokens (id, user_id, purpose, token_hash, email, expires_at)
               VALUES (gen_random_uuid(), $1, $2, $3, $4, now() + $5::interval)""",
            user_id,
            purpose,
            hash_token(token),
            email,
            timedelta(seconds=ttl),
        )
        return token

    async def _cooldown(self, purpose: str, email: str) -> bool:
        """At most one mail of a kind per address per ``mail_cooldown_s``: sign-up and
        reset forms cannot be used to flood someone's inbox."""
        return await self.limiter.cooldown(
            self.limiter.keys.mail_cooldown(purpose, email), self.settings.mail_cooldown_s
        )

    def _verification_mail(self, email: str, token: str) -> Mail:
        link = f"{self.settings.web_url}/verify-email#token={token}"
        hours = self.settings.email_verification_ttl_s // 3600
        return Mail(
            to=email,
            subject="Confirm your e-mail address",
            text=(
                "Welcome to gengui.\n\n"
                f"Confirm your address to start creating images:\n\n{link}\n\n"
                f"The link works once, for {hours} hours. If you did not sign up, "
                "ignore this mail.\n"
            ),
            link=link,
        )

    def _exists_mail(self, email: str) -> Mail:
        link = f"{self.settings.web_url}/reset-password"
        return Mail(
            to=email,
            subject="You already have a gengui account",
            text=(
                "Someone (perhaps you) tried to sign up with this address, which already "
                "has an account. Nothing was changed.\n\n"
                f"Forgot your password? Reset it here:\n\n{link}\n"
            ),
            link=link,
        )

    def _reset_mail(self, email: str, token: str) -> Mail:
        link = f"{self.settings.web_url}/reset-password#token={token}"
        minutes = self.settings.password_reset_ttl_s // 60
        return Mail(
            to=email,
            subject="Reset your gengui password",
            text=(
                f"Choose a new password here:\n\n{link}\n\n"
                f"The link works once, for {minutes} minutes. Resetting signs you out "
                "everywhere and revokes your API tokens. If you did not ask for this, "
                "ignore this mail: your password stays as it is.\n"
            ),
            link=link,
        )


def _bad_token() -> InvalidInput:
    return InvalidInput(
        "the link is not valid: it was used already, has expired, or was mistyped",
        code="invalid_or_expired_token",
    )


def user_resource(row: asyncpg.Record) -> dict[str, Any]:
    return {
        "id": str(row["id"]),
        "email": row["email"],
        "plan": row["plan"],
        "email_verified": row["email_verified_at"] is not None,
        "created_at": row["created_at"].isoformat(),
    }


def token_resource(row: asyncpg.Record) -> dict[str, Any]:
    return {
        "id": str(row["id"]),
        "name": row["name"],
        "created_at": row["created_at"].isoformat(),
        "expires_at": row["expires_at"].isoformat() if row["expires_at"] else None,
    }
