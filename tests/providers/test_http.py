"""The shared HTTP error mapping and output checks, as tables (no I/O)."""

from __future__ import annotations

import base64

import pytest

from core.errors import ProviderRejected, ProviderRetryable
from providers.base import classify
from providers.http import decode_image_b64, error_for_status, error_message, nearest_aspect
from providers.mock.config import Directives, MockConfig
from providers.mock.state import png


@pytest.mark.parametrize(
    ("status", "retryable", "code"),
    [
        (400, False, "provider_invalid_request"),
        (401, False, "provider_unauthorized"),
        (403, False, "provider_forbidden"),
        (404, False, "provider_not_found"),
        (408, True, "provider_timeout"),
        (409, False, "provider_rejected"),
        (413, False, "provider_invalid_request"),
        (422, False, "provider_invalid_request"),
        (429, True, "rate_limited"),
        (500, True, "provider_unavailable"),
        (502, True, "provider_unavailable"),
        (503, True, "provider_unavailable"),
        (504, True, "provider_unavailable"),
    ],
)
def test_status_mapping(status: int, retryable: bool, code: str) -> None:
    failure = classify(error_for_status(status, "x"))
    assert (failure.retryable, failure.code) == (retryable, code)


def test_content_rejected_is_permanent_whatever_the_status() -> None:
    exc = error_for_status(503, "refused", code="content_rejected")
    assert isinstance(exc, ProviderRejected)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"error": {"message": "bad size", "type": "invalid_request_error"}}, "bad size"),
        ({"error": {"code": 400, "message": "Invalid JSON", "status": "X"}}, "Invalid JSON"),
        ({"error": "request does not exist"}, "request does not exist"),
        (
            {"title": "Input validation failed", "detail": "prompt is required"},
            "prompt is required",
        ),
        ("<html>Bad Gateway</html>", "<html>Bad Gateway</html>"),
        (None, "fallback"),
        ({"error": {}}, "fallback"),
    ],
)
def test_error_message_shapes(payload: object, message: str) -> None:
    assert error_message(payload, "fallback") == message


def test_decode_image_b64() -> None:
    image = png(8, 8, 1, 64)
    encoded = base64.b64encode(image).decode()
    assert decode_image_b64(encoded, what="t") == (image, "image/png")
    assert decode_image_b64(f"data:image/png;base64,{encoded}", what="t") == (image, "image/png")
    for bad in ("", None, "!!!not base64!!!", base64.b64encode(b"GIF89a....").decode()):
        with pytest.raises(ProviderRetryable) as info:
            decode_image_b64(bad, what="t")
        assert info.value.code == "provider_bad_output"


@pytest.mark.parametrize(
    ("width", "height", "aspect"),
    [
        (512, 512, "1:1"),
        (1920, 1080, "16:9"),
        (1080, 1920, "9:16"),
        (800, 600, "4:3"),
        (600, 800, "3:4"),
    ],
)
def test_nearest_aspect(width: int, height: int, aspect: str) -> None:
    assert nearest_aspect(width, height, ("1:1", "3:4", "4:3", "9:16", "16:9")) == aspect


def test_directives() -> None:
    d = Directives.parse("a cat [mock:fail] [mock:latewebhook=2.5] [mock:latency=0] [mock:nope]")
    assert (d.fail, d.latewebhook, d.latency, d.unknown) == (True, 2.5, 0.0, ["nope"])
    assert d.active() == ["fail", "latewebhook=2.5", "latency=0"]
    assert Directives.parse("plain prompt").active() == []


def test_mock_config_validates() -> None:
    config = MockConfig()
    config.update({"latency_s": "0.25", "failure_rate": 0.5})
    assert (config.latency_s, config.failure_rate) == (0.25, 0.5)
    for bad, why in (
        ({"failure_rate": 2}, "within"),
        ({"latency_s": -1}, "negative"),
        ({"api_key": "x"}, "not a tunable"),
        ({"nope": 1}, "not a tunable"),
    ):
        with pytest.raises(ValueError, match=why):
            config.update(bad)
    assert config.failure_rate == 0.5  # a refused update changes nothing
    with pytest.raises(ValueError, match="whsec_"):
        MockConfig(replicate_webhook_secret="not-a-whsec")
    assert "api_key" not in config.public()
    assert "replicate_webhook_secret" not in config.public()
