"""One contract, every adapter: each against the mock over real HTTP.

Success, permanent and retryable failures (classified through ``providers.base.
classify``), client timeouts, cancel, and the webhook cases (duplicate, late, lost,
redelivered after an error).
"""

from __future__ import annotations

import asyncio
import io
import socket
from collections.abc import Callable
from dataclasses import replace

import aiohttp
import pytest
from PIL import Image

from core.errors import ProviderRejected, ProviderRetryable
from core.imaging import ImageRejected, sniff_image
from providers.base import Failure, Job, PollingProvider, Provider, SyncProvider, classify
from providers.download import download
from tests.providers.conftest import (
    ADAPTERS,
    WAIT_S,
    Adapter,
    Hooks,
    Mock,
    make_job,
    poll_until,
    run_job,
    terminal,
)

TIMEOUT_S = 5.0


def build(adapter: Adapter, http: aiohttp.ClientSession, mock: Mock, **kw: float) -> Provider:
    return adapter.build(http, mock.url, kw.get("timeout_s", TIMEOUT_S), "mock-key")


async def start(provider: Provider, job: Job) -> object:
    """The one call that reaches the provider first: submit, or generate."""
    if isinstance(provider, SyncProvider):
        return await provider.generate(job)
    return await provider.submit(job, webhook_url=None)


async def until(check: Callable[[], bool]) -> None:
    async with asyncio.timeout(WAIT_S):
        while not check():
            await asyncio.sleep(0.01)


async def failure_of(provider: Provider, prompt: str, hooks: Hooks) -> Failure:
    """The classified failure of a job, however the adapter reports it."""
    try:
        run = await run_job(provider, make_job(prompt), hooks)
    except Exception as exc:
        return classify(exc)
    assert run.outcome.state == "failed", run.outcome
    assert run.outcome.failure is not None
    assert run.polled is None or run.polled.failure == run.outcome.failure
    return run.outcome.failure


async def image_of(
    http: aiohttp.ClientSession, outcome_image: bytes | None, url: str | None
) -> bytes:
    if outcome_image is not None:
        return outcome_image
    assert url is not None
    data, content_type = await download(
        http,
        url,
        allowed_hosts=("127.0.0.1",),
        allow_http=True,
        max_bytes=10 * 1024 * 1024,
        timeout_s=TIMEOUT_S,
    )
    assert content_type == "image/png"
    return data


async def test_success(
    adapter: Adapter, http: aiohttp.ClientSession, mock: Mock, hooks: Hooks
) -> None:
    provider = build(adapter, http, mock)
    run = await run_job(provider, make_job(), hooks)

    assert run.outcome.state == "completed"
    data = await image_of(http, run.outcome.image, run.outcome.image_url)
    assert sniff_image(data) == ("png", "image/png")
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        if adapter.id in ("runpod", "replicate"):
            assert im.size == (512, 384)  # the size asked for reaches the model
    if run.outcome.image is not None:
        assert run.outcome.content_type == "image/png"
    if isinstance(provider, PollingProvider):
        assert run.polled == run.outcome  # webhook and poll tell the same story
        assert run.outcome.provider_job_id == run.job.provider_job_id
    sent = mock.requests(provider=adapter.provider)
    assert sent and all(e["auth"] for e in sent)


# directive -> per adapter provider name: (retryable, code)
FAILURES = {
    "[mock:fail]": {
        "runpod": (False, "provider_invalid_request"),
        "replicate": (False, "content_rejected"),
        "gemini": (False, "content_rejected"),
        "openai": (False, "content_rejected"),
    },
    "[mock:invalid]": dict.fromkeys(
        ("runpod", "replicate", "gemini", "openai"), (False, "provider_invalid_request")
    ),
    "[mock:retryable]": {
        "runpod": (True, "provider_failed"),
        "replicate": (True, "provider_failed"),
        "gemini": (True, "provider_unavailable"),
        "openai": (True, "provider_unavailable"),
    },
    "[mock:ratelimit]": dict.fromkeys(
        ("runpod", "replicate", "gemini", "openai"), (True, "rate_limited")
    ),
    "[mock:badimage]": {
        "runpod": (True, "provider_bad_output"),
        "gemini": (True, "provider_bad_output"),
        "openai": (True, "provider_bad_output"),
    },
}


@pytest.mark.parametrize(
    ("directive", "adapter"),
    [
        pytest.param(directive, a, id=f"{directive[6:-1]}-{a.id}")
        for directive, table in FAILURES.items()
        for a in ADAPTERS
        if a.provider in table
    ],
)
async def test_failures_are_classified(
    directive: str, adapter: Adapter, http: aiohttp.ClientSession, mock: Mock, hooks: Hooks
) -> None:
    failure = await failure_of(build(adapter, http, mock), f"a fox {directive}", hooks)
    assert (failure.retryable, failure.code) == FAILURES[directive][adapter.provider], failure
    assert failure.message


async def test_replicate_bad_image(http: aiohttp.ClientSession, mock: Mock, hooks: Hooks) -> None:
    """Replicate's output is a URL: the bytes are checked when the result fetcher
    stores them (``consumers.results.store_image`` sniffs them)."""
    adapter = next(a for a in ADAPTERS if a.id == "replicate")
    run = await run_job(build(adapter, http, mock), make_job("x [mock:badimage]"), hooks)
    assert run.outcome.state == "completed"
    data = await image_of(http, None, run.outcome.image_url)
    with pytest.raises(ImageRejected):
        sniff_image(data)


async def test_client_timeout_is_retryable(
    adapter: Adapter, http: aiohttp.ClientSession, mock: Mock, hooks: Hooks
) -> None:
    """The request hangs (submit for async providers, the call for sync ones): our
    own timeout ends it as a retryable provider_timeout."""
    provider = build(adapter, http, mock, timeout_s=0.3)
    failure = await failure_of(provider, "a fox [mock:hang]", hooks)
    assert (failure.retryable, failure.code) == (True, "provider_timeout")


async def test_job_timeout_is_retryable(
    adapter: Adapter, http: aiohttp.ClientSession, mock: Mock, hooks: Hooks
) -> None:
    """RunPod TIMED_OUT, Replicate aborted; a sync call that never answers."""
    timeout_s = TIMEOUT_S if adapter.polling else 0.3
    failure = await failure_of(
        build(adapter, http, mock, timeout_s=timeout_s), "a fox [mock:timeout]", hooks
    )
    assert (failure.retryable, failure.code) == (True, "provider_timeout")


async def test_wrong_key_is_permanent(
    adapter: Adapter, http: aiohttp.ClientSession, mock: Mock, hooks: Hooks
) -> None:
    mock.config.api_key = "the-right-key"
    wrong = adapter.build(http, mock.url, TIMEOUT_S, "a-wrong-key")
    failure = await failure_of(wrong, "a fox", hooks)
    expected = "provider_forbidden" if adapter.provider == "gemini" else "provider_unauthorized"
    assert (failure.retryable, failure.code) == (False, expected)
    right = adapter.build(http, mock.url, TIMEOUT_S, "the-right-key")
    assert (await run_job(right, make_job(), hooks)).outcome.state == "completed"


async def test_unreachable_is_retryable(adapter: Adapter, http: aiohttp.ClientSession) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # Nothing listens there now: connection refused.
    provider = adapter.build(http, f"http://127.0.0.1:{port}", TIMEOUT_S, "k")
    with pytest.raises(ProviderRetryable) as info:
        await start(provider, make_job())
    assert info.value.code == "provider_unreachable"


async def test_cancel(
    adapter: Adapter, http: aiohttp.ClientSession, mock: Mock, hooks: Hooks
) -> None:
    provider = build(adapter, http, mock)
    if isinstance(provider, SyncProvider):
        # The call is the job: cancel has nothing to reach and sends nothing.
        await provider.cancel(replace(make_job(), provider_job_id="anything"))
        assert mock.requests() == []
        with pytest.raises(TypeError):
            await provider.submit(make_job())
        return
    assert isinstance(provider, PollingProvider)
    job = make_job("a fox [mock:stuck]")
    submission = await provider.submit(job, webhook_url=hooks.for_("stuck"))
    job = replace(job, provider_job_id=submission.provider_job_id)
    assert (await provider.poll(job)).state in ("queued", "processing")

    await provider.cancel(job)

    cancels = [e for e in mock.requests(provider=adapter.provider) if "cancel" in e["path"]]
    assert [(e["job_id"], e["status"]) for e in cancels] == [(job.provider_job_id, 200)]
    polled = await provider.poll(job)
    assert polled.state == "cancelled"
    assert mock.state.jobs[submission.provider_job_id or ""].cancel_requests == 1
    # Cancelling again, or an id the provider never heard of, is not an error.
    await provider.cancel(job)
    await provider.cancel(replace(job, provider_job_id="no-such-job"))
    if adapter.provider == "replicate":
        # Replicate's "completed" event covers cancels too.
        delivery = (await hooks.wait("stuck"))[0]
        assert provider.verify_webhook(delivery.headers, delivery.body)
        assert provider.parse_webhook(delivery.body).state == "cancelled"


async def test_stuck_job_stays_in_progress(
    polling_adapter: Adapter, http: aiohttp.ClientSession, mock: Mock, hooks: Hooks
) -> None:
    provider = build(polling_adapter, http, mock)
    assert isinstance(provider, PollingProvider)
    job = make_job("a fox [mock:stuck]")
    job = replace(
        job,
        provider_job_id=(await provider.submit(job, webhook_url=hooks.for_("s"))).provider_job_id,
    )
    outcome = await poll_until(provider, job, lambda o: o.state == "processing")
    assert outcome.state == "processing"
    assert mock.state.jobs[job.provider_job_id or ""].webhook == "none"
    assert hooks.count("s") == 0


async def test_unknown_job_is_lost(
    polling_adapter: Adapter, http: aiohttp.ClientSession, mock: Mock
) -> None:
    provider = build(polling_adapter, http, mock)
    assert isinstance(provider, PollingProvider)
    outcome = await provider.poll(replace(make_job(), provider_job_id="never-submitted"))
    assert outcome.state == "failed"
    assert outcome.failure is not None
    assert (outcome.failure.retryable, outcome.failure.code) == (True, "provider_job_lost")


async def test_duplicate_webhook(
    polling_adapter: Adapter, http: aiohttp.ClientSession, mock: Mock, hooks: Hooks
) -> None:
    provider = build(polling_adapter, http, mock)
    assert isinstance(provider, PollingProvider)
    job = make_job("a fox [mock:dupwebhook]")
    await provider.submit(job, webhook_url=hooks.for_("dup"))
    first, second = await hooks.wait("dup", count=2)
    outcomes = []
    for delivery in (first, second):
        assert provider.verify_webhook(delivery.headers, delivery.body)
        outcomes.append(provider.parse_webhook(delivery.body))
    assert outcomes[0].state == "completed"
    assert outcomes[0] == outcomes[1]  # same job, same result: the CAS makes it count once
    if polling_adapter.provider == "replicate":
        assert first.headers["webhook-id"] == second.headers["webhook-id"]


async def test_late_webhook(
    polling_adapter: Adapter, http: aiohttp.ClientSession, mock: Mock, hooks: Hooks
) -> None:
    """The poll sees the result first; the webhook still arrives after, and says the
    same thing (our route then finds the job done and ignores it)."""
    provider = build(polling_adapter, http, mock)
    assert isinstance(provider, PollingProvider)
    job = make_job("a fox [mock:latewebhook=1.5]")
    job = replace(
        job,
        provider_job_id=(
            await provider.submit(job, webhook_url=hooks.for_("late"))
        ).provider_job_id,
    )
    polled = await poll_until(provider, job, terminal)
    assert polled.state == "completed"
    assert hooks.count("late") == 0
    delivery = (await hooks.wait("late"))[0]
    assert provider.verify_webhook(delivery.headers, delivery.body)
    assert provider.parse_webhook(delivery.body) == polled


async def test_lost_webhook(
    polling_adapter: Adapter, http: aiohttp.ClientSession, mock: Mock, hooks: Hooks
) -> None:
    """No webhook ever comes; the poll (the reconciler's backup path) finds the result."""
    provider = build(polling_adapter, http, mock)
    assert isinstance(provider, PollingProvider)
    job = make_job("a fox [mock:nowebhook]")
    job = replace(
        job,
        provider_job_id=(
            await provider.submit(job, webhook_url=hooks.for_("lost"))
        ).provider_job_id,
    )
    polled = await poll_until(provider, job, terminal)
    assert polled.state == "completed"
    mocked = mock.state.jobs[job.provider_job_id or ""]
    assert (mocked.webhook, mocked.deliveries) == ("suppressed", [])
    assert hooks.count("lost") == 0


async def test_webhook_redelivered_after_an_error(
    polling_adapter: Adapter, http: aiohttp.ClientSession, mock: Mock, hooks: Hooks
) -> None:
    provider = build(polling_adapter, http, mock)
    assert isinstance(provider, PollingProvider)
    hooks.fail["flaky"] = 1
    job = make_job()
    submission = await provider.submit(job, webhook_url=hooks.for_("flaky"))
    delivery = (await hooks.wait("flaky"))[0]
    assert hooks.count("flaky:refused") == 1
    assert provider.parse_webhook(delivery.body).state == "completed"
    mocked = mock.state.jobs[submission.provider_job_id or ""]
    await until(lambda: mocked.webhook == "sent")
    assert [d.get("status") for d in mocked.deliveries] == [500, 200]


async def test_malformed_webhook_is_rejected(
    polling_adapter: Adapter, http: aiohttp.ClientSession, mock: Mock
) -> None:
    provider = build(polling_adapter, http, mock)
    assert isinstance(provider, PollingProvider)
    for body in (b"not json", b"[]", b'{"id": "x"}', b'{"id": "x", "status": "EXPLODED"}'):
        with pytest.raises(ProviderRejected) as info:
            provider.parse_webhook(body)
        assert info.value.code == "invalid_payload"
