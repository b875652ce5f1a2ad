"""``gengui config check`` against the suite's real Postgres and Redis."""

from __future__ import annotations

import io

import pytest

from core import config_check
from tests.conftest import Servers


def test_a_migrated_database_and_a_live_redis_pass(
    servers: Servers, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GENGUI_DATABASE_URL", servers.database_url)
    monkeypatch.setenv("GENGUI_REDIS_URL", servers.redis_url)
    monkeypatch.setenv("GENGUI_STORAGE_BACKEND", "local")
    out = io.StringIO()
    code = config_check.main(out)
    text = out.getvalue()
    assert code == 0, text
    assert "ok   postgres: PostgreSQL" in text and "schema at head" in text
    assert "ok   redis:" in text


def test_an_unmigrated_database_fails(servers: Servers, monkeypatch: pytest.MonkeyPatch) -> None:
    # The server's maintenance database answers but has no gengui schema.
    from urllib.parse import urlsplit, urlunsplit

    admin = urlunsplit(urlsplit(servers.database_url)._replace(path="/postgres"))
    monkeypatch.setenv("GENGUI_DATABASE_URL", admin)
    monkeypatch.setenv("GENGUI_REDIS_URL", servers.redis_url)
    out = io.StringIO()
    assert config_check.main(out) == 1
    assert "not migrated: run `gengui migrate`" in out.getvalue()
