"""``core.flags`` without a network: SSE parsing, sources, rules and fallbacks."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from structlog.testing import capture_logs

from core.auth import Principal
from core.flags import Choice, ProviderSelector, sse_events
from core.settings import Settings
from tests.fakes.growthbook import provider_flag

FREE = Principal(uuid.uuid4(), "free@example.com", "free")
PRO = Principal(uuid.uuid4(), "pro@example.com", "pro")


async def _chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def _events(*parts: bytes) -> list[tuple[str, str]]:
    return [e async for e in sse_events(_chunks(*parts))]


# ---- server-sent events ---------------------------------------------------------------


async def test_sse_events_across_chunk_boundaries_crlf_and_comments() -> None:
    stream = (
        b": connected\n\n"
        b'event: features\r\ndata: {"a":\r\ndata: 1}\r\n\r\n'
        b"event: features-updated\n\n"
        b"data: no event name\n\n"
    )
    # Split everywhere, including inside "\r\n" and field names.
    parts = [stream[i : i + 3] for i in range(0, len(stream), 3)]
    assert await _events(*parts) == [
        ("features", '{"a":\n1}'),
        ("features-updated", ""),
        ("message", "no event name"),
    ]


async def test_sse_a_payload_longer_than_a_readline_limit_is_one_event() -> None:
    data = orjson.dumps({"features": {f"f{i}": {"defaultValue": "x" * 50} for i in range(3000)}})
    assert len(data) > 128 * 1024
    events = await _events(b"event: features\ndata: " + data + b"\n\n")
    assert events == [("features", data.decode())]


async def test_sse_an_endless_line_is_refused() -> None:
    with pytest.raises(ValueError, match="too large"):
        await _events(b"data: ", *[b"x" * (1024 * 1024)] * 9)


# ---- sources and rules ----------------------------------------------------------------


def _settings(tmp_path: Path, payload: Any | None, **overrides: Any) -> Settings:
    flags_file = None
    if payload is not None:
        flags_file = tmp_path / "features.json"
        raw = payload if isinstance(payload, bytes) else orjson.dumps(payload)
        flags_file.write_bytes(raw)
    return Settings(flags_file=flags_file, default_provider="gemini", **overrides)


async def test_the_flags_file_is_evaluated_per_user(tmp_path: Path) -> None:
    rule = {"id": "fr_pro", "condition": {"plan": "pro"}, "force": "openai"}
    settings = _settings(tmp_path, {"features": provider_flag("local", rule)})
    async with ProviderSelector(settings) as selector:
        assert selector.source == "flags_file"
        assert await selector.choose(FREE) == Choice("local", "flags_file:default")
        assert await selector.choose(PRO) == Choice("openai", "flags_file:fr_pro")


async def test_a_rule_without_an_id_is_named_by_its_kind(tmp_path: Path) -> None:
    rule = {"condition": {"plan": "pro"}, "force": "runpod"}
    settings = _settings(tmp_path, {"features": provider_flag("local", rule)})
    async with ProviderSelector(settings) as selector:
        assert await selector.choose(PRO) == Choice("runpod", "flags_file:force")


@pytest.mark.parametrize(
    "payload",
    [
        None,  # no file configured
        b"{not json",
        {"features": "not an object"},
        {"encryptedFeatures": "abc"},
        {"features": {"image_provider": {"defaultValue": "x", "rules": "not a list"}}},
    ],
    ids=["no-file", "bad-json", "bad-shape", "encrypted", "sdk-rejects"],
)
async def test_without_usable_features_the_default_is_chosen(tmp_path: Path, payload: Any) -> None:
    async with ProviderSelector(_settings(tmp_path, payload)) as selector:
        assert selector.source == "default"
        assert await selector.choose(FREE) == Choice("gemini", "default")


async def test_a_missing_flag_or_a_null_value_is_the_default(tmp_path: Path) -> None:
    settings = _settings(tmp_path, {"features": {"other_flag": {"defaultValue": True}}})
    async with ProviderSelector(settings) as selector:
        assert await selector.choose(FREE) == Choice("gemini", "default")
    settings = _settings(tmp_path, {"features": provider_flag(None)})
    async with ProviderSelector(settings) as selector:
        assert await selector.choose(FREE) == Choice("gemini", "default")


async def test_an_unknown_provider_falls_back_and_warns_once(tmp_path: Path) -> None:
    settings = _settings(tmp_path, {"features": provider_flag("dall-e-9")})
    async with ProviderSelector(settings) as selector:
        with capture_logs() as logs:
            choices = [await selector.choose(u) for u in (FREE, PRO, FREE)]
    assert choices == [Choice("gemini", "default:invalid_value")] * 3
    warnings = [e for e in logs if e["event"] == "flags.invalid_provider"]
    assert len(warnings) == 1 and warnings[0]["value"] == "'dall-e-9'"


async def test_growthbook_features_win_and_an_older_payload_does_not_undo_a_newer(
    tmp_path: Path,
) -> None:
    settings = _settings(tmp_path, {"features": provider_flag("local")})
    selector = ProviderSelector(settings)  # no GrowthBook configured: payloads fed by hand
    try:
        await selector.start()
        newer = {"features": provider_flag("openai"), "dateUpdated": "2030-01-02T00:00:00.000Z"}
        older = {"features": provider_flag("runpod"), "dateUpdated": "2030-01-01T00:00:00.000Z"}
        await selector._apply(newer, "stream")
        assert await selector.choose(FREE) == Choice("openai", "growthbook:default")
        # A poll that was answered before the push arrived lands after it.
        await selector._apply(older, "poll")
        assert await selector.choose(FREE) == Choice("openai", "growthbook:default")
        with pytest.raises(ValueError, match="SDK"):
            await selector._apply({"features": {"image_provider": {"rules": "garbage"}}}, "poll")
        assert await selector.choose(FREE) == Choice("openai", "growthbook:default")
    finally:
        await selector.close()
