"""The mock's knobs: server-wide ``MockConfig`` and per-job directives in the prompt."""

from __future__ import annotations

import base64
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Final

# A fixed, public test secret: the mock signs Replicate webhooks with it unless told
# otherwise, and ``GENGUI_REPLICATE_WEBHOOK_SECRET`` must match it in dev.
DEFAULT_REPLICATE_SECRET: Final = "whsec_" + base64.b64encode(b"gengui-mock-replicate-key").decode()


def _signing_key(secret: str) -> bytes:
    if not secret.startswith("whsec_"):
        raise ValueError("the Replicate webhook secret must look like whsec_<base64>")
    return base64.b64decode(secret.removeprefix("whsec_"), validate=True)


def _optional_str(value: Any) -> str | None:
    return None if value in (None, "") else str(value)


_TUNABLE: Final[dict[str, Callable[[Any], Any]]] = {
    "latency_s": float,
    "failure_rate": float,
    "seed": int,
    "webhook_retries": int,
    "webhook_retry_delay_s": float,
    "hang_s": float,
    "public_url": _optional_str,
}

_DIRECTIVE: Final = re.compile(r"\[mock:([a-z_]+)(?:=([0-9]+(?:\.[0-9]+)?))?\]")


@dataclass
class MockConfig:
    """Server-wide behaviour; ``POST /_mock/config`` changes the tunable ones live."""

    latency_s: float = 0.0
    failure_rate: float = 0.0
    seed: int = 0
    # When set, each provider's credential must equal it; otherwise any non-empty one
    # passes (the mock only checks that the adapter sends auth the provider's way).
    api_key: str | None = None
    replicate_webhook_secret: str = DEFAULT_REPLICATE_SECRET
    # The real services retry a failed webhook delivery (RunPod twice, 10 s apart).
    webhook_retries: int = 2
    webhook_retry_delay_s: float = 1.0
    webhook_timeout_s: float = 10.0
    # A hanging request is answered 503 after this long (or at shutdown).
    hang_s: float = 600.0
    # Base URL for Replicate output files; default: the URL the request came to.
    public_url: str | None = None
    max_side: int = 2048
    request_log_size: int = 10_000
    max_jobs: int = 50_000

    def __post_init__(self) -> None:
        self._check(vars(self))
        _signing_key(self.replicate_webhook_secret)

    def update(self, values: dict[str, Any]) -> None:
        """Apply tunable keys of ``values``; raises ValueError for anything else."""
        changes = {}
        for name, value in values.items():
            if name not in _TUNABLE:
                raise ValueError(f"{name} is not a tunable setting ({', '.join(_TUNABLE)})")
            changes[name] = _TUNABLE[name](value)
        self._check({**vars(self), **changes})
        for name, value in changes.items():
            setattr(self, name, value)

    @staticmethod
    def _check(values: dict[str, Any]) -> None:
        if not 0.0 <= values["failure_rate"] <= 1.0:
            raise ValueError("failure_rate must be within [0, 1]")
        if values["max_jobs"] < 1:
            raise ValueError("max_jobs must be at least 1")
        for name in ("latency_s", "webhook_retries", "webhook_retry_delay_s", "hang_s"):
            if values[name] < 0:
                raise ValueError(f"{name} must not be negative")

    def public(self) -> dict[str, Any]:
        """The config without its secrets."""
        data = asdict(self)
        data.pop("api_key")
        data.pop("replicate_webhook_secret")
        return data


@dataclass
class Directives:
    """What the prompt asks of the mock, e.g. ``"a cat [mock:fail]"``.

    fail         the provider refuses the job for good, in its own words
    invalid      the request is refused as invalid (400 / 422)
    retryable    a transient failure (async: job FAILED / failed; sync: 5xx)
    ratelimit    429 with Retry-After
    timeout      async: RunPod TIMED_OUT, Replicate aborted; sync: the request hangs
    hang         the request itself (submit or generate) never answers
    stuck        async: the job never finishes and no webhook is sent; sync: hangs
    badimage     the "image" is not an image
    nowebhook    the job completes but its webhook is never sent (a lost webhook)
    dupwebhook   the webhook is sent twice
    latewebhook=S  the webhook is sent S seconds after the job finished
    latency=S    this job takes S seconds instead of the server's latency
    """

    fail: bool = False
    invalid: bool = False
    retryable: bool = False
    ratelimit: bool = False
    timeout: bool = False
    hang: bool = False
    stuck: bool = False
    badimage: bool = False
    nowebhook: bool = False
    dupwebhook: bool = False
    latewebhook: float | None = None
    latency: float | None = None
    unknown: list[str] = field(default_factory=list)

    @classmethod
    def parse(cls, prompt: str) -> Directives:
        d = cls()
        for name, value in _DIRECTIVE.findall(prompt or ""):
            if name in ("latewebhook", "latency"):
                setattr(d, name, float(value or 0))
            elif name in _FLAGS:
                setattr(d, name, True)
            else:
                d.unknown.append(name)
        return d

    def active(self) -> list[str]:
        out = [name for name in _FLAGS if getattr(self, name)]
        out += [
            f"{n}={getattr(self, n):g}"
            for n in ("latewebhook", "latency")
            if getattr(self, n) is not None
        ]
        return out


_FLAGS: Final = (
    "fail",
    "invalid",
    "retryable",
    "ratelimit",
    "timeout",
    "hang",
    "stuck",
    "badimage",
    "nowebhook",
    "dupwebhook",
)
