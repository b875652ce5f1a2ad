"""docker-compose.yml and the Dockerfile agree with the code: commands, settings, wiring.

Docker is not needed: the files are parsed and checked against ``core.cli`` and
``core.settings``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path
from typing import Any
from unittest import mock
from urllib.parse import urlsplit

import pytest
import yaml

from core.cli import build_parser
from core.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

GENGUI_COMMANDS = {
    "migrate": "migrate",
    "api": "api",
    "consumers": "consumers",
    "reconciler": "reconciler",
    "worker": "worker",
    "mock-providers": "mock-providers",
}
LONG_RUNNING_GENGUI = ("api", "consumers", "reconciler", "worker")
# The gengui processes that share x-gengui-env (the mock providers need none of it).
GENGUI_WITH_ENV = ("migrate", *LONG_RUNNING_GENGUI)
# Without a port of their own, these serve /healthz on --metrics-port.
METRICS_PORT_SERVICES = ("consumers", "reconciler", "worker")
SERVERS = ("postgres", "redis", "minio")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings also reads GENGUI_* from the process; only the compose values must count."""
    for name in list(os.environ):
        if name.upper().startswith("GENGUI_"):
            monkeypatch.delenv(name)


def _env(service: dict[str, Any]) -> dict[str, Any]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # the ["KEY=value", ...] form
        return dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return dict(env)


def _command(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


_VARIABLE = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def _interpolate(value: Any) -> Any:
    """Compose's ``${NAME:-default}`` with nothing exported: the default (or blank)."""
    if not isinstance(value, str):
        return value
    return _VARIABLE.sub(lambda m: m.group(2) or "", value)


def _settings_from(env: dict[str, Any]) -> Settings:
    """Settings read the way a container reads them: from its environment (lists and maps
    as JSON, blank as unset)."""
    values = {k: str(_interpolate(v)) for k, v in env.items() if k.startswith("GENGUI_")}
    with mock.patch.dict(os.environ, values):
        return Settings()


def _depends_on(service: dict[str, Any]) -> dict[str, str]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):  # short form: started, not healthy
        return dict.fromkeys(deps, "service_started")
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


def _final_stage(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile's last stage, continuations joined."""
    instructions: list[tuple[str, str]] = []
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        keyword, _, args = current.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        current = ""
    last_from = max(i for i, (kw, _) in enumerate(instructions) if kw == "FROM")
    return instructions[last_from:]


def test_gengui_services_are_built_from_the_dockerfile(services: dict[str, dict[str, Any]]) -> None:
    built = {name for name, svc in services.items() if "build" in svc}
    assert built == set(GENGUI_COMMANDS)
    for name in built:
        build = services[name]["build"]
        context = build if isinstance(build, str) else build.get("context", ".")
        dockerfile = (
            "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
        )
        assert (COMPOSE.parent / context / dockerfile).resolve() == DOCKERFILE, name


@pytest.mark.parametrize(("service", "subcommand"), GENGUI_COMMANDS.items())
def test_command_is_a_gengui_subcommand(
    services: dict[str, dict[str, Any]], service: str, subcommand: str
) -> None:
    argv = _command(services[service])
    try:
        args = build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"{service}: `gengui {' '.join(argv)}` is not a valid gengui command line")
    assert args.command == subcommand


def test_every_gengui_variable_is_a_setting(services: dict[str, dict[str, Any]]) -> None:
    unknown = {
        f"{name}: {key}"
        for name, svc in services.items()
        for key in _env(svc)
        if key.startswith("GENGUI_")
        and key.removeprefix("GENGUI_").lower() not in Settings.model_fields
    }
    # Settings ignores unknown names (extra="ignore"), so a typo would pass silently.
    assert not unknown


def test_environment_values_are_strings(services: dict[str, dict[str, Any]]) -> None:
    # Compose rejects YAML booleans and nulls in an environment mapping.
    bad = {
        f"{name}: {key}={value!r}"
        for name, svc in services.items()
        for key, value in _env(svc).items()
        if not isinstance(value, str | int | float) or isinstance(value, bool)
    }
    assert not bad


@pytest.mark.usefixtures("clean_env")
def test_shared_environment_builds_valid_settings(compose: dict[str, Any]) -> None:
    settings = _settings_from(compose["x-gengui-env"])
    assert settings.database_url
    assert settings.redis_url
    assert settings.storage_backend == "s3"
    assert settings.s3_bucket  # open_storage refuses s3 without a bucket
    assert settings.s3_endpoint_url
    assert settings.s3_public_endpoint_url
    assert settings.s3_access_key_id is not None
    assert settings.s3_secret_access_key is not None
    assert settings.s3_create_bucket is True
    assert settings.log_format == "json"


@pytest.mark.usefixtures("clean_env")
@pytest.mark.parametrize("service", GENGUI_WITH_ENV)
def test_each_gengui_service_gets_the_shared_environment(
    compose: dict[str, Any], services: dict[str, dict[str, Any]], service: str
) -> None:
    env = _env(services[service])
    shared = compose["x-gengui-env"]
    assert {k: env.get(k) for k in shared} == shared
    _settings_from(env)  # the service's own overrides validate too


def test_urls_point_at_compose_services(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    env = compose["x-gengui-env"]
    db = urlsplit(env["GENGUI_DATABASE_URL"])
    pg = _env(services["postgres"])
    assert db.hostname == "postgres"
    assert (db.username, db.password, db.path.lstrip("/")) == (
        pg["POSTGRES_USER"],
        pg["POSTGRES_PASSWORD"],
        pg["POSTGRES_DB"],
    )
    assert urlsplit(env["GENGUI_REDIS_URL"]).hostname == "redis"
    assert urlsplit(env["GENGUI_S3_ENDPOINT_URL"]).hostname == "minio"
    minio = _env(services["minio"])
    assert env["GENGUI_S3_ACCESS_KEY_ID"] == minio["MINIO_ROOT_USER"]
    assert env["GENGUI_S3_SECRET_ACCESS_KEY"] == minio["MINIO_ROOT_PASSWORD"]
    # Presigned URLs are for browsers on the host: that port must be published.
    public_port = str(urlsplit(env["GENGUI_S3_PUBLIC_ENDPOINT_URL"]).port)
    assert any(str(p).split(":")[0] == public_port for p in services["minio"].get("ports", []))


def test_depended_on_services_exist_and_can_satisfy_the_condition(
    services: dict[str, dict[str, Any]],
) -> None:
    for name, svc in services.items():
        for target, condition in _depends_on(svc).items():
            assert target in services, f"{name} depends on unknown {target}"
            if condition == "service_healthy":
                check = services[target].get("healthcheck") or {}
                assert check.get("test"), f"{name} waits for {target} to be healthy: no healthcheck"
                assert not check.get("disable"), f"{target}'s healthcheck is disabled"
            if condition == "service_completed_successfully":
                # A one-shot that compose restarts never "completes".
                assert services[target].get("restart", "no") == "no", target


def test_gengui_services_wait_for_servers_and_migrations(
    services: dict[str, dict[str, Any]],
) -> None:
    assert _depends_on(services["migrate"]).get("postgres") == "service_healthy"
    for name in LONG_RUNNING_GENGUI:
        deps = _depends_on(services[name])
        assert deps.get("migrate") == "service_completed_successfully", name
        for server in SERVERS:
            assert deps.get(server) == "service_healthy", f"{name} -> {server}"


def test_long_running_services_restart(services: dict[str, dict[str, Any]]) -> None:
    for name in (*LONG_RUNNING_GENGUI, *SERVERS):
        assert services[name].get("restart") == "unless-stopped", name
    assert services["migrate"].get("restart", "no") == "no"


def test_servers_keep_data_in_named_volumes(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    declared = set(compose.get("volumes") or {})
    for name in SERVERS:
        named = {
            str(v).split(":")[0]
            for v in services[name].get("volumes", [])
            if not str(v).startswith((".", "/"))
        }
        assert named, f"{name} has no named volume"
        assert named <= declared, name


def test_redis_appends_only(services: dict[str, dict[str, Any]]) -> None:
    command = _command(services["redis"])
    assert "--appendonly" in command
    assert command[command.index("--appendonly") + 1] == "yes"


@pytest.mark.usefixtures("clean_env")
def test_api_is_reachable_and_checks_readiness(services: dict[str, dict[str, Any]]) -> None:
    api = services["api"]
    settings = _settings_from(_env(api))
    assert settings.api_host == "0.0.0.0"
    container_ports = {str(p).rsplit(":", 1)[-1].split("/")[0] for p in api.get("ports", [])}
    assert str(settings.api_port) in container_ports
    test = api["healthcheck"]["test"]
    assert test[0] == "CMD"
    assert test[1:3] == ["python", "-c"]
    compile(test[3], "api-healthcheck", "exec")  # the snippet is valid Python
    target = urlsplit(test[3].split("'")[1])
    assert target.path == "/readyz"
    assert target.port == settings.api_port


def test_dockerfile_runs_gengui_as_a_non_root_user() -> None:
    stage = _final_stage(DOCKERFILE.read_text())
    last = {kw: args for kw, args in stage}  # later instructions win, as in Docker
    assert json.loads(last["ENTRYPOINT"]) == ["gengui"]
    cmd = json.loads(last["CMD"])
    assert cmd == ["api"]
    build_parser().parse_args(cmd)
    user = last.get("USER", "root").split(":")[0]
    assert user not in ("root", "0")


def test_image_can_find_the_migrations() -> None:
    # core/migrations.py looks beside the core package: the install must be editable
    # (core imported from the copied source), and the context must include migrations/.
    text = DOCKERFILE.read_text()
    assert "pip install --no-deps -e ." in text or "pip install -e ." in text
    ignored = {
        line.strip().rstrip("/")
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert not ignored & {"migrations", "core", "pyproject.toml", "alembic.ini"}
    assert {".venv", ".git", ".gengui", "bench/results"} <= ignored


# ---- the full stack ----------------------------------------------------------------------


def _one_shot(name: str, services: dict[str, dict[str, Any]]) -> bool:
    """Run once and exit (migrate): others wait for it to complete, nothing restarts it."""
    waited_on = any(
        _depends_on(svc).get(name) == "service_completed_successfully" for svc in services.values()
    )
    return waited_on and services[name].get("restart", "no") == "no"


def test_the_stack_has_every_part_the_issue_names(services: dict[str, dict[str, Any]]) -> None:
    wanted = {
        "postgres", "redis", "minio", "growthbook", "mongo", "mailpit", "mock-providers",
        "api", "consumers", "reconciler", "worker",
    }  # fmt: skip
    assert wanted <= set(services)


def test_every_long_running_service_has_a_healthcheck_and_restarts(
    services: dict[str, dict[str, Any]],
) -> None:
    for name, svc in services.items():
        if _one_shot(name, services):
            continue
        check = svc.get("healthcheck") or {}
        assert check.get("test"), f"{name} has no healthcheck"
        assert not check.get("disable"), name
        test = check["test"]
        assert isinstance(test, list) and test[0] in ("CMD", "CMD-SHELL"), name
        if test[1:3] == ["python", "-c"]:
            compile(test[3], f"{name}-healthcheck", "exec")
        assert svc.get("restart") == "unless-stopped", name


@pytest.mark.parametrize("service", METRICS_PORT_SERVICES)
def test_processes_without_a_port_serve_health_on_their_metrics_port(
    services: dict[str, dict[str, Any]], service: str
) -> None:
    svc = services[service]
    args = build_parser().parse_args(_command(svc))
    assert args.metrics_port, f"{service}: no --metrics-port, so nothing answers the healthcheck"
    assert args.metrics_host == "0.0.0.0"  # reachable by a Prometheus in another container
    target = urlsplit(svc["healthcheck"]["test"][3].split("'")[1])
    assert (target.port, target.path) == (args.metrics_port, "/healthz")


@pytest.mark.usefixtures("clean_env")
def test_providers_point_at_the_mock_on_the_port_it_listens_on(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    mock = services["mock-providers"]
    args = build_parser().parse_args(_command(mock))
    assert args.host == "0.0.0.0"
    settings = _settings_from(compose["x-gengui-env"])
    for url in (
        settings.runpod_api_url,
        settings.gemini_api_url,
        settings.openai_api_url,
        settings.replicate_api_url,
    ):
        parts = urlsplit(url)
        assert (parts.hostname, parts.port) == ("mock-providers", args.port), url
    key = args.api_key
    for secret in (
        settings.runpod_api_key,
        settings.gemini_api_key,
        settings.openai_api_key,
        settings.replicate_api_token,
    ):
        assert secret is not None and secret.get_secret_value() == key
    assert settings.runpod_endpoint_id
    assert settings.replicate_webhook_secret is not None
    assert settings.replicate_webhook_secret.get_secret_value() == args.replicate_webhook_secret
    # Replicate outputs are fetched from the mock's own URLs.
    assert urlsplit(args.public_url).hostname in settings.download_hosts
    assert settings.download_allow_http is True
    health = urlsplit(mock["healthcheck"]["test"][3].split("'")[1])
    assert health.port == args.port


@pytest.mark.usefixtures("clean_env")
def test_webhooks_reach_the_api_and_every_process_signs_alike(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    settings = _settings_from(compose["x-gengui-env"])
    # Without a shared secret each container derives its own under /data: every
    # webhook would fail its signature check.
    assert settings.webhook_secret is not None
    public = urlsplit(settings.base_url)
    assert public.hostname == "api"
    assert public.port == _settings_from(_env(services["api"])).api_port


@pytest.mark.usefixtures("clean_env")
def test_flags_are_off_until_both_growthbook_values_are_given(compose: dict[str, Any]) -> None:
    settings = _settings_from(compose["x-gengui-env"])
    assert settings.growthbook_api_host is None and settings.growthbook_client_key is None


def test_growthbook_uses_its_mongo(services: dict[str, dict[str, Any]]) -> None:
    growthbook, mongo = services["growthbook"], services["mongo"]
    assert _depends_on(growthbook).get("mongo") == "service_healthy"
    uri = urlsplit(_env(growthbook)["MONGODB_URI"])
    mongo_env = _env(mongo)
    assert uri.hostname == "mongo"
    assert (uri.username, uri.password) == (
        mongo_env["MONGO_INITDB_ROOT_USERNAME"],
        mongo_env["MONGO_INITDB_ROOT_PASSWORD"],
    )
    declared = {str(v).split(":")[0] for v in mongo.get("volumes", [])}
    assert "mongo-data" in declared


@pytest.mark.usefixtures("clean_env")
def test_mail_goes_to_mailpit_and_links_point_at_the_host(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    settings = _settings_from(compose["x-gengui-env"])
    assert settings.smtp_host == "mailpit" and "mailpit" in services
    assert settings.smtp_port == 1025  # Mailpit's SMTP port inside the network
    assert settings.smtp_security == "none"
    # Mail links are opened by a browser on the host: the published API port.
    link = urlsplit(settings.app_url or "")
    assert link.hostname == "localhost"
    assert any(str(p).split(":")[0] == str(link.port) for p in services["api"].get("ports", []))
