"""Users only ever see their own data: a walk over EVERY route of the app.

The routes come from ``app.router.routes()``, so a route added later is walked too.
Each route that is not in ``PUBLIC`` (with the reason it needs no user) must answer

- 401 with no credentials, a malformed or unknown token, a revoked or expired token,
  or a dead session cookie;
- 404 when Alice (by bearer token, and by session cookie with its CSRF header) names
  Bob's resources in the path;

and no answer, on any route with any credentials, may contain Bob's data. A new
route with path parameters fails here until ``BOBS`` says what Bob's ids for it are.
Afterwards Bob's things are as they were: nothing Alice sent changed them.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from argon2 import PasswordHasher

from core import passwords
from core.api.http import accounts_key
from core.auth import issue_token
from core.runtime import Runtime
from tests.conftest import UserAuth, make_user

PASSWORD = "correct horse battery staple"

# (method, path template) -> why it answers without a signed-in user.
PUBLIC: dict[tuple[str, str], str] = {
    ("GET", "/healthz"): "liveness probe",
    ("GET", "/readyz"): "readiness probe: dependency status only",
    ("GET", "/metrics"): "Prometheus scrape: counts, no user data",
    ("GET", "/api/openapi.json"): "the API's own description",
    ("GET", "/docs"): "documentation page",
    ("GET", "/docs/events"): "documentation page",
    ("GET", "/docs/asyncapi.json"): "the streams' description",
    ("GET", "/docs/assets/{name}"): "documentation page assets",
    ("GET", "/"): "the web client's page (it signs in through the API)",
    ("GET", "/verify-email"): "the web client's page, where the mailed link lands",
    ("GET", "/reset-password"): "the web client's page, where the mailed link lands",
    ("GET", "/app/{name}"): "the web client's script and style",
    ("POST", "/api/v1/webhooks/{provider}/{generation_id}"): (
        "provider callbacks: authenticated by the HMAC signature in the URL instead"
    ),
    ("POST", "/api/v1/auth/signup"): "creating an account",
    ("POST", "/api/v1/auth/login"): "signing in",
    ("POST", "/api/v1/auth/logout"): "ends the cookie's session if any; answers nothing else",
    ("POST", "/api/v1/auth/verify"): "the mailed token is the credential",
    ("POST", "/api/v1/auth/password/reset"): "always 202, mails the owner only",
    ("POST", "/api/v1/auth/password/reset/confirm"): "the mailed token is the credential",
}

# Bodies that get past validation, so the walk reaches the ownership checks.
BODIES: dict[tuple[str, str], dict[str, Any]] = {
    ("POST", "/api/v1/generations"): {"prompt": "alice's walk"},
    ("POST", "/api/v1/auth/tokens"): {"name": "alice's walk"},
}


@pytest.fixture(autouse=True)
def cheap_argon2(monkeypatch: pytest.MonkeyPatch) -> None:
    # The flow, not the hash cost, is under test (see test_accounts.py).
    monkeypatch.setattr(
        passwords, "_hasher", PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
    )


@dataclass
class Bob:
    auth: UserAuth
    email: str
    generation_id: str
    token_id: uuid.UUID
    session: str

    def ids(self, template: str) -> dict[str, str] | None:
        """Bob's values for a route's path parameters; None: not known (a new route)."""
        return BOBS.get(template, lambda bob: None)(self)

    def markers(self) -> list[str]:
        """Strings that appear in an answer only if it leaks Bob's data."""
        return [
            self.email,
            str(self.auth.user_id),
            self.generation_id,
            str(self.token_id),
            "bob's secret prompt",
            "bob's token",
        ]


BOBS: dict[str, Any] = {
    "/api/v1/generations/{id}": lambda bob: {"id": bob.generation_id},
    "/api/v1/generations/{id}/image": lambda bob: {"id": bob.generation_id},
    "/api/v1/generations/{id}/thumbnail": lambda bob: {"id": bob.generation_id},
    "/api/v1/generations/{id}/cancel": lambda bob: {"id": bob.generation_id},
    "/api/v1/generations/{id}/retry": lambda bob: {"id": bob.generation_id},
    "/api/v1/auth/tokens/{id}": lambda bob: {"id": str(bob.token_id)},
    # Public routes with parameters: filled so that they name Bob's things too.
    "/api/v1/webhooks/{provider}/{generation_id}": lambda bob: {
        "provider": "runpod",
        "generation_id": bob.generation_id,
    },
    "/docs/assets/{name}": lambda bob: {"name": "docs.js"},
    "/app/{name}": lambda bob: {"name": "app.js"},
}


async def _with_password(rt: Runtime, email: str) -> UserAuth:
    user = await make_user(rt, email)
    await rt.pool.execute(
        "UPDATE users SET password_hash = $2 WHERE id = $1",
        user.user_id,
        await passwords.hash_password(PASSWORD),
    )
    return user


async def _session(client: TestClient, email: str) -> tuple[str, str]:  # type: ignore[type-arg]
    """(session cookie value, CSRF token), leaving the client's jar empty."""
    resp = await client.post("/api/v1/auth/login", json={"email": email, "password": PASSWORD})
    assert resp.status == 200
    csrf = (await resp.json())["csrf_token"]
    session = resp.cookies["gengui_session"].value
    client.session.cookie_jar.clear()
    return session, csrf


async def _bob(client: TestClient, rt: Runtime) -> Bob:  # type: ignore[type-arg]
    auth = await _with_password(rt, "bob@example.com")
    created = await client.post(
        "/api/v1/generations", json={"prompt": "bob's secret prompt"}, headers=auth.headers
    )
    assert created.status == 202
    gid = (await created.json())["id"]
    # Completed with an image and a thumbnail: every generation route has something.
    await rt.pool.execute(
        """UPDATE generations SET status = 'failed', image_key = 'k', thumbnail_key = 't'
            WHERE id = $1""",
        uuid.UUID(gid),
    )
    token_id = await rt.pool.fetchval(
        "UPDATE api_tokens SET name = 'bob''s token' WHERE user_id = $1 RETURNING id",
        auth.user_id,
    )
    session, _ = await _session(client, "bob@example.com")
    return Bob(auth, "bob@example.com", gid, token_id, session)


def _url(template: str, values: dict[str, str]) -> str:
    return re.sub(r"\{([^}:]+)(?::[^}]*)?\}", lambda m: values[m.group(1)], template)


async def _call(
    client: TestClient,  # type: ignore[type-arg]
    method: str,
    path: str,
    template: str,
    *,
    headers: dict[str, str] | None = None,
    cookie: str | None = None,
) -> tuple[int, str]:
    """(status, body text). An event stream is read for what is there, then closed."""
    client.session.cookie_jar.clear()
    if cookie is not None:
        client.session.cookie_jar.update_cookies({"gengui_session": cookie}, client.make_url("/"))
    body = BODIES.get((method, template), {}) if method in ("POST", "PUT", "PATCH") else None
    # A connection each: a stream cut short (or one that answers HEAD with a body)
    # cannot garble the next answer on a kept-alive connection.
    headers = {**(headers or {}), "Connection": "close"}
    try:
        resp = await client.request(method, path, json=body, headers=headers)
    except aiohttp.ClientResponseError as exc:
        # Not an HTTP answer (e.g. a body after the headers of a HEAD response).
        return -1, f"{exc.message}"
    try:
        if resp.content_type == "text/event-stream":
            try:
                text = (await asyncio.wait_for(resp.content.readany(), 0.5)).decode()
            except TimeoutError:
                text = ""
        else:
            text = (await resp.read()).decode(errors="replace")
    finally:
        resp.close()
        client.session.cookie_jar.clear()
    return resp.status, text


def _routes(app: web.Application) -> list[tuple[str, str]]:
    return sorted(
        {
            (route.method, route.resource.canonical)
            for route in app.router.routes()
            if route.resource is not None and route.method != "*"
        }
    )


async def test_every_route_answers_only_its_owner(client, rt: Runtime) -> None:  # type: ignore[no-untyped-def]
    routes = _routes(client.app)
    assert len(routes) > 20
    public = {(m, p) for (m, p) in routes if (m if m != "HEAD" else "GET", p) in PUBLIC}
    # Every allowlisted route exists: a stale entry would hide a renamed route.
    assert set(PUBLIC) <= set(routes)

    alice = await _with_password(rt, "alice@example.com")
    bob = await _bob(client, rt)
    alice_session, alice_csrf = await _session(client, "alice@example.com")

    revoked = await issue_token(rt.pool, bob.auth.user_id, "revoked")
    await rt.pool.execute("UPDATE api_tokens SET revoked_at = now() WHERE name = 'revoked'")
    expired = await issue_token(
        rt.pool, bob.auth.user_id, "expired", expires_at=datetime.now(UTC) - timedelta(seconds=1)
    )
    dead_session, _ = await _session(client, "bob@example.com")
    await client.app[accounts_key].end_session(dead_session)

    nobody: dict[str, dict[str, Any]] = {
        "no credentials": {},
        "unknown token": {"headers": {"Authorization": "Bearer gg_" + "A" * 43}},
        "not bearer": {"headers": {"Authorization": f"Basic {bob.auth.token}"}},
        "bare token": {"headers": {"Authorization": bob.auth.token}},
        "revoked token": {"headers": {"Authorization": f"Bearer {revoked}"}},
        "expired token": {"headers": {"Authorization": f"Bearer {expired}"}},
        "unknown session": {"cookie": "gs_" + "A" * 43},
        "ended session": {"cookie": dead_session, "headers": {"X-CSRF-Token": "x"}},
        "session id as bearer": {"headers": {"Authorization": f"Bearer {bob.session}"}},
    }
    as_alice: dict[str, dict[str, Any]] = {
        "alice's token": {"headers": alice.headers},
        "alice's session": {"cookie": alice_session, "headers": {"X-CSRF-Token": alice_csrf}},
    }

    failures: list[str] = []
    markers = bob.markers()
    for method, template in routes:
        names = re.findall(r"\{([^}:]+)", template)
        values = bob.ids(template) if names else {}
        if values is None:
            failures.append(f"{method} {template}: new route; add Bob's ids for it to BOBS")
            continue
        path = _url(template, values)
        is_public = (method, template) in public
        for label, how in {**nobody, **({} if is_public else as_alice)}.items():
            status, text = await _call(client, method, path, template, **how)
            where = f"{method} {template} ({label}): {status}"
            if status == -1:
                failures.append(f"{where}: the answer is not valid HTTP: {text[:200]}")
                continue
            leaked = [m for m in markers if m in text]
            if leaked:
                failures.append(f"{where} leaks {leaked}: {text[:200]}")
            if is_public:
                continue
            if label in nobody and status != 401:
                failures.append(f"{where}, wanted 401: {text[:200]}")
            if label in as_alice and names and status != 404:
                failures.append(f"{where}, wanted 404 for Bob's ids: {text[:200]}")
            if label in as_alice and not names and status >= 500:
                failures.append(f"{where}: {text[:200]}")
    assert not failures, "\n".join(failures)

    # Bob's things are as they were.
    row = await rt.pool.fetchrow(
        "SELECT status, attempt FROM generations WHERE id = $1", uuid.UUID(bob.generation_id)
    )
    assert (row["status"], row["attempt"]) == ("failed", 1)
    assert (await client.get("/api/v1/auth/me", headers=bob.auth.headers)).status == 200
    client.session.cookie_jar.update_cookies({"gengui_session": bob.session}, client.make_url("/"))
    me = await client.get("/api/v1/auth/me")
    assert me.status == 200 and (await me.json())["email"] == bob.email
    mine = await rt.pool.fetchval(
        "SELECT count(*) FROM generations WHERE user_id = $1", bob.auth.user_id
    )
    assert mine == 1
