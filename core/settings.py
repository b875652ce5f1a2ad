"""One settings object for every gengui process, read from ``GENGUI_*`` variables."""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from core.keys import Keys

ProviderName = Literal["local", "runpod", "gemini", "openai", "replicate"]
PROVIDERS: tuple[ProviderName, ...] = ("local", "runpod", "gemini", "openai", "replicate")


class Settings(BaseSettings):
    """Every knob of gengui. Durations carry their unit in the name."""

    model_config = SettingsConfigDict(
        env_prefix="GENGUI_", env_file=None, extra="ignore", frozen=True
    )

    # Servers. Unset means "start embedded ones under data_dir" (gengui dev, tests).
    database_url: str | None = Field(None, description="Postgres DSN (postgresql://...).")
    redis_url: str | None = Field(None, description="Redis or Valkey URL (redis://...).")
    data_dir: Path = Field(Path(".gengui"), description="Embedded servers and local images.")

    # Logging.
    log_format: Literal["json", "console"] = Field(
        "json",
        description=(
            "`json`: one JSON object a line (production). `console`: pretty, for people "
            "(the default of `gengui dev`)."
        ),
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Lowest level logged."
    )

    # API.
    api_host: str = Field(
        "127.0.0.1", description="Interface the API listens on; `0.0.0.0` inside a container."
    )
    api_port: int = Field(8000, description="Port the API listens on.")
    public_url: str | None = Field(
        None, description="Base URL clients use; default http://host:port."
    )
    auth_cache_s: float = Field(
        5.0,
        ge=0,
        description=(
            "A valid API token is remembered this long per process (0: ask the database "
            "every request). A token revoked elsewhere may work this much longer."
        ),
    )
    api_create_concurrency: int = Field(
        2,
        ge=1,
        description=(
            "Create transactions one API process runs at once; the creates that arrive "
            "meanwhile share the next one (one INSERT for all)."
        ),
    )
    db_pool_max: int = Field(10, ge=1, description="asyncpg pool size per process.")

    # Streams.
    stream_prefix: str = Field(
        "gengui",
        pattern=r"^[A-Za-z0-9_.-]{1,64}$",
        description=(
            "Prefix of every Redis stream, channel and key: deployments (and test runs) "
            "sharing one Redis use different prefixes."
        ),
    )
    stream_maxlen: int = Field(100_000, ge=1000, description="Approximate cap on each stream.")
    consumer_batch: int = Field(100, ge=1, le=10_000, description="Entries per XREADGROUP.")
    status_batch: int = Field(
        500,
        ge=1,
        le=10_000,
        description=(
            "Entries per XREADGROUP of the status consumer, which applies a read with one "
            "statement per kind of report: under a backlog a bigger read costs less per "
            "report (measured in bench/README.md), and a quiet stream's reads stay small."
        ),
    )
    consumer_block_ms: int = Field(
        1000, ge=1, description="How long one XREADGROUP waits for new entries."
    )
    consumer_pipeline: int = Field(
        2,
        ge=1,
        le=16,
        description=(
            "Reads the status consumer applies at once: while one batch waits on Postgres "
            "the next is applied, unless it reports on a generation still in flight."
        ),
    )
    consumer_concurrency: int = Field(
        16, ge=1, description="Messages handled at once per consumer."
    )
    reclaim_idle_ms: int = Field(
        60_000, ge=100, description="Pending entries idle this long are reclaimed."
    )
    reclaim_interval_s: float = Field(
        5.0, gt=0, description="How often a consumer looks for idle pending entries."
    )
    max_deliveries: int = Field(
        5, ge=1, description="Deliveries before a message is dead-lettered."
    )

    # Generations.
    default_provider: ProviderName = Field(
        "local", description="Provider when no feature flag or flags file picks one."
    )
    generation_deadline_s: int = Field(
        600, ge=1, description="A generation not done by then fails."
    )
    api_dispatch: bool = Field(
        True,
        description=(
            "The API hands a queue provider's new job (local workers, hosted runners) to "
            "its queue itself: the create is written submitted and its job sent with its "
            "notice, with no trip through the dispatchers. Off: every create is written "
            "queued and dispatched by `gengui consumers`."
        ),
    )
    dispatch_grace_s: float = Field(30.0, gt=0, description="Queued this long: publish again.")
    local_check_s: float = Field(
        120.0, gt=0, description="A local job silent this long (no status, progress) is retried."
    )
    max_attempts: int = Field(3, ge=1, description="Attempts before a generation fails for good.")
    retry_base_s: float = Field(2.0, gt=0, description="Backoff before the 2nd attempt; doubles.")
    retry_cap_s: float = Field(60.0, gt=0, description="Longest backoff between attempts.")
    thumbnail_grace_s: float = Field(
        60.0, gt=0, description="Completed without thumbnail: ask again."
    )

    # Feature flags (GrowthBook): flag `image_provider` picks the provider per generation.
    growthbook_api_host: str | None = Field(
        None, description="GrowthBook API host, e.g. https://cdn.growthbook.io."
    )
    growthbook_client_key: str | None = Field(None, description="SDK client key (sdk-...).")
    growthbook_refresh_s: float = Field(
        30.0, gt=0, description="Feature refresh interval when streaming is unavailable."
    )
    growthbook_streaming: bool = Field(True, description="Follow GrowthBook's SSE stream.")
    flags_file: Path | None = Field(
        None, description="Local features JSON used when GrowthBook has never answered."
    )

    # Providers. Webhook URLs carry an HMAC of (generation id, attempt) under this key.
    webhook_secret: SecretStr | None = Field(
        None, description="Signs our webhook URLs; default derived from data_dir (dev only)."
    )
    provider_timeout_s: float = Field(60.0, gt=0, description="One provider HTTP call, at most.")
    provider_concurrency: int = Field(
        8, ge=1, description="Calls in flight per hosted provider per process."
    )
    provider_rate_limits: dict[str, float] = Field(
        default_factory=dict,
        description='Requests per second per provider across replicas, e.g. {"openai": 5}.',
    )
    runpod_api_url: str = Field(
        "https://api.runpod.ai/v2", description="RunPod serverless API base URL."
    )
    runpod_endpoint_id: str | None = Field(
        None,
        description="RunPod endpoint id; RunPod is available when this and the API key are set.",
    )
    runpod_api_key: SecretStr | None = Field(None, description="RunPod API key.")
    runpod_check_s: float = Field(5.0, gt=0, description="RunPod jobs are polled this often.")
    runpod_execution_timeout_s: int = Field(
        300, ge=5, description="RunPod policy.executionTimeout."
    )
    runpod_ttl_s: int = Field(3600, ge=10, description="RunPod policy.ttl.")
    gemini_api_url: str = Field(
        "https://generativelanguage.googleapis.com", description="Gemini API base URL."
    )
    gemini_api_key: SecretStr | None = Field(
        None, description="Gemini API key; Gemini is available when set."
    )
    gemini_model: str = Field("imagen-4.0-generate-001", description="Gemini image model.")
    openai_api_url: str = Field("https://api.openai.com", description="OpenAI API base URL.")
    openai_api_key: SecretStr | None = Field(
        None, description="OpenAI API key; OpenAI is available when set."
    )
    openai_model: str = Field("gpt-image-1", description="OpenAI image model.")
    replicate_api_url: str = Field(
        "https://api.replicate.com", description="Replicate API base URL."
    )
    replicate_api_token: SecretStr | None = Field(
        None, description="Replicate API token; Replicate is available when set."
    )
    replicate_model: str = Field(
        "black-forest-labs/flux-schnell", description="Replicate model (`owner/name`)."
    )
    replicate_webhook_secret: SecretStr | None = Field(
        None, description="Replicate's signing secret (whsec_...)."
    )
    replicate_check_s: float = Field(
        10.0, gt=0, description="Replicate jobs are polled this often."
    )
    download_hosts: tuple[str, ...] = Field(
        ("replicate.delivery", "*.replicate.delivery"),
        description="Hosts provider output URLs may be downloaded from (https only).",
    )
    download_allow_http: bool = Field(
        False, description="Also allow http:// downloads (tests and mock providers only)."
    )
    download_max_bytes: int = Field(
        30 * 1024 * 1024, ge=1024, description="Largest provider output downloaded, in bytes."
    )

    # Storage.
    storage_backend: Literal["local", "s3"] = Field(
        "local",
        description=(
            "`local`: files under the storage directory. `s3`: any S3 API (AWS, MinIO, R2)."
        ),
    )
    storage_sync: Literal["group", "file"] = Field(
        "group",
        description=(
            "How the local store makes a written object durable before it is reported: "
            "`group` runs one syncfs for all the writes of about the same moment (Linux; "
            "elsewhere `file`), `file` fsyncs each file and its directory. `group` also "
            "flushes other processes' writes on that filesystem."
        ),
    )
    storage_dir: Path | None = Field(None, description="Local image root; default data_dir/images.")
    s3_bucket: str | None = Field(None, description="Bucket for images; required with `s3`.")
    s3_endpoint_url: str | None = Field(
        None, description="S3 API endpoint (MinIO, R2); unset for AWS."
    )
    s3_public_endpoint_url: str | None = Field(
        None,
        description=(
            "Endpoint presigned URLs are signed for, when clients reach S3 by another "
            "host than gengui does."
        ),
    )
    s3_region: str = Field("us-east-1", description="S3 region.")
    s3_access_key_id: SecretStr | None = Field(
        None, description="S3 access key; unset: the default AWS credential chain."
    )
    s3_secret_access_key: SecretStr | None = Field(
        None, description="S3 secret key; unset: the default AWS credential chain."
    )
    s3_create_bucket: bool = Field(
        False, description="Create the bucket at start-up when missing (development)."
    )
    image_url_ttl_s: int = Field(300, ge=1, description="Lifetime of presigned image URLs.")

    # Local GPU workers.
    worker_engine: Literal["placeholder", "diffusers", "instant"] = Field(
        "placeholder",
        description=(
            "Engine a local GPU worker runs: `placeholder` draws a picture of the prompt, "
            "`diffusers` runs a local model, `instant` returns one tiny PNG (load tests)."
        ),
    )
    worker_model_dir: Path | None = Field(
        None,
        description="Local diffusers pipeline directory (with model_index.json) the "
        "`diffusers` engine loads; nothing is downloaded.",
    )
    worker_device: str = Field(
        "auto",
        pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$",
        description="Torch device of the `diffusers` engine; `auto` is cuda when available, "
        "else cpu. fp16 on cuda, fp32 elsewhere.",
    )
    worker_steps: int = Field(30, ge=1, le=150, description="Denoising steps per image.")
    worker_guidance_scale: float | None = Field(
        None, ge=0, description="Classifier-free guidance; unset keeps the model's default."
    )
    worker_heartbeat_s: float = Field(
        5.0,
        gt=0,
        description=(
            "How often a worker says it is alive; the reconciler leaves a live worker's jobs alone."
        ),
    )
    worker_concurrency: int = Field(1, ge=1, description="Jobs one worker runs at once.")
    worker_processing_after_s: float = Field(
        0.05,
        ge=0,
        description=(
            "A job still running this long after its worker took it reports `processing` "
            "(at once if it reports progress first); a faster one reports only its outcome, "
            "which saves the pipeline a transition, a history row and a notice per job. "
            "0 reports `processing` as soon as a job is taken."
        ),
    )

    # Real-time events (core.realtime): SSE and WebSocket clients of the API.
    events_keepalive_s: float = Field(
        15.0,
        gt=0,
        description="An idle event stream gets a keepalive this often; also the Redis "
        "pub/sub health check interval.",
    )
    events_client_buffer: int = Field(
        1000,
        ge=10,
        description="Events queued for one client at most; a client that falls further "
        "behind is disconnected and catches up from the replay log when it reconnects.",
    )
    events_max_streams_per_user: int = Field(
        16,
        ge=1,
        description="Open event streams per user per API process; a new one "
        "beyond this closes that user's oldest.",
    )
    events_retry_ms: int = Field(
        3000, ge=100, description="SSE `retry:` hint: how long a browser waits to reconnect."
    )

    # Thumbnails.
    thumbnail_px: int = Field(
        128, ge=16, le=1024, description="Longest side of a thumbnail, in pixels."
    )

    # Reconciler.
    reconcile_interval_s: float = Field(
        5.0, gt=0, description="Time between two reconciler passes."
    )
    janitor_interval_s: float = Field(
        3600.0,
        gt=0,
        description=(
            "Time between two passes of the reconciler's janitor, which deletes expired "
            "or revoked sessions, used or expired mailed tokens, dead API tokens, and "
            "the stream consumers of processes that crashed (nothing pending, silent "
            "for 15 minutes)."
        ),
    )
    janitor_keep_s: float = Field(
        7 * 86400.0,
        ge=0,
        description="How long the janitor keeps a dead session or token before deleting it.",
    )

    # Accounts (core.accounts): sign-up, sessions, mailed tokens, login throttling.
    app_url: str | None = Field(
        None,
        description="Base URL of the web client, for links in e-mails "
        "({app_url}/verify-email#token=..., /reset-password#token=...); default public URL.",
    )
    signup_allowed_domains: Annotated[tuple[str, ...], NoDecode] = Field(
        (),
        description="Only addresses at these domains may sign up (comma-separated, exact "
        "domain match); empty: any domain.",
    )
    session_lifetime_s: int = Field(
        14 * 86400, ge=60, description="A browser session ends this long after sign-in."
    )
    session_cookie: str = Field(
        "gengui_session",
        pattern=r"^[A-Za-z0-9_-]{1,64}$",
        description="Name of the HttpOnly session cookie.",
    )
    csrf_cookie: str = Field(
        "gengui_csrf",
        pattern=r"^[A-Za-z0-9_-]{1,64}$",
        description="Readable by the web client, which echoes it in X-CSRF-Token.",
    )
    cookie_secure: bool | None = Field(
        None,
        description="Secure flag on cookies; unset: on unless the public URL is "
        "http://localhost or a loopback address (development).",
    )
    email_verification_ttl_s: int = Field(
        48 * 3600, ge=60, description="A verification link works this long, once."
    )
    password_reset_ttl_s: int = Field(
        3600, ge=60, description="A password reset link works this long, once."
    )
    mail_cooldown_s: int = Field(
        60, ge=0, description="At most one verification or reset mail per address this often."
    )
    login_max_failures: int = Field(
        5, ge=1, description="Failed sign-ins per account in login_window_s before a lockout."
    )
    login_ip_max_failures: int = Field(
        50, ge=1, description="Failed sign-ins per client IP in login_window_s before a lockout."
    )
    login_window_s: int = Field(900, ge=1, description="Failed sign-ins are counted this long.")
    login_lockout_s: int = Field(900, ge=1, description="How long a lockout lasts.")
    auth_requests_per_minute_per_ip: int = Field(
        20,
        ge=0,
        description="Sign-ups, verification and reset requests per client IP (0: no limit).",
    )
    proxy_hops: int = Field(
        0,
        ge=0,
        le=10,
        description="Reverse proxies in front of the API that append to X-Forwarded-For: "
        "the client IP (login throttling, per-IP limits) is that many entries from the "
        "right; 0: the peer address. Too high lets clients choose their own IP.",
    )

    # E-mail. No smtp_host: mails are not sent and their link is logged (development).
    smtp_host: str | None = Field(None, description="SMTP server; unset: log links instead.")
    smtp_port: int = Field(587, ge=1, le=65535, description="SMTP port.")
    smtp_username: str | None = Field(None, description="SMTP login, when the server wants one.")
    smtp_password: SecretStr | None = Field(None, description="SMTP password.")
    smtp_security: Literal["starttls", "tls", "none"] = Field(
        "starttls", description="starttls (port 587), tls (implicit, port 465) or none."
    )
    smtp_from: str = Field("gengui <no-reply@localhost>", description="From: of every mail.")
    smtp_timeout_s: float = Field(10.0, gt=0, description="One SMTP delivery, at most.")

    # Limits (core.limits), each a 429 with Retry-After; 0 turns one off.
    requests_per_minute: int = Field(
        120, ge=0, description="Authenticated API requests per user per minute."
    )
    max_active_generations: int = Field(
        5, ge=0, description="Generations a user may have queued or running at once."
    )
    plan_quotas: dict[str, int] = Field(
        default_factory=lambda: {"free": 50, "pro": 1000},
        description='Generations per user per UTC day by plan, e.g. {"free": 50, "pro": 1000};'
        " a plan not listed gets the free quota; 0: unlimited.",
    )

    @field_validator("app_url", "smtp_host", "smtp_username", "smtp_password", mode="before")
    @classmethod
    def _empty_account_setting_is_unset(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("signup_allowed_domains", mode="before")
    @classmethod
    def _domains(cls, value: object) -> object:
        if isinstance(value, str):
            text = value.strip()
            value = json.loads(text) if text.startswith("[") else text.split(",")
        if isinstance(value, list | tuple):
            return tuple(str(d).strip().lower().lstrip("@") for d in value if str(d).strip())
        return value

    @field_validator(
        "database_url",
        "redis_url",
        "public_url",
        "storage_dir",
        "worker_model_dir",
        "worker_guidance_scale",
        "s3_bucket",
        "s3_endpoint_url",
        "s3_public_endpoint_url",
        "s3_access_key_id",
        "s3_secret_access_key",
        "growthbook_api_host",
        "growthbook_client_key",
        "flags_file",
        "webhook_secret",
        "runpod_endpoint_id",
        "runpod_api_key",
        "gemini_api_key",
        "openai_api_key",
        "replicate_api_token",
        "replicate_webhook_secret",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @cached_property
    def keys(self) -> Keys:
        return Keys(self.stream_prefix)

    @property
    def images_dir(self) -> Path:
        return self.storage_dir or (self.data_dir / "images")

    @property
    def base_url(self) -> str:
        return self.public_url or f"http://{self.api_host}:{self.api_port}"

    @property
    def web_url(self) -> str:
        """Where the web client lives: links in e-mails point there."""
        return (self.app_url or self.base_url).rstrip("/")

    @property
    def secure_cookies(self) -> bool:
        """Secure cookies except on a plain-http loopback URL (a developer's machine)."""
        if self.cookie_secure is not None:
            return self.cookie_secure
        url = urlsplit(self.base_url)
        host = url.hostname or ""
        local = host in ("localhost", "127.0.0.1", "::1") or host.endswith(".localhost")
        return not (url.scheme == "http" and local)
