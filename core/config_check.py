"""``gengui config check``: is this environment one gengui can run in?

Reads ``GENGUI_*`` the way every process does, then checks what start-up would trip
on later, each within a short timeout: Postgres answers and its schema is at the
latest migration, Redis answers, the storage settings are complete. Prints the
effective configuration with secrets hidden (also the password inside a URL) and
one line per check; exits 0 when all pass, 1 when a check fails, 2 when the
settings themselves do not parse.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO
from urllib.parse import urlsplit, urlunsplit

from pydantic import SecretStr, ValidationError

from core.config_ref import env_var, is_secret
from core.settings import Settings

TIMEOUT_S = 3.0


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def redact_url(url: str) -> str:
    """``scheme://user:***@host/...``: a DSN's password never reaches the terminal."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "***"
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def effective(settings: Settings) -> list[tuple[str, str, bool]]:
    """(variable, shown value, set explicitly) for every setting, secrets hidden."""
    rows = []
    for name, info in Settings.model_fields.items():
        value: Any = getattr(settings, name)
        if value is None:
            shown = "(unset)"
        elif is_secret(info) or isinstance(value, SecretStr):
            shown = "(set; hidden)"
        elif isinstance(value, str) and "://" in value:
            shown = redact_url(value)
        else:
            shown = str(value)
        rows.append((env_var(name), shown, name in settings.model_fields_set))
    return rows


def load(out: TextIO) -> Settings | None:
    """Settings from the environment, or None after printing what is wrong with them."""
    try:
        return Settings()
    except ValidationError as exc:
        print(f"invalid settings ({exc.error_count()} problems):", file=out)
        for err in exc.errors(include_url=False):
            loc = err["loc"]
            name = env_var(str(loc[0])) if loc else "(settings)"
            field = Settings.model_fields.get(str(loc[0])) if loc else None
            shown = ""
            if field is not None and not is_secret(field) and "input" in err:
                shown = f" (got {err['input']!r})"
            print(f"  {name}: {err['msg']}{shown}", file=out)
        return None
    except Exception as exc:  # pydantic-settings: a list or map that is not JSON
        print(f"invalid settings: {exc}", file=out)
        return None


async def _timed(name: str, probe: Callable[[], Any]) -> Check:
    started = time.perf_counter()
    try:
        async with asyncio.timeout(TIMEOUT_S):
            detail = await probe()
    except TimeoutError:
        return Check(name, False, f"no answer within {TIMEOUT_S:g} s")
    except Exception as exc:
        return Check(name, False, f"{type(exc).__name__}: {exc}")
    ms = (time.perf_counter() - started) * 1000
    ok = not detail.startswith("!")
    return Check(name, ok, f"{detail.lstrip('!')} ({ms:.0f} ms)")


async def _postgres(url: str) -> str:
    import asyncpg
    from alembic.script import ScriptDirectory

    from core.db import asyncpg_dsn
    from core.migrations import alembic_config

    conn = await asyncpg.connect(asyncpg_dsn(url), timeout=TIMEOUT_S)
    try:
        version = await conn.fetchval("SHOW server_version")
        has_table = await conn.fetchval("SELECT to_regclass('alembic_version') IS NOT NULL")
        current = (
            await conn.fetchval("SELECT version_num FROM alembic_version") if has_table else None
        )
    finally:
        await conn.close()
    head = ScriptDirectory.from_config(alembic_config(url)).get_current_head()
    if current is None:
        return f"!PostgreSQL {version} reachable, but not migrated: run `gengui migrate`"
    if current != head:
        return (
            f"!PostgreSQL {version}: schema at {current}, code expects {head}: run `gengui migrate`"
        )
    return f"PostgreSQL {version}, schema at head ({head})"


async def _redis(url: str) -> str:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(
        url, socket_connect_timeout=TIMEOUT_S, socket_timeout=TIMEOUT_S
    )
    try:
        await client.ping()
        info = await client.info("server")
    finally:
        await client.aclose()
    name = "Valkey" if "valkey_version" in info else "Redis"
    version = info.get("valkey_version") or info.get("redis_version", "?")
    return f"{name} {version}"


def static_checks(settings: Settings) -> list[Check]:
    checks = []
    if settings.storage_backend == "s3" and not settings.s3_bucket:
        checks.append(Check("storage", False, "GENGUI_S3_BUCKET is required with s3 storage"))
    else:
        checks.append(Check("storage", True, settings.storage_backend))
    if settings.flags_file is not None and not settings.flags_file.is_file():
        checks.append(Check("flags", False, f"GENGUI_FLAGS_FILE {settings.flags_file} not found"))
    if bool(settings.growthbook_api_host) != bool(settings.growthbook_client_key):
        checks.append(
            Check(
                "flags",
                False,
                "set both GENGUI_GROWTHBOOK_API_HOST and GENGUI_GROWTHBOOK_CLIENT_KEY, or neither",
            )
        )
    return checks


async def run_checks(settings: Settings) -> list[Check]:
    from core.runtime import ConfigurationError, resolve_settings

    checks = [Check("settings", True, "valid")]
    try:
        settings = resolve_settings(settings)
    except ConfigurationError as exc:
        return [*checks, Check("servers", False, str(exc)), *static_checks(settings)]
    assert settings.database_url and settings.redis_url
    database_url, redis_url = settings.database_url, settings.redis_url
    pg, rd = await asyncio.gather(
        _timed("postgres", lambda: _postgres(database_url)),
        _timed("redis", lambda: _redis(redis_url)),
    )
    return [*checks, pg, rd, *static_checks(settings)]


def main(out: TextIO) -> int:
    settings = load(out)
    if settings is None:
        return 2
    print("effective configuration (* = set in the environment; secrets hidden):", file=out)
    rows = effective(settings)
    width = max(len(name) for name, _, _ in rows)
    for name, shown, explicit in rows:
        print(f"  {'*' if explicit else ' '} {name:<{width}} = {shown}", file=out)
    checks = asyncio.run(run_checks(settings))
    print("checks:", file=out)
    for c in checks:
        print(f"  {'ok  ' if c.ok else 'FAIL'} {c.name}: {c.detail}", file=out)
    return 0 if all(c.ok for c in checks) else 1
