"""The configuration reference is generated from Settings and committed up to date;
every setting has an env var, a type, a default and a meaning; secrets never show."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Literal

import pytest
from pydantic import Field, SecretStr

from core import config_check
from core.config_ref import (
    MISSING_DESCRIPTIONS,
    REFERENCE,
    constraints_text,
    default_text,
    env_var,
    render,
    sections,
    type_text,
)
from core.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.upper().startswith("GENGUI_"):
            monkeypatch.delenv(name)
    return monkeypatch


def test_the_committed_reference_is_up_to_date() -> None:
    assert REFERENCE.read_text() == render(), (
        "docs/configuration.md is stale: run `gengui config docs --output docs/configuration.md`"
    )


def test_every_setting_is_in_the_reference_once_with_a_description() -> None:
    text = render()
    for name, info in Settings.model_fields.items():
        rows = [line for line in text.splitlines() if line.startswith(f"| `{env_var(name)}` |")]
        assert len(rows) == 1, name
        assert info.description or MISSING_DESCRIPTIONS.get(name), (
            f"{name}: give it Field(description=...) in core/settings.py"
        )
    listed = [name for s in sections() for name in s.fields]
    assert sorted(listed) == sorted(Settings.model_fields)


def test_fallback_descriptions_only_shrink() -> None:
    # Each entry belongs in core/settings.py; once it is there, delete it here.
    stale = {
        name
        for name in MISSING_DESCRIPTIONS
        if name not in Settings.model_fields or Settings.model_fields[name].description
    }
    assert not stale


def test_sections_follow_the_comment_headers_of_settings() -> None:
    by_title = {s.title: s for s in sections()}
    assert by_title["Servers"].fields[:2] == ["database_url", "redis_url"]
    assert by_title["Servers"].intro.startswith("Unset means")
    assert "growthbook_client_key" in by_title["Feature flags (GrowthBook)"].fields
    assert "s3_bucket" in by_title["Storage"].fields


def test_env_var_names_are_what_settings_reads(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv(env_var("api_port"), "8123")
    clean_env.setenv(env_var("provider_rate_limits"), '{"openai": 5}')
    s = Settings()
    assert s.api_port == 8123
    assert s.provider_rate_limits == {"openai": 5.0}


@pytest.mark.parametrize(
    ("annotation", "text"),
    [
        (str | None, "string"),
        (Literal["json", "console"], "one of `json`, `console`"),
        (tuple[str, ...], "JSON list of strings"),
        (dict[str, float], "JSON object (string → number)"),
        (SecretStr | None, "secret"),
        (Path | None, "path"),
        (bool, "boolean"),
    ],
)
def test_types_read_as_people_write_them(annotation: object, text: str) -> None:
    assert type_text(annotation) == text


def test_defaults_and_constraints() -> None:
    fields = Settings.model_fields
    assert default_text(fields["runpod_api_key"]) == "unset"
    assert default_text(fields["growthbook_streaming"]) == "`true`"
    assert (
        default_text(fields["download_hosts"]) == '`["replicate.delivery", "*.replicate.delivery"]`'
    )
    assert constraints_text(fields["consumer_batch"]) == "≥ 1, ≤ 10000"
    assert default_text(Field(SecretStr("x"))) == "(set; hidden)"  # type: ignore[arg-type]


def test_effective_configuration_hides_secrets_and_url_passwords(
    clean_env: pytest.MonkeyPatch,
) -> None:
    settings = Settings(
        database_url="postgresql://gengui:pg-pass@db:5432/gengui",
        redis_url="redis://:redis-pass@cache:6379/0",
        runpod_api_key=SecretStr("rp-secret"),
        openai_api_key=SecretStr("sk-secret"),
    )
    shown = "\n".join(f"{n}={v}" for n, v, _ in config_check.effective(settings))
    for secret in ("pg-pass", "redis-pass", "rp-secret", "sk-secret"):
        assert secret not in shown
    assert "GENGUI_DATABASE_URL=postgresql://gengui:***@db:5432/gengui" in shown
    assert "GENGUI_RUNPOD_API_KEY=(set; hidden)" in shown
    assert "GENGUI_GEMINI_API_KEY=(unset)" in shown


def test_invalid_settings_are_reported_by_variable_and_exit_2(
    clean_env: pytest.MonkeyPatch,
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GENGUI_")}
    env.update(
        GENGUI_API_PORT="eighty",
        GENGUI_LOG_LEVEL="loud",
        GENGUI_OPENAI_API_KEY="",
        GENGUI_STREAM_PREFIX="has space",
    )
    done = subprocess.run(
        [sys.executable, "-m", "core.cli", "config", "check"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "GENGUI_API_PORT" in done.stdout and "'eighty'" in done.stdout
    assert "GENGUI_LOG_LEVEL" in done.stdout
    assert "GENGUI_STREAM_PREFIX" in done.stdout


def test_a_server_that_does_not_answer_fails_the_check(clean_env: pytest.MonkeyPatch) -> None:
    # Port 1 on loopback: nothing listens, the connection is refused at once.
    clean_env.setenv("GENGUI_DATABASE_URL", "postgresql://gengui:pw@127.0.0.1:1/gengui")
    clean_env.setenv("GENGUI_REDIS_URL", "redis://127.0.0.1:1/0")
    out = io.StringIO()
    assert config_check.main(out) == 1
    text = out.getvalue()
    assert "FAIL postgres" in text and "FAIL redis" in text
    assert "ok   settings: valid" in text
    assert ":pw@" not in text


def test_s3_without_a_bucket_is_a_problem() -> None:
    checks = config_check.static_checks(Settings(storage_backend="s3"))
    assert [c.name for c in checks if not c.ok] == ["storage"]
