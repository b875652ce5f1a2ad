"""Signed webhook URLs."""

from __future__ import annotations

import uuid
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from pydantic import SecretStr

from core.settings import Settings
from core.webhooks import signature, verify, webhook_secret, webhook_url


def test_url_names_the_attempt_and_verifies_only_for_it(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, public_url="https://api.example.com")
    secret = webhook_secret(settings)
    gid = uuid.uuid4()
    url = urlsplit(webhook_url(settings, secret, "runpod", gid, 2))
    assert url.path == f"/api/v1/webhooks/runpod/{gid}"
    query = {k: v[0] for k, v in parse_qs(url.query).items()}
    assert query["attempt"] == "2"
    assert verify(secret, "runpod", gid, 2, query["sig"])
    assert not verify(secret, "runpod", gid, 1, query["sig"])  # another attempt
    assert not verify(secret, "replicate", gid, 2, query["sig"])  # another provider
    assert not verify(secret, "runpod", uuid.uuid4(), 2, query["sig"])  # another generation
    assert not verify(b"other", "runpod", gid, 2, query["sig"])


def test_dev_secret_is_made_once_and_shared(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    first = webhook_secret(settings)
    assert len(first) == 64 and webhook_secret(settings) == first
    assert (tmp_path / "webhook.key").stat().st_mode & 0o077 == 0  # owner only


def test_configured_secret_wins(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, webhook_secret=SecretStr("s3cret"))
    assert webhook_secret(settings) == b"s3cret"
    assert not (tmp_path / "webhook.key").exists()
    gid = uuid.uuid4()
    assert signature(b"s3cret", "runpod", gid, 1) != signature(b"s3cret", "runpod", gid, 2)
