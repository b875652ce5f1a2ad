"""The API documents itself: every route has a declaration, the OpenAPI document is
valid, real responses match it, and a bounded schemathesis run finds no 5xx and no
answer outside the documented shapes. The AsyncAPI document covers every stream."""

from __future__ import annotations

import asyncio
import copy
import inspect
import re
from typing import Any

import pytest
from aiohttp import web
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate as validate_openapi
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from core.api.app import create_app
from core.api.openapi import (
    Param,
    add_security_scheme,
    doc,
    internal,
    route_doc,
    undocumented_routes,
)
from core.keys import Keys
from core.runtime import Runtime
from tests.conftest import UserAuth

BODY = {"prompt": "a lighthouse at dusk"}


async def _openapi(client) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    resp = await client.get("/api/openapi.json")
    assert resp.status == 200
    return await resp.json()  # type: ignore[no-any-return]


def _validator(document: dict[str, Any], component: str) -> Draft202012Validator:
    """A JSON Schema validator for one component, its refs resolved inside the document."""
    registry: Registry = Registry().with_resource(
        "urn:gengui:openapi", Resource.from_contents(document, default_specification=DRAFT202012)
    )
    schema = {"$ref": f"urn:gengui:openapi#/components/schemas/{component}"}
    return Draft202012Validator(schema, registry=registry)


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "$ref"] + [
            r for v in node.values() for r in _refs(v)
        ]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def _resolve(document: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = document
    for part in ref[2:].split("/"):
        node = node[part]
    return node


# ---- coverage and validity ------------------------------------------------------------


async def test_every_route_is_documented(client) -> None:
    # A new route needs @doc(...) next to its handler (see core/api/openapi.py), or
    # @internal when it is deliberately not part of the API (static assets).
    assert undocumented_routes(client.app) == []


async def test_an_undocumented_route_is_reported(rt: Runtime) -> None:
    app = create_app(rt.settings, rt)

    async def stray(request: web.Request) -> web.Response:
        return web.Response()

    @internal
    async def asset(request: web.Request) -> web.Response:
        return web.Response()

    app.router.add_post("/api/v1/stray/{id}", stray)
    app.router.add_get("/static-thing", asset)
    missing = undocumented_routes(app)
    assert "POST /api/v1/stray/{id}" in missing
    assert not any("/static-thing" in m for m in missing)
    assert not any(m.startswith("HEAD ") for m in missing)


async def test_the_document_is_valid_openapi_3_1_and_covers_the_routes(client) -> None:
    document = await _openapi(client)
    validate_openapi(document)
    assert document["openapi"].startswith("3.1")
    documented = {
        (method.upper(), path) for path, item in document["paths"].items() for method in item
    }
    routed = {
        (route.method, route.resource.canonical)
        for route in client.app.router.routes()
        if route.method != "HEAD"
        and route.resource is not None
        and not getattr(route_doc(route.handler), "internal", False)
    }
    assert documented == routed
    ids = [op["operationId"] for item in document["paths"].values() for op in item.values()]
    assert len(ids) == len(set(ids)), "operationIds must be unique"
    for ref in set(_refs(document)):
        _resolve(document, ref)  # every $ref points at something


async def test_operations_declare_path_params_errors_and_security(client) -> None:
    document = await _openapi(client)
    schemes = set(document["components"]["securitySchemes"])
    assert "bearerAuth" in schemes
    for path, item in document["paths"].items():
        names = set(re.findall(r"\{([^}]+)\}", path))
        for method, op in item.items():
            where = f"{method.upper()} {path}"
            declared = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            assert declared == names, where
            for status, response in op["responses"].items():
                if status[0] in "45" and status != "503":
                    schema = response["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/Error"}, where
            for requirement in op["security"]:
                assert set(requirement) <= schemes, where
            if op["security"]:
                assert "401" in op["responses"], where


async def test_a_registered_security_scheme_is_accepted_by_secured_operations(
    rt: Runtime,
) -> None:
    from core.api.openapi import build_openapi

    app = create_app(rt.settings, rt)
    add_security_scheme(app, "sessionCookie", {"type": "apiKey", "in": "cookie", "name": "sid"})
    document = build_openapi(app)
    assert document["components"]["securitySchemes"]["sessionCookie"]["in"] == "cookie"
    op = document["paths"]["/api/v1/generations"]["post"]
    assert {"sessionCookie": []} in op["security"] and {"bearerAuth": []} in op["security"]
    assert document["paths"]["/healthz"]["get"]["security"] == []


def test_doc_keeps_the_handler_and_reads_its_docstring() -> None:
    async def handler(request: web.Request) -> web.Response:
        """Why this exists."""
        return web.Response()

    marked = doc("Summary", responses={204: None}, params=[Param("q", "query")])(handler)
    assert marked is handler
    assert inspect.iscoroutinefunction(marked)


async def test_real_responses_match_the_documented_schemas(
    client, alice: UserAuth, rt: Runtime
) -> None:
    document = await _openapi(client)
    generation = _validator(document, "Generation")
    page = _validator(document, "GenerationPage")
    error = _validator(document, "Error")

    created = await client.post("/api/v1/generations", json=BODY, headers=alice.headers)
    assert created.status == 202
    body = await created.json()
    generation.validate(body)
    # The documented model and core.generations.resource name the same fields.
    assert set(body) == set(document["components"]["schemas"]["Generation"]["properties"])
    got = await client.get(f"/api/v1/generations/{body['id']}", headers=alice.headers)
    generation.validate(await got.json())
    listed = await client.get("/api/v1/generations?limit=1", headers=alice.headers)
    page.validate(await listed.json())
    cancelled = await client.post(f"/api/v1/generations/{body['id']}/cancel", headers=alice.headers)
    generation.validate(await cancelled.json())
    for resp in (
        await client.post("/api/v1/generations", json={}, headers=alice.headers),
        await client.get("/api/v1/generations"),
        await client.get("/api/v1/generations/not-a-uuid", headers=alice.headers),
        await client.post(f"/api/v1/generations/{body['id']}/retry", headers=alice.headers),
        await client.get("/nowhere"),
    ):
        assert resp.status >= 400
        error.validate(await resp.json())


# ---- the pages ---------------------------------------------------------------------------


async def test_docs_pages_are_served_by_gengui_itself(client) -> None:
    for page, spec in (("/docs", "/api/openapi.json"), ("/docs/events", "/docs/asyncapi.json")):
        resp = await client.get(page)
        assert resp.status == 200
        assert resp.content_type == "text/html"
        html = await resp.text()
        assert f'data-spec="{spec}"' in html
        # Nothing from another origin: no CDN, and the browser is told so.
        assert not re.search(r"""(src|href)=["']?(https?:)?//""", html)
        assert "default-src 'none'" in resp.headers["Content-Security-Policy"]
        for asset in re.findall(r'(?:src|href)="(/docs/assets/[^"]+)"', html):
            got = await client.get(asset)
            assert got.status == 200, asset
            assert got.content_type in ("text/javascript", "text/css")
    missing = await client.get("/docs/assets/..%2Fsettings.py")
    assert missing.status == 404
    assert (await missing.json())["error"]["code"] == "not_found"


async def test_asyncapi_document_covers_every_stream_and_the_user_channel(
    client, rt: Runtime
) -> None:
    resp = await client.get("/docs/asyncapi.json")
    assert resp.status == 200
    document = await resp.json()
    assert document["asyncapi"] == "3.0.0"
    for ref in set(_refs(document)):
        _resolve(document, ref)

    def address_pattern(address: str) -> re.Pattern[str]:
        parts = re.split(r"\{[^}]+\}", address)
        return re.compile("[^:]+".join(re.escape(p) for p in parts) + "$")

    patterns = [address_pattern(c["address"]) for c in document["channels"].values()]
    keys: Keys = rt.settings.keys
    # Every stream name Keys defines (properties) is some channel's address.
    for name, _ in inspect.getmembers(Keys, lambda m: isinstance(m, property)):
        address = getattr(keys, name)
        assert any(p.match(address) for p in patterns), f"Keys.{name} ({address}) undocumented"
    for address in (keys.jobs("openai"), keys.user_channel("5b1f5b3e-0000-0000-0000-000000000000")):
        assert any(p.match(address) for p in patterns), address
    for channel in document["channels"].values():
        assert channel["address"].startswith(f"{rt.settings.stream_prefix}:")
    actions = {(op["channel"]["$ref"], op["action"]) for op in document["operations"].values()}
    for channel_id in document["channels"]:
        ref = f"#/channels/{channel_id}"
        assert {(ref, "send"), (ref, "receive")} <= actions, channel_id


# ---- fuzzing ------------------------------------------------------------------------------

MAX_EXAMPLES = 25


def _fuzz(document: dict[str, Any], base_url: str, headers: dict[str, str]) -> list[str]:
    """Run schemathesis over every fuzzable operation; returns the failures found."""
    import requests
    import schemathesis
    from hypothesis import HealthCheck, Phase, given
    from hypothesis import settings as hsettings
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_headers_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_headers_conformance,
        response_schema_conformance,
    ]
    document = copy.deepcopy(document)
    for item in document["paths"].values():
        for method in [m for m, op in item.items() if op.get("x-gengui-fuzz") is False]:
            del item[method]  # streams that never end
    schema = schemathesis.openapi.from_dict(document)
    failures: list[str] = []
    with requests.Session() as session:
        for result in schema.get_all_operations():
            operation = result.ok()

            @hsettings(
                max_examples=MAX_EXAMPLES,
                database=None,
                deadline=None,
                derandomize=True,  # the same cases every run: CI failures reproduce
                phases=[Phase.explicit, Phase.generate, Phase.shrink],
                suppress_health_check=list(HealthCheck),
            )
            @given(
                case=operation.as_strategy(GenerationMode.POSITIVE)
                | operation.as_strategy(GenerationMode.NEGATIVE)
            )
            def run(case: Any) -> None:
                case.call_and_validate(
                    base_url=base_url, session=session, headers=headers, checks=checks
                )

            try:
                run()
            except (Exception, BaseExceptionGroup) as exc:  # schemathesis' FailureGroup
                failures.append(f"{operation.label}: {exc}")
    return failures


@pytest.mark.timeout(120)
async def test_schemathesis_finds_no_server_error_and_no_undocumented_answer(
    client, alice: UserAuth
) -> None:
    document = await _openapi(client)
    base_url = str(client.make_url("")).rstrip("/")
    failures = await asyncio.to_thread(_fuzz, document, base_url, alice.headers)
    assert not failures, "\n\n".join(failures)
