"""Request and message schemas, and the error classification."""

from __future__ import annotations

import uuid

import pytest
from pydantic import ValidationError

from core.errors import ProviderRejected, ProviderRetryable
from core.events import GenerationRequested, JobStatus, json_bytes
from core.generations import CreateGeneration, decode_cursor, encode_cursor
from providers.base import classify


def test_defaults_and_bounds() -> None:
    body = CreateGeneration.model_validate({"prompt": "x"})
    assert (body.width, body.height, body.seed, body.negative_prompt) == (1024, 1024, None, None)
    ok = CreateGeneration.model_validate(
        {"prompt": "x" * 4000, "width": 256, "height": 2048, "seed": 2**32 - 1}
    )
    assert ok.seed == 2**32 - 1


def test_request_hash_depends_on_every_field() -> None:
    base = CreateGeneration.model_validate({"prompt": "x", "seed": 1})
    assert (
        base.request_hash()
        == CreateGeneration.model_validate({"seed": 1, "prompt": "x"}).request_hash()
    )
    for change in ({"prompt": "y"}, {"seed": 2}, {"width": 512}, {"negative_prompt": "z"}):
        other = CreateGeneration.model_validate({"prompt": "x", "seed": 1, **change})
        assert other.request_hash() != base.request_hash()


def test_cursor_round_trip() -> None:
    from datetime import UTC, datetime

    at, gid = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC), uuid.uuid4()
    assert decode_cursor(encode_cursor(at, gid)) == (at, gid)


def test_messages_reject_unknown_versions() -> None:
    gid = uuid.uuid4()
    assert (
        GenerationRequested.model_validate_json(f'{{"generation_id": "{gid}", "attempt": 2}}').v
        == 1
    )
    with pytest.raises(ValidationError):
        GenerationRequested.model_validate_json(
            f'{{"v": 2, "generation_id": "{gid}", "attempt": 2}}'
        )
    with pytest.raises(ValidationError):
        JobStatus.model_validate({"generation_id": gid, "attempt": 1, "state": "exploded"})


def test_messages_are_written_as_model_dump_json_would() -> None:
    """``json_bytes`` skips a str round trip, not a byte of the wire format."""
    gid = uuid.uuid4()
    messages = [
        GenerationRequested(generation_id=gid, attempt=2, provider="local"),
        GenerationRequested(generation_id=gid, attempt=1),  # no provider: null
        JobStatus(
            generation_id=gid,
            attempt=1,
            state="failed",
            error_message='le phare « ☃ » \n "quoted"',
            source="w1",
        ),
    ]
    for message in messages:
        out = json_bytes(message)
        assert out == message.model_dump_json().encode()
        assert type(message).model_validate_json(out) == message


@pytest.mark.parametrize(
    ("exc", "retryable", "code"),
    [
        (ProviderRejected("nsfw", code="content_policy"), False, "content_policy"),
        (ProviderRetryable("503"), True, "provider_unavailable"),
        (TimeoutError(), True, "provider_timeout"),
        (ConnectionRefusedError("refused"), True, "provider_unreachable"),
        (ValueError("odd"), True, "provider_error"),
    ],
)
def test_classify(exc: BaseException, retryable: bool, code: str) -> None:
    failure = classify(exc)
    assert (failure.retryable, failure.code) == (retryable, code)
