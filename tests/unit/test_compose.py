"""docker-compose.yml and the Dockerfile agree with the code: commands, settings, wiring.

Docker is not needed: the files are parsed and checked against ``core.cli`` and
``core.settings``.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any
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
}
LONG_RUNNING_GENGUI = ("api", "consumers", "reconciler", "worker")
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
    import os

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


def _settings_from(env: dict[str, Any]) -> Settings:
    fields = {
        k.removeprefix("GENGUI_").lower(): v for k, v in env.items() if k.startswith("GENGUI_")
    }
    return Settings(**fields)


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
@pytest.mark.parametrize("service", GENGUI_COMMANDS)
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
