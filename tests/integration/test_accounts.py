"""Accounts over HTTP on real Postgres and Redis, with mail read from a real SMTP
server (aiosmtpd): sign-up to first image, sessions and CSRF, login throttling,
password reset, API tokens."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import uuid
from collections.abc import AsyncIterator
from http.cookies import SimpleCookie
from typing import Any

import pytest
import pytest_asyncio
import structlog
from aiohttp.test_utils import TestClient, TestServer
from argon2 import PasswordHasher, Type

from core import passwords
from core.api.app import create_app
from core.api.http import accounts_key
from core.auth import create_user
from core.passwords import hash_password
from core.runtime import Runtime
from tests.conftest import UserAuth
from tests.fakes.smtp import FakeSMTP

PASSWORD = "correct horse battery staple"
BODY = {"prompt": "a lighthouse at dusk", "width": 256, "height": 256}

# argon2id at its production cost (64 MiB, t=3) takes ~0.3 s per hash on a CI core;
# these tests hash dozens of times. Same algorithm, smallest cost: what is tested is
# the flow, and test_the_production_hash_cost_is_rfc_9106s checks the real parameters.
CHEAP = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)


@pytest.fixture(autouse=True)
def cheap_argon2(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(passwords, "_hasher", CHEAP)
    monkeypatch.setattr(passwords, "_dummy_hash", None)


async def password_hash(password: str = PASSWORD) -> str:
    return await hash_password(password)


def test_the_production_hash_cost_is_rfc_9106s() -> None:
    # RFC 9106 section 4, second recommended option: argon2id, t=3, 64 MiB, p=4.
    hasher = PasswordHasher()
    assert (hasher.type, hasher.time_cost, hasher.memory_cost, hasher.parallelism) == (
        Type.ID,
        3,
        64 * 1024,
        4,
    )
    assert isinstance(passwords._hasher, PasswordHasher)


async def test_a_hash_made_with_older_parameters_is_upgraded_at_sign_in(
    rt: Runtime,
    web: TestClient,  # type: ignore[type-arg]
) -> None:
    older = PasswordHasher(time_cost=1, memory_cost=16, parallelism=1).hash(PASSWORD)
    user_id = await create_user(rt.pool, "old@example.com", password_hash=older)
    await login(web, "old@example.com")
    stored = await rt.pool.fetchval("SELECT password_hash FROM users WHERE id = $1", user_id)
    assert stored != older and stored.startswith("$argon2id$v=19$m=8,t=1,p=1$")
    assert CHEAP.verify(stored, PASSWORD)


@contextlib.asynccontextmanager
async def api(rt: Runtime, **overrides: Any) -> AsyncIterator[TestClient]:  # type: ignore[type-arg]
    settings = rt.settings.model_copy(update=overrides)
    app = create_app(settings, dataclasses.replace(rt, settings=settings))
    async with TestClient(TestServer(app)) as client:
        yield client


@pytest_asyncio.fixture
async def smtp() -> AsyncIterator[FakeSMTP]:
    async with FakeSMTP() as fake:
        yield fake


@pytest_asyncio.fixture
async def web(rt: Runtime, smtp: FakeSMTP) -> AsyncIterator[TestClient]:  # type: ignore[type-arg]
    async with api(rt, **smtp.settings(), public_url="http://127.0.0.1:8000") as client:
        yield client


def token_of(link: str) -> str:
    _, _, token = link.partition("#token=")
    assert token, link
    return token


async def login(client: TestClient, email: str, password: str = PASSWORD) -> str:  # type: ignore[type-arg]
    """Signs the client's cookie jar in; returns the CSRF token."""
    resp = await client.post("/api/v1/auth/login", json={"email": email, "password": password})
    assert resp.status == 200, await resp.text()
    return str((await resp.json())["csrf_token"])


async def user_with_password(rt: Runtime, email: str, *, verified: bool = True) -> uuid.UUID:
    return await create_user(rt.pool, email, verified=verified, password_hash=await password_hash())


def cookies_of(resp: Any) -> dict[str, Any]:
    jar: SimpleCookie = SimpleCookie()
    for header in resp.headers.getall("Set-Cookie", []):
        jar.load(header)
    return {name: morsel for name, morsel in jar.items()}


# ---- the acceptance path ---------------------------------------------------------------


async def test_sign_up_to_first_image_over_http(
    rt: Runtime,
    smtp: FakeSMTP,
    web: TestClient,  # type: ignore[type-arg]
    pipeline: asyncio.Event,
) -> None:
    email = "newcomer@example.com"
    resp = await web.post("/api/v1/auth/signup", json={"email": email, "password": PASSWORD})
    assert resp.status == 202

    mail = await smtp.wait_for(email)
    assert mail["Subject"] == "Confirm your e-mail address"
    link = FakeSMTP.link(mail)
    assert link.startswith("http://127.0.0.1:8000/verify-email#token=gv_")
    assert smtp.envelopes[0][1] == [email]

    # Signed in but not verified: no images yet.
    csrf = await login(web, email)
    me = await (await web.get("/api/v1/auth/me")).json()
    assert (me["email"], me["email_verified"], me["plan"]) == (email, False, "free")
    refused = await web.post("/api/v1/generations", json=BODY, headers={"X-CSRF-Token": csrf})
    assert refused.status == 403
    assert (await refused.json())["error"]["code"] == "email_unverified"

    verified = await web.post("/api/v1/auth/verify", json={"token": token_of(link)})
    assert verified.status == 200
    assert (await verified.json())["email_verified"] is True
    again = await web.post("/api/v1/auth/verify", json={"token": token_of(link)})
    assert again.status == 400
    assert (await again.json())["error"]["code"] == "invalid_or_expired_token"

    # The browser: session cookie plus X-CSRF-Token.
    created = await web.post("/api/v1/generations", json=BODY, headers={"X-CSRF-Token": csrf})
    assert created.status == 202, await created.text()
    gid = (await created.json())["id"]
    async with asyncio.timeout(15):
        while (body := await (await web.get(f"/api/v1/generations/{gid}")).json())[
            "status"
        ] != "completed":
            assert body["status"] not in {"failed", "cancelled"}, body
            await asyncio.sleep(0.05)
    image = await web.get(body["image_url"])
    assert image.status == 200 and image.content_type == "image/png"
    assert len(await image.read()) > 100

    # An API client: a token minted from the session, then used without cookies.
    minted = await web.post(
        "/api/v1/auth/tokens", json={"name": "script"}, headers={"X-CSRF-Token": csrf}
    )
    assert minted.status == 201
    token = (await minted.json())["token"]
    web.session.cookie_jar.clear()
    bearer = {"Authorization": f"Bearer {token}"}
    assert (await web.get(f"/api/v1/generations/{gid}")).status == 401
    listed = await (await web.get("/api/v1/generations", headers=bearer)).json()
    assert [g["id"] for g in listed["items"]] == [gid]
    second = await web.post("/api/v1/generations", json=BODY, headers=bearer)
    assert second.status == 202


# ---- sign-up ---------------------------------------------------------------------------


async def test_sign_up_with_a_taken_address_answers_the_same_and_tells_only_its_owner(
    rt: Runtime,
    smtp: FakeSMTP,
    web: TestClient,  # type: ignore[type-arg]
) -> None:
    await user_with_password(rt, "taken@example.com")
    new = await web.post(
        "/api/v1/auth/signup", json={"email": "fresh@example.com", "password": PASSWORD}
    )
    taken = await web.post(
        "/api/v1/auth/signup", json={"email": "Taken@Example.com", "password": "another password!"}
    )
    assert new.status == taken.status == 202
    assert await new.json() == await taken.json()
    notice = await smtp.wait_for("taken@example.com")
    assert notice["Subject"] == "You already have a gengui account"
    assert "#token=" not in FakeSMTP.body(notice)
    assert (await smtp.wait_for("fresh@example.com"))["Subject"] == "Confirm your e-mail address"
    # The existing account is untouched: its password still works, the other does not.
    assert (
        await rt.pool.fetchval("SELECT count(*) FROM users WHERE email = 'taken@example.com'") == 1
    )
    await login(web, "taken@example.com")
    wrong = await web.post(
        "/api/v1/auth/login", json={"email": "taken@example.com", "password": "another password!"}
    )
    assert wrong.status == 401


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"email": "a@example.com", "password": "short"}, 400, "validation_error"),
        ({"email": "a@example.com", "password": "x" * 1025}, 400, "validation_error"),
        ({"email": "not-an-address", "password": PASSWORD}, 400, "invalid_email"),
        ({"email": "a@b@example.com", "password": PASSWORD}, 400, "invalid_email"),
        ({"email": "a@localhost", "password": PASSWORD}, 400, "invalid_email"),
        ({"email": "a@example.com"}, 400, "validation_error"),
        ({"email": "a@example.com", "password": PASSWORD, "plan": "pro"}, 400, "validation_error"),
        ({"email": "a@other.org", "password": PASSWORD}, 403, "email_domain_not_allowed"),
    ],
)
async def test_sign_up_refuses_bad_input_and_other_domains(
    rt: Runtime, body: dict[str, Any], status: int, code: str
) -> None:
    async with api(rt, signup_allowed_domains=("example.com",)) as client:
        resp = await client.post("/api/v1/auth/signup", json=body)
        assert resp.status == status
        assert (await resp.json())["error"]["code"] == code
    assert await rt.pool.fetchval("SELECT count(*) FROM users") == 0


async def test_addresses_are_normalised_and_an_allowed_domain_signs_up(rt: Runtime) -> None:
    async with api(rt, signup_allowed_domains=("example.com",)) as client:
        resp = await client.post(
            "/api/v1/auth/signup", json={"email": "  Mixed.Case@EXAMPLE.com ", "password": PASSWORD}
        )
        assert resp.status == 202
        row = await rt.pool.fetchrow("SELECT email, password_hash, email_verified_at FROM users")
        assert row["email"] == "mixed.case@example.com"
        assert row["password_hash"].startswith("$argon2id$")
        assert PASSWORD not in row["password_hash"]
        assert row["email_verified_at"] is None
        await login(client, "MIXED.case@example.com")


async def test_without_smtp_the_link_is_logged_and_nothing_else_secret(rt: Runtime) -> None:
    async with api(rt, smtp_host=None) as client:
        with structlog.testing.capture_logs() as logs:
            resp = await client.post(
                "/api/v1/auth/signup", json={"email": "dev@example.com", "password": PASSWORD}
            )
            assert resp.status == 202
            await client.app[accounts_key].mailer.drain()
    unsent = [e for e in logs if e["event"] == "mail.not_sent"]
    assert len(unsent) == 1
    assert unsent[0]["to"] == "dev@example.com"
    token = token_of(unsent[0]["link"])
    assert token.startswith("gv_")
    text = repr(logs)
    assert PASSWORD not in text
    assert text.count(token) == 1  # only the dev link
    async with api(rt) as client:
        assert (await client.post("/api/v1/auth/verify", json={"token": token})).status == 200


# ---- sessions and CSRF -------------------------------------------------------------------


async def test_session_cookies_are_httponly_lax_and_secure_outside_development(
    rt: Runtime,
) -> None:
    await user_with_password(rt, "c@example.com")
    creds = {"email": "c@example.com", "password": PASSWORD}
    for public_url, secure in (("http://localhost:8000", False), ("https://gengui.example", True)):
        async with api(rt, public_url=public_url) as client:
            resp = await client.post("/api/v1/auth/login", json=creds)
            assert resp.status == 200
            cookies = cookies_of(resp)
            session, csrf = cookies["gengui_session"], cookies["gengui_csrf"]
            assert session.value.startswith("gs_")
            assert session["httponly"] is True and csrf["httponly"] == ""
            for morsel in (session, csrf):
                assert morsel["samesite"] == "Lax"
                assert morsel["path"] == "/"
                assert int(morsel["max-age"]) == rt.settings.session_lifetime_s
                assert bool(morsel["secure"]) is secure
            assert csrf.value == (await resp.json())["csrf_token"]
    stored = await rt.pool.fetch("SELECT token_hash FROM sessions")
    assert len(stored) == 2 and all(len(r["token_hash"]) == 32 for r in stored)


async def test_cookie_requests_that_change_state_need_the_csrf_header(
    rt: Runtime,
    web: TestClient,  # type: ignore[type-arg]
) -> None:
    await user_with_password(rt, "csrf@example.com")
    csrf = await login(web, "csrf@example.com")
    assert (await web.get("/api/v1/generations")).status == 200  # safe: no header needed
    for headers in ({}, {"X-CSRF-Token": "nope"}, {"X-CSRF-Token": csrf[:-1]}):
        resp = await web.post("/api/v1/generations", json=BODY, headers=headers)
        assert resp.status == 403, headers
        assert (await resp.json())["error"]["code"] == "csrf_failed"
    # A cookie planted by a sibling site (double-submit without a signature would
    # accept it): the token is derived from the session secret, not read from a cookie.
    web.session.cookie_jar.update_cookies({"gengui_csrf": "planted"})
    resp = await web.post("/api/v1/generations", json=BODY, headers={"X-CSRF-Token": "planted"})
    assert resp.status == 403
    assert await rt.pool.fetchval("SELECT count(*) FROM generations") == 0
    ok = await web.post("/api/v1/generations", json=BODY, headers={"X-CSRF-Token": csrf})
    assert ok.status == 202


async def test_bearer_tokens_need_no_csrf_header_even_with_a_session_cookie(
    rt: Runtime,
    web: TestClient,  # type: ignore[type-arg]
    alice: UserAuth,
) -> None:
    await user_with_password(rt, "both@example.com")
    await login(web, "both@example.com")
    resp = await web.post("/api/v1/generations", json=BODY, headers=alice.headers)
    assert resp.status == 202
    owner = await rt.pool.fetchval("SELECT user_id FROM generations")
    assert owner == alice.user_id  # the bearer token decides, not the cookie


async def test_logout_ends_the_session_and_needs_the_csrf_header(
    rt: Runtime,
    web: TestClient,  # type: ignore[type-arg]
) -> None:
    await user_with_password(rt, "out@example.com")
    csrf = await login(web, "out@example.com")
    refused = await web.post("/api/v1/auth/logout")
    assert refused.status == 403
    assert (await web.get("/api/v1/auth/me")).status == 200
    session = next(c.value for c in web.session.cookie_jar if c.key == "gengui_session")
    done = await web.post("/api/v1/auth/logout", headers={"X-CSRF-Token": csrf})
    assert done.status == 204
    assert cookies_of(done)["gengui_session"].value == ""
    assert (await web.get("/api/v1/auth/me")).status == 401
    # The old cookie, replayed, is dead server-side too.
    web.session.cookie_jar.update_cookies({"gengui_session": session})
    replayed = await web.get("/api/v1/auth/me")
    assert replayed.status == 401
    assert (await replayed.json())["error"]["code"] == "invalid_session"
    assert (await web.post("/api/v1/auth/logout")).status == 204  # nothing left to end


async def test_expired_sessions_are_refused(rt: Runtime, web: TestClient) -> None:  # type: ignore[type-arg]
    await user_with_password(rt, "old@example.com")
    await login(web, "old@example.com")
    await rt.pool.execute("UPDATE sessions SET expires_at = now() - interval '1 second'")
    assert (await web.get("/api/v1/auth/me")).status == 401


# ---- sign-in throttling --------------------------------------------------------------------


async def test_wrong_password_and_unknown_address_get_the_same_answer(
    rt: Runtime,
    web: TestClient,  # type: ignore[type-arg]
) -> None:
    await user_with_password(rt, "known@example.com")
    answers = []
    for email in ("known@example.com", "unknown@example.com"):
        resp = await web.post(
            "/api/v1/auth/login", json={"email": email, "password": "wrong password"}
        )
        answers.append((resp.status, await resp.json()))
    assert answers[0] == answers[1]
    assert answers[0][0] == 401 and answers[0][1]["error"]["code"] == "invalid_credentials"
    # An operator-made account without a password cannot sign in with any password.
    await create_user(rt.pool, "nopass@example.com")
    resp = await web.post(
        "/api/v1/auth/login", json={"email": "nopass@example.com", "password": ""}
    )
    assert resp.status == 400
    resp = await web.post(
        "/api/v1/auth/login", json={"email": "nopass@example.com", "password": "anything at all"}
    )
    assert resp.status == 401


async def test_an_account_is_locked_after_too_many_failures(rt: Runtime) -> None:
    await user_with_password(rt, "target@example.com")
    await user_with_password(rt, "bystander@example.com")
    async with api(rt, login_max_failures=3, login_lockout_s=600) as client:

        async def attempt(email: str, password: str) -> Any:
            return await client.post(
                "/api/v1/auth/login", json={"email": email, "password": password}
            )

        # A success in between starts the count afresh.
        for _ in range(2):
            assert (await attempt("target@example.com", "wrong password")).status == 401
        assert (await attempt("target@example.com", PASSWORD)).status == 200
        for _ in range(3):
            assert (await attempt("target@example.com", "wrong password")).status == 401
        locked = await attempt("target@example.com", PASSWORD)  # even the right one
        assert locked.status == 429
        assert (await locked.json())["error"]["code"] == "login_locked"
        assert 590 <= int(locked.headers["Retry-After"]) <= 600
        # Another account from the same address is not affected.
        assert (await attempt("bystander@example.com", PASSWORD)).status == 200
        # The lockout ends (here: its key expires early).
        keys = [k async for k in rt.redis.scan_iter(match=f"{rt.settings.stream_prefix}:login:*")]
        await rt.redis.delete(*keys)
        assert (await attempt("target@example.com", PASSWORD)).status == 200


async def test_parallel_guesses_cannot_exceed_the_failure_limit(rt: Runtime) -> None:
    await user_with_password(rt, "target@example.com")
    async with api(rt, login_max_failures=5) as client:
        responses = await asyncio.gather(
            *(
                client.post(
                    "/api/v1/auth/login",
                    json={"email": "target@example.com", "password": f"guess number {i}"},
                )
                for i in range(20)
            )
        )
        statuses = sorted(r.status for r in responses)
        # Each attempt is counted before its password is checked: exactly 5 were checked.
        assert statuses == [401] * 5 + [429] * 15


async def test_one_address_guessing_many_accounts_is_locked_out(rt: Runtime) -> None:
    async with api(rt, login_ip_max_failures=4) as client:
        statuses = []
        for i in range(6):
            resp = await client.post(
                "/api/v1/auth/login", json={"email": f"u{i}@example.com", "password": "guess"}
            )
            statuses.append(resp.status)
        assert statuses == [401, 401, 401, 401, 429, 429]


# ---- verification mail --------------------------------------------------------------------


async def test_resending_the_verification_mail(
    rt: Runtime,
    smtp: FakeSMTP,
    web: TestClient,  # type: ignore[type-arg]
) -> None:
    await user_with_password(rt, "late@example.com", verified=False)
    csrf = await login(web, "late@example.com")
    resp = await web.post("/api/v1/auth/verify/resend", headers={"X-CSRF-Token": csrf})
    assert resp.status == 202
    link = FakeSMTP.link(await smtp.wait_for("late@example.com"))
    again = await web.post("/api/v1/auth/verify/resend", headers={"X-CSRF-Token": csrf})
    assert again.status == 429
    assert (await again.json())["error"]["code"] == "mail_cooldown"
    assert int(again.headers["Retry-After"]) == rt.settings.mail_cooldown_s
    assert (await web.post("/api/v1/auth/verify", json={"token": token_of(link)})).status == 200
    done = await web.post("/api/v1/auth/verify/resend", headers={"X-CSRF-Token": csrf})
    assert done.status == 409
    assert (await done.json())["error"]["code"] == "already_verified"


async def test_verification_tokens_expire_and_are_bound_to_their_purpose(
    rt: Runtime,
    smtp: FakeSMTP,
    web: TestClient,  # type: ignore[type-arg]
) -> None:
    for email in ("a@example.com", "b@example.com"):
        resp = await web.post("/api/v1/auth/signup", json={"email": email, "password": PASSWORD})
        assert resp.status == 202
    expired = token_of(FakeSMTP.link(await smtp.wait_for("a@example.com")))
    fresh = token_of(FakeSMTP.link(await smtp.wait_for("b@example.com")))
    await rt.pool.execute(
        "UPDATE account_tokens SET expires_at = now() - interval '1 second' WHERE email = $1",
        "a@example.com",
    )
    for token in (expired, "gv_" + "x" * 43, fresh.replace("gv_", "gr_")):
        resp = await web.post("/api/v1/auth/verify", json={"token": token})
        assert resp.status == 400, token
    # Not a reset token either.
    resp = await web.post(
        "/api/v1/auth/password/reset/confirm", json={"token": fresh, "password": "new password!!"}
    )
    assert resp.status == 400
    assert (await web.post("/api/v1/auth/verify", json={"token": fresh})).status == 200
    verified = await rt.pool.fetch(
        "SELECT email FROM users WHERE email_verified_at IS NOT NULL ORDER BY email"
    )
    assert [r["email"] for r in verified] == ["b@example.com"]


# ---- password reset -----------------------------------------------------------------------


async def test_password_reset_revokes_every_session_and_token(
    rt: Runtime,
    smtp: FakeSMTP,
    web: TestClient,  # type: ignore[type-arg]
) -> None:
    user_id = await user_with_password(rt, "forgot@example.com", verified=False)
    await rt.pool.execute("UPDATE users SET email_verified_at = now() WHERE id = $1", user_id)
    csrf = await login(web, "forgot@example.com")
    minted = await web.post(
        "/api/v1/auth/tokens", json={"name": "ci"}, headers={"X-CSRF-Token": csrf}
    )
    bearer = {"Authorization": f"Bearer {(await minted.json())['token']}"}
    assert (await web.get("/api/v1/auth/me", headers=bearer)).status == 200

    for email in ("nobody@example.com", "forgot@example.com"):
        resp = await web.post("/api/v1/auth/password/reset", json={"email": email})
        assert resp.status == 202
    assert (await web.post("/api/v1/auth/password/reset", json={"email": "x"})).status == 400
    link = FakeSMTP.link(await smtp.wait_for("forgot@example.com"))
    assert link.startswith("http://127.0.0.1:8000/reset-password#token=gr_")
    await web.app[accounts_key].mailer.drain()
    assert smtp.to("nobody@example.com") == []
    # A second request within the cooldown sends nothing (and still answers 202).
    resp = await web.post("/api/v1/auth/password/reset", json={"email": "forgot@example.com"})
    assert resp.status == 202
    await web.app[accounts_key].mailer.drain()
    assert len(smtp.to("forgot@example.com")) == 1

    new = {"token": token_of(link), "password": "a brand new passphrase"}
    weak = await web.post("/api/v1/auth/password/reset/confirm", json={**new, "password": "short"})
    assert weak.status == 400
    done = await web.post("/api/v1/auth/password/reset/confirm", json=new)
    assert done.status == 204
    again = await web.post("/api/v1/auth/password/reset/confirm", json=new)
    assert again.status == 400
    assert (await again.json())["error"]["code"] == "invalid_or_expired_token"

    assert (await web.get("/api/v1/auth/me")).status == 401  # the session is over
    assert (await web.get("/api/v1/auth/me", headers=bearer)).status == 401  # and the token
    old = await web.post(
        "/api/v1/auth/login", json={"email": "forgot@example.com", "password": PASSWORD}
    )
    assert old.status == 401
    await login(web, "forgot@example.com", "a brand new passphrase")


async def test_a_reset_verifies_the_address(
    rt: Runtime,
    smtp: FakeSMTP,
    web: TestClient,  # type: ignore[type-arg]
) -> None:
    await user_with_password(rt, "unverified@example.com", verified=False)
    await web.post("/api/v1/auth/password/reset", json={"email": "unverified@example.com"})
    link = FakeSMTP.link(await smtp.wait_for("unverified@example.com"))
    resp = await web.post(
        "/api/v1/auth/password/reset/confirm",
        json={"token": token_of(link), "password": "a brand new passphrase"},
    )
    assert resp.status == 204
    assert await rt.pool.fetchval("SELECT email_verified_at IS NOT NULL FROM users")


# ---- API tokens ---------------------------------------------------------------------------


async def test_api_tokens_are_minted_from_a_session_listed_and_revoked(
    rt: Runtime,
    web: TestClient,  # type: ignore[type-arg]
    alice: UserAuth,
) -> None:
    await user_with_password(rt, "dev@example.com")
    csrf = {"X-CSRF-Token": await login(web, "dev@example.com")}
    first = await web.post(
        "/api/v1/auth/tokens", json={"name": "laptop", "expires_in_days": 7}, headers=csrf
    )
    second = await web.post(
        "/api/v1/auth/tokens", json={"name": "ci", "expires_in_days": None}, headers=csrf
    )
    assert first.status == second.status == 201
    one, two = await first.json(), await second.json()
    assert one["token"].startswith("gg_") and one["expires_at"] is not None
    assert two["expires_at"] is None
    stored = await rt.pool.fetch("SELECT token_hash FROM api_tokens WHERE name IN ('laptop','ci')")
    assert all(one["token"].encode() not in bytes(r["token_hash"]) for r in stored)

    listed = await (await web.get("/api/v1/auth/tokens")).json()
    assert [t["name"] for t in listed["items"]] == ["ci", "laptop"]
    assert all("token" not in t for t in listed["items"])

    # A token cannot mint tokens.
    bearer = {"Authorization": f"Bearer {one['token']}"}
    refused = await web.post("/api/v1/auth/tokens", json={"name": "x"}, headers=bearer)
    assert refused.status == 403
    assert (await refused.json())["error"]["code"] == "session_required"
    # Someone else's token id is "not found", and stays alive.
    other = await alice_token_id(rt, alice)
    assert (await web.delete(f"/api/v1/auth/tokens/{other}", headers=csrf)).status == 404
    assert (await web.get("/api/v1/auth/me", headers=alice.headers)).status == 200

    assert (await web.delete(f"/api/v1/auth/tokens/{one['id']}", headers=csrf)).status == 204
    assert (await web.delete(f"/api/v1/auth/tokens/{one['id']}", headers=csrf)).status == 404
    web.session.cookie_jar.clear()
    assert (await web.get("/api/v1/auth/me", headers=bearer)).status == 401
    ci = {"Authorization": f"Bearer {two['token']}"}
    assert (await web.get("/api/v1/auth/me", headers=ci)).status == 200


async def alice_token_id(rt: Runtime, alice: UserAuth) -> uuid.UUID:
    token_id: uuid.UUID = await rt.pool.fetchval(
        "SELECT id FROM api_tokens WHERE user_id = $1", alice.user_id
    )
    return token_id


async def test_expired_api_tokens_are_refused_and_unlisted(
    rt: Runtime,
    web: TestClient,  # type: ignore[type-arg]
    alice: UserAuth,
) -> None:
    await rt.pool.execute("UPDATE api_tokens SET expires_at = now() - interval '1 second'")
    resp = await web.get("/api/v1/auth/me", headers=alice.headers)
    assert resp.status == 401
    assert (await resp.json())["error"]["code"] == "invalid_token"


async def test_an_unverified_account_cannot_mint_tokens(
    rt: Runtime,
    web: TestClient,  # type: ignore[type-arg]
) -> None:
    await user_with_password(rt, "new@example.com", verified=False)
    csrf = await login(web, "new@example.com")
    resp = await web.post("/api/v1/auth/tokens", json={"name": "x"}, headers={"X-CSRF-Token": csrf})
    assert resp.status == 403
    assert (await resp.json())["error"]["code"] == "email_unverified"


async def test_me_shows_the_account_and_its_limits(rt: Runtime, alice: UserAuth) -> None:
    async with api(
        rt, plan_quotas={"free": 7}, max_active_generations=3, requests_per_minute=100
    ) as client:
        await client.post("/api/v1/generations", json=BODY, headers=alice.headers)
        me = await (await client.get("/api/v1/auth/me", headers=alice.headers)).json()
    assert me["id"] == str(alice.user_id)
    assert me["email"] == "alice@example.com" and me["email_verified"] is True
    assert me["limits"] == {
        "max_active_generations": 3,
        "daily_quota": 7,
        "requests_per_minute": 100,
        "active_generations": 1,
        "generations_today": 1,
    }
