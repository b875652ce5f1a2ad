"""Replicate's Standard Webhooks signatures: the mock's real deliveries verify; a
tampered body, another secret, a stale or future timestamp, or missing headers do not."""

from __future__ import annotations

import base64

import aiohttp
import pytest

from providers.mock.config import DEFAULT_REPLICATE_SECRET
from providers.replicate import ReplicateProvider, verify_standard_webhook
from tests.providers.conftest import Delivery, Hooks, Mock, make_job

# The worked example of the Standard Webhooks / Svix documentation.
SPEC_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SPEC_HEADERS = {
    "webhook-id": "msg_p5jXN8AQM9LWM0D4loKWxJek",
    "webhook-timestamp": "1614265330",
    "webhook-signature": "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
}
SPEC_BODY = b'{"test": 2432232314}'
SPEC_KEY = base64.b64decode(SPEC_SECRET.removeprefix("whsec_"))
SPEC_NOW = 1614265330.0


def test_spec_example_verifies() -> None:
    assert verify_standard_webhook(SPEC_KEY, SPEC_HEADERS, SPEC_BODY, now=SPEC_NOW)


@pytest.mark.parametrize(
    "change",
    [
        {"body": b'{"test": 2432232315}'},
        {"webhook-id": "msg_other"},
        {"webhook-timestamp": "1614265331"},
        {"webhook-signature": "v1,AAAAg0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="},
        {"webhook-signature": "v2,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="},
        {"webhook-signature": ""},
        {"webhook-id": None},
        {"webhook-timestamp": None},
        {"webhook-timestamp": "soon"},
        {"webhook-signature": None},
    ],
    ids=lambda c: ",".join(f"{k}={'missing' if v is None else v!s:.12}" for k, v in c.items()),
)
def test_spec_example_tampered(change: dict[str, object]) -> None:
    headers = dict(SPEC_HEADERS)
    change = dict(change)
    body = change.pop("body", SPEC_BODY)
    for name, value in change.items():
        if value is None:
            headers.pop(name)
        else:
            headers[name] = str(value)
    assert not verify_standard_webhook(SPEC_KEY, headers, body, now=SPEC_NOW)  # type: ignore[arg-type]


def test_timestamp_tolerance_is_five_minutes_both_ways() -> None:
    verify = verify_standard_webhook
    assert verify(SPEC_KEY, SPEC_HEADERS, SPEC_BODY, now=SPEC_NOW + 299)
    assert verify(SPEC_KEY, SPEC_HEADERS, SPEC_BODY, now=SPEC_NOW - 299)
    assert not verify(SPEC_KEY, SPEC_HEADERS, SPEC_BODY, now=SPEC_NOW + 301)  # replayed late
    assert not verify(SPEC_KEY, SPEC_HEADERS, SPEC_BODY, now=SPEC_NOW - 301)  # from the future


def test_any_of_several_signatures_may_match() -> None:
    """Key rotation: the header lists a signature per active secret."""
    headers = {
        **SPEC_HEADERS,
        "webhook-signature": "v1,bm90IHRoaXMgb25l v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
    }
    assert verify_standard_webhook(SPEC_KEY, headers, SPEC_BODY, now=SPEC_NOW)


def test_header_names_are_case_insensitive() -> None:
    headers = {k.title(): v for k, v in SPEC_HEADERS.items()}
    assert verify_standard_webhook(SPEC_KEY, headers, SPEC_BODY, now=SPEC_NOW)


async def _delivery(http: aiohttp.ClientSession, mock: Mock, hooks: Hooks) -> Delivery:
    provider = ReplicateProvider(http, mock.url, "t", "a/b", DEFAULT_REPLICATE_SECRET, 5)
    await provider.submit(make_job(), webhook_url=hooks.for_("signed"))
    return (await hooks.wait("signed"))[0]


async def test_mock_delivery_verifies_and_tampering_does_not(
    http: aiohttp.ClientSession, mock: Mock, hooks: Hooks
) -> None:
    delivery = await _delivery(http, mock, hooks)
    ours = ReplicateProvider(http, mock.url, "t", "a/b", DEFAULT_REPLICATE_SECRET, 5)
    assert ours.verify_webhook(delivery.headers, delivery.body)

    tampered = delivery.body.replace(b'"succeeded"', b'"failed"')
    assert tampered != delivery.body
    assert not ours.verify_webhook(delivery.headers, tampered)

    other_secret = "whsec_" + base64.b64encode(b"someone else's key").decode()
    theirs = ReplicateProvider(http, mock.url, "t", "a/b", other_secret, 5)
    assert not theirs.verify_webhook(delivery.headers, delivery.body)

    stale = {
        **delivery.headers,
        "webhook-timestamp": str(int(delivery.headers["webhook-timestamp"]) - 600),
    }
    assert not ours.verify_webhook(stale, delivery.body)


async def test_without_a_secret_the_url_hmac_is_the_proof(
    http: aiohttp.ClientSession, mock: Mock
) -> None:
    provider = ReplicateProvider(http, mock.url, "t", "a/b", None, 5)
    assert provider.verify_webhook({}, b"{}")


def test_a_malformed_secret_fails_at_start() -> None:
    with pytest.raises(ValueError, match="whsec_"):
        ReplicateProvider(None, "http://x", "t", "a/b", "whsec_***", 5)  # type: ignore[arg-type]
