"""What each adapter puts on the wire, as the mock received it, and the per-provider
shapes the contract suite does not cover."""

from __future__ import annotations

import base64
from dataclasses import replace

import aiohttp
import pytest
from aiohttp import web

from core.errors import ProviderError, ProviderRejected
from providers.base import classify
from providers.gemini import GeminiProvider, image_from_content, image_from_predict
from providers.mock.state import png
from providers.openai import OpenAIProvider, model_sizes, nearest_size
from providers.replicate import ReplicateProvider, outcome_from_prediction
from providers.runpod import RunPodProvider, outcome_from_status
from tests.providers.conftest import Hooks, Mock, make_job, poll_until, serve, terminal


async def test_runpod_run_body(http: aiohttp.ClientSession, mock: Mock, hooks: Hooks) -> None:
    provider = RunPodProvider(http, f"{mock.url}/v2/", "ep-9", "k", 120, 3600, 5)
    job = make_job(negative_prompt="blurry")
    submission = await provider.submit(job, webhook_url=hooks.for_("rp"))
    (sent,) = mock.requests(path="/v2/ep-9/run")
    assert sent["body"] == {
        "input": {
            "prompt": job.prompt,
            "negative_prompt": "blurry",
            "width": 512,
            "height": 384,
            "seed": 7,
            "generation_id": str(job.generation_id),
            "attempt": 1,
        },
        "policy": {"executionTimeout": 120_000, "ttl": 3_600_000},
        "webhook": hooks.for_("rp"),
    }
    assert sent["job_id"] == submission.provider_job_id


async def test_runpod_retry_and_health(http: aiohttp.ClientSession, mock: Mock) -> None:
    provider = RunPodProvider(http, f"{mock.url}/v2", "ep", "k", 60, 600, 5)
    job = make_job("a fox [mock:timeout]")
    job = replace(job, provider_job_id=(await provider.submit(job)).provider_job_id)
    timed_out = await poll_until(provider, job, terminal)
    assert timed_out.failure is not None and timed_out.failure.code == "provider_timeout"

    again = await provider.retry(job)

    assert again.provider_job_id == job.provider_job_id  # RunPod keeps the id
    assert (await poll_until(provider, job, terminal)).state == "completed"
    health = await provider.health()
    assert health["jobs"]["completed"] == 1
    assert health["jobs"]["retried"] == 1


def test_runpod_outcomes() -> None:
    assert outcome_from_status({"id": "a", "status": "IN_QUEUE"}).state == "queued"
    assert outcome_from_status({"id": "a", "status": "IN_PROGRESS"}).state == "processing"
    assert outcome_from_status({"id": "a", "status": "CANCELLED"}).state == "cancelled"
    failed = outcome_from_status({"id": "a", "status": "FAILED", "error": "CUDA out of memory"})
    assert failed.failure is not None
    assert (failed.failure.retryable, failed.failure.message) == (True, "CUDA out of memory")
    refused = outcome_from_status({"id": "a", "status": "FAILED", "error": "invalid_input: w"})
    assert refused.failure is not None
    assert (refused.failure.retryable, refused.failure.code) == (False, "provider_invalid_request")
    as_output = outcome_from_status({"id": "a", "status": "COMPLETED", "output": {"error": "no"}})
    assert as_output.failure is not None
    assert (as_output.failure.retryable, as_output.failure.code) == (False, "provider_failed")
    no_output = outcome_from_status({"id": "a", "status": "COMPLETED", "output": None})
    assert no_output.failure is not None and no_output.failure.code == "provider_bad_output"


async def test_replicate_by_version(http: aiohttp.ClientSession, mock: Mock, hooks: Hooks) -> None:
    provider = ReplicateProvider(http, mock.url, "t", "acme/painter:5c7d5dc6", None, 5)
    await provider.submit(make_job(width=1536, height=1024), webhook_url=hooks.for_("v"))
    (sent,) = mock.requests(path="/v1/predictions")
    assert sent["body"]["version"] == "5c7d5dc6"
    assert sent["body"]["webhook"] == hooks.for_("v")
    assert sent["body"]["webhook_events_filter"] == ["completed"]
    assert sent["body"]["input"]["aspect_ratio"] == "3:2"
    assert sent["body"]["input"]["seed"] == 7


async def test_replicate_by_model_without_webhook(http: aiohttp.ClientSession, mock: Mock) -> None:
    provider = ReplicateProvider(http, mock.url, "t", "acme/painter", None, 5)
    await provider.submit(make_job())
    (sent,) = mock.requests(path="/v1/models/acme/painter/predictions")
    assert "webhook" not in sent["body"] and "version" not in sent["body"]


def test_replicate_model_must_name_owner() -> None:
    with pytest.raises(ValueError, match="owner/name"):
        ReplicateProvider(None, "http://x", "t", "just-a-name", None, 5)  # type: ignore[arg-type]


async def test_gemini_sends_the_key_in_a_header(http: aiohttp.ClientSession, mock: Mock) -> None:
    for model, method in (
        ("imagen-4.0-generate-001", "predict"),
        ("gemini-2.5-flash-image", "generateContent"),
    ):
        provider = GeminiProvider(http, mock.url, "g-key", model, 5)
        await provider.generate(make_job(width=1024, height=576))
        (sent,) = mock.requests(path=f"/v1beta/models/{model}:{method}")
        assert sent["auth"] is True
        body = sent["body"]
        if method == "predict":
            assert body["instances"] == [{"prompt": "a red fox in snow"}]
            assert body["parameters"] == {"sampleCount": 1, "aspectRatio": "16:9"}
        else:
            assert body["contents"][0]["parts"] == [{"text": "a red fox in snow"}]
            assert body["generationConfig"]["imageConfig"] == {"aspectRatio": "16:9"}
    # The key never travels in the URL (where proxies and logs would keep it).
    assert all("key=" not in e["path"] for e in mock.requests())


@pytest.mark.parametrize(
    ("model", "width", "height", "size"),
    [
        ("gpt-image-1", 512, 512, "1024x1024"),
        ("gpt-image-1", 1920, 1080, "1536x1024"),
        ("gpt-image-1", 768, 1344, "1024x1536"),
        ("dall-e-3", 1920, 1080, "1792x1024"),
        ("dall-e-2", 300, 300, "256x256"),
        ("dall-e-2", 900, 800, "1024x1024"),
    ],
)
def test_openai_nearest_size(model: str, width: int, height: int, size: str) -> None:
    assert nearest_size(width, height, model_sizes(model)) == size


async def test_openai_request_body(http: aiohttp.ClientSession, mock: Mock) -> None:
    await OpenAIProvider(http, mock.url, "k", "gpt-image-1", 5).generate(make_job())
    await OpenAIProvider(http, mock.url, "k", "dall-e-3", 5).generate(make_job())
    gpt, dalle = (e["body"] for e in mock.requests(path="/v1/images/generations"))
    assert gpt == {
        "model": "gpt-image-1",
        "prompt": "a red fox in snow",
        "n": 1,
        "size": "1536x1024",
    }
    assert dalle["response_format"] == "b64_json" and dalle["size"] == "1792x1024"


async def test_openai_quota_is_permanent(http: aiohttp.ClientSession) -> None:
    """An exhausted quota is a 429 that no retry within the deadline will fix."""

    async def quota(request: web.Request) -> web.Response:
        error = {"message": "You exceeded your current quota", "type": "insufficient_quota",
                 "param": None, "code": "insufficient_quota"}  # fmt: skip
        return web.json_response({"error": error}, status=429)

    app = web.Application()
    app.router.add_post("/v1/images/generations", quota)
    runner, url = await serve(app)
    try:
        with pytest.raises(ProviderRejected) as info:
            await OpenAIProvider(http, url, "k", "gpt-image-1", 5).generate(make_job())
    finally:
        await runner.cleanup()
    assert info.value.code == "provider_quota_exhausted"


def _b64_png() -> str:
    return base64.b64encode(png(4, 4, 1, 64)).decode()


@pytest.mark.parametrize(
    ("answer", "code"),
    [
        ({"promptFeedback": {"blockReason": "PROHIBITED_CONTENT"}}, "content_rejected"),
        (
            {"candidates": [{"finishReason": "IMAGE_SAFETY", "content": {"parts": []}}]},
            "content_rejected",
        ),
        (
            {
                "candidates": [
                    {"content": {"parts": [{"text": "I can't draw that."}]}, "finishReason": "STOP"}
                ]
            },
            "content_rejected",
        ),
        ({"candidates": []}, "content_rejected"),
        ({"candidates": [{"finishReason": "MAX_TOKENS"}]}, "provider_bad_output"),
        ([], "provider_bad_output"),
    ],
)
def test_gemini_content_without_an_image(answer: object, code: str) -> None:
    with pytest.raises(ProviderError) as info:
        image_from_content(answer)
    assert (classify(info.value).code, classify(info.value).retryable) == (
        code,
        code == "provider_bad_output",
    )


def test_gemini_content_image_part() -> None:
    answer = {
        "candidates": [
            {
                "content": {
                    "parts": [
                        {"text": "here"},
                        {"inline_data": {"mime_type": "image/png", "data": _b64_png()}},
                    ]
                }
            }
        ]
    }
    assert image_from_content(answer)[1] == "image/png"


def test_imagen_filtered() -> None:
    answers: list[object] = [{}, {"predictions": []}, {"predictions": [{"raiFilteredReason": "x"}]}]
    for answer in answers:
        with pytest.raises(ProviderRejected) as info:
            image_from_predict(answer)
        assert info.value.code == "content_rejected"
    assert (
        image_from_predict({"predictions": [{"bytesBase64Encoded": _b64_png()}]})[1] == "image/png"
    )


@pytest.mark.parametrize(
    ("prediction", "state", "failure"),
    [
        ({"status": "starting"}, "queued", None),
        ({"status": "processing"}, "processing", None),
        ({"status": "canceled"}, "cancelled", None),
        ({"status": "aborted"}, "failed", (True, "provider_timeout")),
        (
            {"status": "failed", "error": "CUDA error: out of memory"},
            "failed",
            (True, "provider_failed"),
        ),
        (
            {"status": "failed", "error": "NSFW content detected."},
            "failed",
            (False, "content_rejected"),
        ),
        ({"status": "succeeded", "output": "https://replicate.delivery/a.png"}, "completed", None),
        (
            {"status": "succeeded", "output": ["https://replicate.delivery/a.webp"]},
            "completed",
            None,
        ),
        ({"status": "succeeded", "output": None}, "failed", (True, "provider_bad_output")),
        (
            {"status": "succeeded", "output": ["file:///etc/passwd"]},
            "failed",
            (True, "provider_bad_output"),
        ),
    ],
)
def test_replicate_outcomes(
    prediction: dict[str, object], state: str, failure: tuple[bool, str] | None
) -> None:
    outcome = outcome_from_prediction({"id": "p1", **prediction})
    assert outcome.state == state
    assert outcome.provider_job_id == "p1"
    got = (outcome.failure.retryable, outcome.failure.code) if outcome.failure else None
    assert got == failure
    if state == "completed":
        assert outcome.image_url and outcome.image_url.startswith("https://replicate.delivery/")
