"""Signed webhook URLs: a provider can only report on the attempt we gave it.

Every webhook URL we hand a provider names the generation and attempt and carries
``sig = HMAC-SHA256(secret, "provider:generation_id:attempt")``. The route recomputes
it, so a forged or replayed-onto-another-generation call is a 401 that changes nothing,
and a report for an old attempt is recognised as stale without trusting the body.

The secret is ``GENGUI_WEBHOOK_SECRET``. Without one (development), a random key is
made once under ``data_dir`` and shared by every process started there.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path
from urllib.parse import urlencode
from uuid import UUID

from core.settings import Settings

_KEY_FILE = "webhook.key"


def webhook_secret(settings: Settings) -> bytes:
    if settings.webhook_secret is not None:
        return settings.webhook_secret.get_secret_value().encode()
    return _dev_secret(settings.data_dir / _KEY_FILE)


def _dev_secret(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_bytes(secrets.token_hex(32).encode())
    tmp.chmod(0o600)
    try:
        # link() fails if another process won the race: everyone then reads its key.
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return path.read_bytes()


def signature(secret: bytes, provider: str, generation_id: UUID, attempt: int) -> str:
    message = f"{provider}:{generation_id}:{attempt}".encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def webhook_url(
    settings: Settings, secret: bytes, provider: str, generation_id: UUID, attempt: int
) -> str:
    query = urlencode(
        {"attempt": attempt, "sig": signature(secret, provider, generation_id, attempt)}
    )
    return f"{settings.base_url}/api/v1/webhooks/{provider}/{generation_id}?{query}"


def verify(secret: bytes, provider: str, generation_id: UUID, attempt: int, sig: str) -> bool:
    return hmac.compare_digest(signature(secret, provider, generation_id, attempt), sig)
