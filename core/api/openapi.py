"""OpenAPI 3.1 from the routes themselves: each handler declares its documentation with
``@doc`` next to its code, and ``build_openapi`` walks ``app.router``.

Why a declaration per handler rather than one big hand-written YAML: the document
then cannot drift from the routes. ``undocumented_routes`` lists every route without a
declaration (HEAD, which aiohttp adds for each GET, and routes marked ``@internal``
excepted); a test keeps that list empty, so a new route without docs fails the suite.

Request and response bodies are the pydantic models the handlers use
(``model_json_schema`` with refs into ``#/components/schemas``). Every 4xx answer is
the one error shape (``Error``) the middleware produces. Usage::

    @routes.get("/api/v1/things/{id}")
    @doc(
        "Read a thing",
        responses={200: Thing, 404: Error},
        params=[Param("id", "path", {"type": "string", "format": "uuid"})],
        tags=["things"],
    )
    async def get_thing(request: web.Request) -> web.Response: ...

Secured operations (``auth=True``, the default) get ``401`` and ``429`` added (what
``require_user`` answers) and accept any registered security scheme: bearer always;
others (a session cookie) are added with ``add_security_scheme(app, ...)`` when the
app is built.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from importlib import metadata
from typing import Any, Literal, TypeVar

from aiohttp import web
from pydantic import BaseModel, ConfigDict
from pydantic.json_schema import JsonSchemaMode, models_json_schema

REF = "#/components/schemas/{model}"
ATTR = "__gengui_openapi__"

H = TypeVar("H", bound=Callable[..., Any])


class ErrorBody(BaseModel):
    """What went wrong: a stable machine-readable ``code``, a message for people, and
    ``details`` where the code has some (the invalid fields of a ``validation_error``)."""

    model_config = ConfigDict(title="ErrorBody")

    code: str
    message: str
    details: Any = None


class Error(BaseModel):
    """Every 4xx and 5xx answer of the API has this shape."""

    model_config = ConfigDict(title="Error")

    error: ErrorBody


Location = Literal["path", "query", "header", "cookie"]


@dataclass(frozen=True)
class Param:
    """One parameter. Path parameters not declared are documented as strings."""

    name: str
    location: Location
    schema: Mapping[str, Any] = field(default_factory=lambda: {"type": "string"})
    description: str | None = None
    required: bool | None = None  # default: True for path, False otherwise


@dataclass(frozen=True)
class Body:
    """A body that is not a JSON pydantic model: an image, HTML, plain text, SSE, or
    JSON described by a raw schema. ``schema`` may be omitted for opaque bytes."""

    media_type: str | Sequence[str]
    schema: Mapping[str, Any] | type[BaseModel] | None = None
    description: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Returns:
    """A JSON model response with a description or response headers (name -> meaning)."""

    model: type[BaseModel] | None
    description: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)


ResponseSpec = type[BaseModel] | Body | Returns | None


@dataclass(frozen=True)
class RouteDoc:
    summary: str
    description: str | None
    request: type[BaseModel] | Body | None
    query: type[BaseModel] | None
    params: tuple[Param, ...]
    responses: Mapping[int | str, ResponseSpec]
    tags: tuple[str, ...]
    auth: bool
    fuzz: bool
    operation_id: str | None
    deprecated: bool
    internal: bool = False


def doc(
    summary: str,
    *,
    responses: Mapping[int | str, ResponseSpec],
    description: str | None = None,
    request: type[BaseModel] | Body | None = None,
    query: type[BaseModel] | None = None,
    params: Sequence[Param] = (),
    tags: Sequence[str] = (),
    auth: bool = True,
    fuzz: bool = True,
    operation_id: str | None = None,
    deprecated: bool = False,
) -> Callable[[H], H]:
    """Declare a handler's OpenAPI operation.

    ``responses`` maps a status to a model, a ``Returns``/``Body``, or ``None`` (no
    body; for 4xx/5xx ``None`` means the standard ``Error``). ``request`` is the JSON
    body model, ``query`` a model whose fields are the query parameters. ``auth=False``
    for public routes. ``fuzz=False`` keeps the API fuzzer off a route it cannot
    exercise (a stream that never ends). The description defaults to the docstring.
    """

    def mark(handler: H) -> H:
        setattr(
            handler,
            ATTR,
            RouteDoc(
                summary=summary,
                description=description,
                request=request,
                query=query,
                params=tuple(params),
                responses=dict(responses),
                tags=tuple(tags),
                auth=auth,
                fuzz=fuzz,
                operation_id=operation_id,
                deprecated=deprecated,
            ),
        )
        return handler

    return mark


def internal(handler: H) -> H:
    """Mark a route as deliberately left out of the document (static assets)."""
    setattr(
        handler,
        ATTR,
        RouteDoc("", None, None, None, (), {}, (), False, False, None, False, internal=True),
    )
    return handler


def route_doc(handler: object) -> RouteDoc | None:
    found = getattr(handler, ATTR, None)
    return found if isinstance(found, RouteDoc) else None


# ---- security schemes ---------------------------------------------------------------

BEARER = "bearerAuth"
security_schemes_key = web.AppKey("openapi_security_schemes", dict[str, dict[str, Any]])


def add_security_scheme(app: web.Application, name: str, scheme: Mapping[str, Any]) -> None:
    """Register another way to authenticate (e.g. ``{"type": "apiKey", "in": "cookie",
    "name": settings.session_cookie}``); every ``auth=True`` operation accepts it."""
    schemes = app.get(security_schemes_key)
    if schemes is None:
        schemes = {}
        app[security_schemes_key] = schemes
    schemes[name] = dict(scheme)


def _schemes(app: web.Application) -> dict[str, dict[str, Any]]:
    bearer = {
        "type": "http",
        "scheme": "bearer",
        "description": "An API token: `Authorization: Bearer gg_...` (`gengui users create`).",
    }
    extra = app.get(security_schemes_key)
    return {BEARER: bearer, **(extra or {})}


# ---- walking the router ---------------------------------------------------------------


@dataclass(frozen=True)
class Operation:
    path: str
    method: str
    handler: Any
    doc: RouteDoc | None


def operations(app: web.Application) -> Iterator[Operation]:
    """Every (path template, method) the app routes, HEAD excepted."""
    for resource in app.router.resources():
        if isinstance(resource, web.StaticResource):
            # Static file trees are not API operations; serve docs assets via routes.
            yield Operation(resource.canonical, "GET", None, None)
            continue
        for route in resource:
            if route.method == "HEAD":  # aiohttp adds one per GET
                continue
            handler = route.handler
            yield Operation(resource.canonical, route.method, handler, route_doc(handler))


def undocumented_routes(app: web.Application) -> list[str]:
    """``METHOD /path`` of each route with no ``@doc`` (or ``@internal``)."""
    return [f"{op.method} {op.path}" for op in operations(app) if op.doc is None]


_PATH_PARAM = re.compile(r"\{([^}:]+)(?::[^}]*)?\}")


def _version() -> str:
    try:
        return metadata.version("gengui")
    except metadata.PackageNotFoundError:
        return "0.0.0"


class _Models:
    """Collects every model, then resolves them together so shared sub-models and
    name clashes get one component each."""

    def __init__(self) -> None:
        self.wanted: list[tuple[type[BaseModel], JsonSchemaMode]] = [(Error, "serialization")]
        self.refs: dict[tuple[Any, JsonSchemaMode], dict[str, Any]] = {}
        self.components: dict[str, Any] = {}

    def want(self, model: type[BaseModel], mode: JsonSchemaMode) -> None:
        if (model, mode) not in self.wanted:
            self.wanted.append((model, mode))

    def resolve(self) -> None:
        refs, defs = models_json_schema(self.wanted, ref_template=REF)
        self.refs = {k: dict(v) for k, v in refs.items()}
        self.components = defs.get("$defs", {})

    def ref(self, model: type[BaseModel], mode: JsonSchemaMode) -> dict[str, Any]:
        return self.refs[(model, mode)]

    def properties(self, model: type[BaseModel]) -> tuple[dict[str, Any], set[str]]:
        """A query model's fields, each schema with refs into the components."""
        target = self.ref(model, "validation")["$ref"].rsplit("/", 1)[-1]
        schema = self.components[target]
        return dict(schema.get("properties", {})), set(schema.get("required", []))


def _body_models(spec: object) -> Iterator[type[BaseModel]]:
    if isinstance(spec, type) and issubclass(spec, BaseModel):
        yield spec
    elif isinstance(spec, Returns) and spec.model is not None:
        yield spec.model
    elif (
        isinstance(spec, Body)
        and isinstance(spec.schema, type)
        and issubclass(spec.schema, BaseModel)
    ):
        yield spec.schema


def _is_error(status: int | str) -> bool:
    return str(status)[0] in "45"


def _media(
    media_type: str | Sequence[str], schema: dict[str, Any] | None
) -> dict[str, dict[str, Any]]:
    types = [media_type] if isinstance(media_type, str) else list(media_type)
    return {t: ({"schema": schema} if schema is not None else {}) for t in types}


CSRF_FAILED = Returns(
    Error, "`csrf_failed`: a session cookie sent without its X-CSRF-Token header."
)
RATE_LIMITED = Returns(
    Error, "Over the per-user request budget.", {"Retry-After": "Seconds to wait."}
)

REQUEST_ID_HEADER = {
    "description": "The request's id: the client's `X-Request-ID` if it sent one, else "
    "a new one. Every log line about the request carries it.",
    "schema": {"type": "string"},
}


def _response(status: int | str, spec: ResponseSpec, models: _Models) -> dict[str, Any]:
    try:
        phrase = HTTPStatus(int(status)).phrase
    except ValueError:
        phrase = f"{status} response"
    headers: Mapping[str, str] = {}
    description: str | None = None
    content: dict[str, Any] | None = None
    if spec is None and _is_error(status):
        spec = Error
    if isinstance(spec, type) and issubclass(spec, BaseModel):
        content = _media("application/json", models.ref(spec, "serialization"))
    elif isinstance(spec, Returns):
        description, headers = spec.description, spec.headers
        if spec.model is not None:
            content = _media("application/json", models.ref(spec.model, "serialization"))
    elif isinstance(spec, Body):
        description, headers = spec.description, spec.headers
        schema: dict[str, Any] | None
        if isinstance(spec.schema, type):
            schema = models.ref(spec.schema, "serialization")
        else:
            schema = dict(spec.schema) if spec.schema is not None else None
        content = _media(spec.media_type, schema)
    out: dict[str, Any] = {"description": description or phrase}
    out["headers"] = {
        "X-Request-ID": {"$ref": "#/components/headers/RequestId"},
        **{
            name: {"description": text, "schema": {"type": "string"}}
            for name, text in headers.items()
        },
    }
    if content is not None:
        out["content"] = content
    return out


def _operation(op: Operation, d: RouteDoc, models: _Models, schemes: list[str]) -> dict[str, Any]:
    description = d.description
    if description is None and op.handler is not None and op.handler.__doc__:
        description = inspect.cleandoc(op.handler.__doc__)
    out: dict[str, Any] = {
        "operationId": d.operation_id or getattr(op.handler, "__name__", None),
        "summary": d.summary,
    }
    if description:
        out["description"] = description
    if d.tags:
        out["tags"] = list(d.tags)
    if d.deprecated:
        out["deprecated"] = True

    params: list[dict[str, Any]] = []
    declared = {(p.location, p.name): p for p in d.params}
    for name in _PATH_PARAM.findall(op.path):
        p = declared.pop(("path", name), None) or Param(name, "path")
        params.append(_param(p))
    if d.query is not None:
        props, required = models.properties(d.query)
        for name, schema in props.items():
            description = schema.pop("description", None)
            schema.pop("title", None)
            entry: dict[str, Any] = {"name": name, "in": "query", "schema": _no_null(schema)}
            entry["required"] = name in required
            if description:
                entry["description"] = description
            params.append(entry)
    params.extend(_param(p) for p in declared.values())
    if params:
        out["parameters"] = params

    if d.request is not None:
        if isinstance(d.request, Body):
            schema = d.request.schema
            resolved = (
                models.ref(schema, "validation")
                if isinstance(schema, type)
                else (dict(schema) if schema is not None else None)
            )
            out["requestBody"] = {
                "required": True,
                "content": _media(d.request.media_type, resolved),
            }
            if d.request.description:
                out["requestBody"]["description"] = d.request.description
        else:
            out["requestBody"] = {
                "required": True,
                "content": _media("application/json", models.ref(d.request, "validation")),
            }

    responses: dict[int | str, ResponseSpec] = dict(d.responses)
    # Answers the shared plumbing gives whatever the handler does.
    if d.auth:
        # require_user: no or a bad credential; over the per-user request budget.
        responses.setdefault(401, None)
        responses.setdefault(429, RATE_LIMITED)
        if op.method not in ("GET", "HEAD", "OPTIONS"):
            responses.setdefault(403, CSRF_FAILED)
    if d.request is not None:
        responses.setdefault(400, None)  # invalid JSON, wrong content type, invalid fields
        responses.setdefault(413, None)  # body over the app's client_max_size
    elif d.query is not None or any(p.location != "path" for p in d.params):
        responses.setdefault(400, None)
    out["responses"] = {
        str(status): _response(status, spec, models)
        for status, spec in sorted(responses.items(), key=lambda kv: str(kv[0]))
    }
    out["security"] = [{name: []} for name in schemes] if d.auth else []
    if not d.fuzz:
        out["x-gengui-fuzz"] = False
    return out


def _no_null(schema: dict[str, Any]) -> dict[str, Any]:
    """``X | None`` in a query model means "may be left out": a query string has no null."""
    branches = schema.get("anyOf")
    if isinstance(branches, list):
        rest = [b for b in branches if b != {"type": "null"}]
        if len(rest) == 1 and len(rest) < len(branches):
            merged = {k: v for k, v in schema.items() if k != "anyOf"}
            merged.update(rest[0])
            if merged.get("default", ...) is None:
                del merged["default"]
            return merged
    return schema


def _param(p: Param) -> dict[str, Any]:
    required = p.required if p.required is not None else p.location == "path"
    entry: dict[str, Any] = {"name": p.name, "in": p.location, "required": required}
    entry["schema"] = dict(p.schema)
    if p.description:
        entry["description"] = p.description
    return entry


def build_openapi(app: web.Application, *, servers: Sequence[str] = ()) -> dict[str, Any]:
    """The OpenAPI 3.1 document of every documented, non-internal route of ``app``."""
    documented = [op for op in operations(app) if op.doc is not None and not op.doc.internal]
    models = _Models()
    for op in documented:
        d = op.doc
        assert d is not None
        if d.request is not None:
            for model in _body_models(d.request):
                models.want(model, "validation")
        if d.query is not None:
            models.want(d.query, "validation")
        for spec in d.responses.values():
            for model in _body_models(spec):
                models.want(model, "serialization")
    models.resolve()

    schemes = _schemes(app)
    paths: dict[str, dict[str, Any]] = {}
    tags: set[str] = set()
    for op in documented:
        assert op.doc is not None
        paths.setdefault(op.path, {})[op.method.lower()] = _operation(
            op, op.doc, models, list(schemes)
        )
        tags.update(op.doc.tags)
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "gengui API",
            "version": _version(),
            "description": (
                "Create images from prompts and follow them to completion. Authenticate "
                "with `Authorization: Bearer <token>`. Every error is "
                '`{"error": {"code", "message", "details"}}` with a stable `code`. Send '
                "`X-Request-ID` to correlate a request with the server's logs."
            ),
        },
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": models.components,
            "headers": {"RequestId": REQUEST_ID_HEADER},
            "securitySchemes": schemes,
        },
        "tags": [{"name": t} for t in sorted(tags)],
    }
    if servers:
        document["servers"] = [{"url": url} for url in servers]
    return document
