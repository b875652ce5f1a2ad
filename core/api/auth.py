"""``/api/v1/auth``: sign-up, verification, sign-in and out, password reset, API tokens.

Browsers sign in with ``POST /auth/login`` and then carry two cookies: the session
(HttpOnly, SameSite=Lax, Secure outside development) and ``gengui_csrf``, readable by
the page, whose value goes in ``X-CSRF-Token`` on every POST/PUT/PATCH/DELETE. API
clients send ``Authorization: Bearer gg_...``, minted by ``POST /auth/tokens`` from a
signed-in session (or ``gengui users create``); a bearer token needs no CSRF header.

The unauthenticated POSTs here take JSON only (``parse_body``): a cross-site HTML form
cannot send ``application/json`` without a CORS preflight, which is never granted, so
another site cannot sign a visitor in or up (login CSRF).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from uuid import UUID

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from core.accounts import Accounts, NewSession
from core.api.http import (
    accounts_key,
    client_ip,
    json_response,
    parse_body,
    parse_uuid,
    require_user,
    runtime_key,
    session_key,
)
from core.api.openapi import Error, Param, Returns, add_security_scheme, doc
from core.errors import Forbidden, NotFound, Unauthorized
from core.passwords import MAX_LENGTH, MIN_LENGTH
from core.settings import Settings

routes = web.RouteTableDef()
TAGS = ["accounts"]


# ---- bodies -------------------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Credentials(_Body):
    email: str = Field(min_length=3, max_length=320)
    password: str = Field(min_length=MIN_LENGTH, max_length=MAX_LENGTH)


class Login(_Body):
    email: str = Field(min_length=1, max_length=320)
    # No minimum: a wrong password is a 401 whatever its length.
    password: str = Field(min_length=1, max_length=MAX_LENGTH)


class TokenBody(_Body):
    token: str = Field(min_length=1, max_length=200, description="From the mailed link.")


class ResetRequest(_Body):
    email: str = Field(min_length=3, max_length=320)


class ResetConfirm(_Body):
    token: str = Field(min_length=1, max_length=200, description="From the mailed link.")
    password: str = Field(min_length=MIN_LENGTH, max_length=MAX_LENGTH)


class CreateToken(_Body):
    name: str = Field(min_length=1, max_length=100, description="What the token is for.")
    expires_in_days: int | None = Field(
        90, ge=1, le=3650, description="Lifetime in days; null: until revoked."
    )


# ---- answers ------------------------------------------------------------------------


class Accepted(BaseModel):
    message: str


class User(BaseModel):
    id: UUID
    email: str
    plan: str
    email_verified: bool = Field(description="Creating generations needs a verified e-mail.")
    created_at: datetime


class Limits(BaseModel):
    """Your limits (null: none) and where you stand."""

    max_active_generations: int | None
    daily_quota: int | None = Field(description="Generations per UTC day.")
    requests_per_minute: int | None
    active_generations: int
    generations_today: int


class Me(User):
    limits: Limits


class LoginResult(BaseModel):
    user: Me
    csrf_token: str = Field(
        description="Send as X-CSRF-Token on unsafe requests (also in the CSRF cookie)."
    )


class ApiToken(BaseModel):
    id: UUID
    name: str
    created_at: datetime
    expires_at: datetime | None


class NewApiToken(ApiToken):
    token: str = Field(description="Shown this once: only its hash is kept.")


class ApiTokenList(BaseModel):
    items: list[ApiToken]


LIMITED = Returns(Error, "Too many requests.", {"Retry-After": "Seconds to wait."})
CSRF = Returns(Error, "`csrf_failed`: a cookie-authenticated request without X-CSRF-Token.")
TOKEN_ID = Param("id", "path", {"type": "string", "format": "uuid"}, "The token's id.")


# ---- wiring -------------------------------------------------------------------------


def setup_accounts(app: web.Application, settings: Settings) -> None:
    """Routes, the session cookie as a security scheme, and one ``Accounts`` per app.
    Call after the runtime's cleanup context is appended: this one needs it open."""
    app.add_routes(routes)
    add_security_scheme(
        app,
        "sessionCookie",
        {
            "type": "apiKey",
            "in": "cookie",
            "name": settings.session_cookie,
            "description": "The browser session from `POST /api/v1/auth/login`; unsafe "
            "methods also need the `X-CSRF-Token` header.",
        },
    )

    async def accounts_ctx(app: web.Application) -> AsyncIterator[None]:
        accounts = Accounts(app[runtime_key])
        app[accounts_key] = accounts
        yield
        await accounts.aclose()  # mails in flight are delivered, bounded

    app.cleanup_ctx.append(accounts_ctx)


def _accounts(request: web.Request) -> Accounts:
    return request.app[accounts_key]


async def _per_ip(request: web.Request) -> None:
    s = request.app[runtime_key].settings
    await _accounts(request).limiter.check_ip(
        "auth", client_ip(request), s.auth_requests_per_minute_per_ip
    )


def _set_session_cookies(response: web.StreamResponse, s: Settings, session: NewSession) -> None:
    for name, value, httponly in (
        (s.session_cookie, session.token, True),
        (s.csrf_cookie, session.csrf_token, False),  # the page reads it
    ):
        response.set_cookie(
            name,
            value,
            max_age=s.session_lifetime_s,
            path="/",
            secure=s.secure_cookies,
            httponly=httponly,
            samesite="Lax",
        )


def _clear_session_cookies(response: web.StreamResponse, s: Settings) -> None:
    for name in (s.session_cookie, s.csrf_cookie):
        response.del_cookie(name, path="/", secure=s.secure_cookies, samesite="Lax")


ACCEPTED = "If the address can be used, a mail is on its way."


# ---- sign-up and verification -------------------------------------------------------


@routes.post("/api/v1/auth/signup")
@doc(
    "Sign up",
    request=Credentials,
    responses={
        202: Returns(
            Accepted,
            "Check your mail: a verification link (or, for an address "
            "that has an account already, a notice) was sent.",
        ),
        403: Returns(Error, "`email_domain_not_allowed`: sign-up is limited to some domains."),
        429: LIMITED,
    },
    tags=TAGS,
    auth=False,
)
async def signup(request: web.Request) -> web.Response:
    """The answer is the same whether or not the address has an account already; the
    mailbox's owner is told which. Passwords: 10 to 1024 characters, anything goes."""
    await _per_ip(request)
    body = await parse_body(request, Credentials)
    await _accounts(request).signup(body.email, body.password)
    return json_response({"message": ACCEPTED}, status=202)


@routes.post("/api/v1/auth/verify")
@doc(
    "Verify your e-mail address",
    request=TokenBody,
    responses={
        200: User,
        400: Returns(Error, "`invalid_or_expired_token`, or an invalid body."),
        429: LIMITED,
    },
    tags=TAGS,
    auth=False,
)
async def verify(request: web.Request) -> web.Response:
    """With the token from the mailed link (``{app_url}/verify-email#token=...``). A
    token works once."""
    await _per_ip(request)
    body = await parse_body(request, TokenBody)
    accounts = _accounts(request)
    who = await accounts.verify_email(body.token)
    return json_response(await accounts.user(who.user_id))


@routes.post("/api/v1/auth/verify/resend")
@doc(
    "Send the verification mail again",
    responses={
        202: Accepted,
        403: CSRF,
        409: Returns(Error, "`already_verified`."),
        429: LIMITED,
    },
    tags=TAGS,
)
async def resend_verification(request: web.Request) -> web.Response:
    who = await require_user(request)
    await _accounts(request).resend_verification(who)
    return json_response({"message": ACCEPTED}, status=202)


# ---- sign-in ------------------------------------------------------------------------


@routes.post("/api/v1/auth/login")
@doc(
    "Sign in",
    request=Login,
    responses={
        200: Returns(
            LoginResult,
            "Signed in: the session and CSRF cookies are set.",
            {"Set-Cookie": "The session cookie (HttpOnly) and the CSRF cookie."},
        ),
        401: Returns(Error, "`invalid_credentials`."),
        429: Returns(
            Error,
            "`login_locked`: too many failed sign-ins for this account or address.",
            {"Retry-After": "Seconds until the lockout ends."},
        ),
    },
    tags=TAGS,
    auth=False,
)
async def login(request: web.Request) -> web.Response:
    """Starts a browser session. Scripts can use it too (keep the cookies, send
    ``csrf_token`` as X-CSRF-Token) to mint an API token with ``POST /auth/tokens``."""
    body = await parse_body(request, Login)
    accounts = _accounts(request)
    s = request.app[runtime_key].settings
    who = await accounts.login(body.email, body.password, client_ip(request))
    old = request.cookies.get(s.session_cookie)
    if old:
        await accounts.end_session(old)  # one browser, one session
    session = await accounts.create_session(who.user_id)
    response = json_response({"user": await accounts.me(who), "csrf_token": session.csrf_token})
    _set_session_cookies(response, s, session)
    return response


@routes.post("/api/v1/auth/logout")
@doc(
    "Sign out",
    responses={204: Returns(None, "Signed out; the cookies are cleared."), 403: CSRF},
    tags=TAGS,
    auth=False,
)
async def logout(request: web.Request) -> web.Response:
    """Ends the browser session of the cookie (with X-CSRF-Token, like any unsafe
    request). Without a live session there is nothing to end: still 204. API tokens
    are revoked with ``DELETE /auth/tokens/{id}``."""
    s = request.app[runtime_key].settings
    token = request.cookies.get(s.session_cookie)
    if token and "Authorization" not in request.headers:
        try:
            await require_user(request)  # checks the CSRF header
        except Unauthorized:
            pass  # the session ended already
        else:
            await _accounts(request).end_session(token)
    response = web.Response(status=204)
    _clear_session_cookies(response, s)
    return response


@routes.get("/api/v1/auth/me")
@doc("You: account and limits", responses={200: Me, 429: LIMITED}, tags=TAGS)
async def me(request: web.Request) -> web.Response:
    who = await require_user(request)
    return json_response(await _accounts(request).me(who))


# ---- password reset -----------------------------------------------------------------


@routes.post("/api/v1/auth/password/reset")
@doc(
    "Ask for a password reset link",
    request=ResetRequest,
    responses={202: Returns(Accepted, "Whether or not the address has an account."), 429: LIMITED},
    tags=TAGS,
    auth=False,
)
async def request_reset(request: web.Request) -> web.Response:
    await _per_ip(request)
    body = await parse_body(request, ResetRequest)
    await _accounts(request).request_password_reset(body.email)
    return json_response({"message": ACCEPTED}, status=202)


@routes.post("/api/v1/auth/password/reset/confirm")
@doc(
    "Set a new password",
    request=ResetConfirm,
    responses={
        204: Returns(None, "Done: sign in with the new password."),
        400: Returns(Error, "`invalid_or_expired_token`, or an invalid body."),
        429: LIMITED,
    },
    tags=TAGS,
    auth=False,
)
async def confirm_reset(request: web.Request) -> web.Response:
    """With the token from the mailed link (``{app_url}/reset-password#token=...``).
    Verifies the address, signs out every session and revokes every API token."""
    await _per_ip(request)
    body = await parse_body(request, ResetConfirm)
    await _accounts(request).reset_password(body.token, body.password)
    return web.Response(status=204)


# ---- API tokens ---------------------------------------------------------------------


@routes.post("/api/v1/auth/tokens")
@doc(
    "Create an API token",
    request=CreateToken,
    responses={
        201: NewApiToken,
        403: Returns(
            Error,
            "`session_required` (tokens are minted from a signed-in browser session, not "
            "by another token), `email_unverified`, or `csrf_failed`.",
        ),
        409: Returns(Error, "`too_many_tokens`."),
        429: LIMITED,
    },
    tags=TAGS,
)
async def create_token(request: web.Request) -> web.Response:
    """The token is in this answer only. A token cannot mint tokens: a leaked one
    could otherwise outlive its own revocation through the tokens it made."""
    who = await require_user(request)
    if request.get(session_key) is None:
        raise Forbidden("sign in to create API tokens", code="session_required")
    if not who.email_verified:
        raise Forbidden("verify your e-mail address first", code="email_unverified")
    body = await parse_body(request, CreateToken)
    created = await _accounts(request).create_api_token(
        who.user_id, body.name, body.expires_in_days
    )
    return json_response(created, status=201)


@routes.get("/api/v1/auth/tokens")
@doc("Your API tokens", responses={200: ApiTokenList, 429: LIMITED}, tags=TAGS)
async def list_tokens(request: web.Request) -> web.Response:
    """Live tokens (not revoked, not expired), newest first; never the secrets."""
    who = await require_user(request)
    return json_response({"items": await _accounts(request).list_api_tokens(who.user_id)})


@routes.delete("/api/v1/auth/tokens/{id}")
@doc(
    "Revoke an API token",
    params=[TOKEN_ID],
    responses={204: Returns(None, "Revoked."), 403: CSRF, 404: None, 429: LIMITED},
    tags=TAGS,
)
async def revoke_token(request: web.Request) -> web.Response:
    who = await require_user(request)
    if not await _accounts(request).revoke_api_token(
        who.user_id, parse_uuid(request.match_info["id"])
    ):
        raise NotFound()
    return web.Response(status=204)
