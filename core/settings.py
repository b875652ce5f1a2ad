"""One settings object for every gengui process, read from ``GENGUI_*`` variables."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

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
    log_format: Literal["json", "console"] = "json"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    # API.
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    public_url: str | None = Field(
        None, description="Base URL clients use; default http://host:port."
    )
    db_pool_max: int = Field(10, ge=1, description="asyncpg pool size per process.")

    # Streams.
    stream_prefix: str = Field("gengui", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    stream_maxlen: int = Field(100_000, ge=1000, description="Approximate cap on each stream.")
    consumer_batch: int = Field(100, ge=1, le=10_000, description="Entries per XREADGROUP.")
    consumer_block_ms: int = Field(1000, ge=1)
    consumer_concurrency: int = Field(
        16, ge=1, description="Messages handled at once per consumer."
    )
    reclaim_idle_ms: int = Field(
        60_000, ge=100, description="Pending entries idle this long are reclaimed."
    )
    reclaim_interval_s: float = Field(5.0, gt=0)
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
    runpod_api_url: str = "https://api.runpod.ai/v2"
    runpod_endpoint_id: str | None = None
    runpod_api_key: SecretStr | None = None
    runpod_check_s: float = Field(5.0, gt=0, description="RunPod jobs are polled this often.")
    runpod_execution_timeout_s: int = Field(
        300, ge=5, description="RunPod policy.executionTimeout."
    )
    runpod_ttl_s: int = Field(3600, ge=10, description="RunPod policy.ttl.")
    gemini_api_url: str = "https://generativelanguage.googleapis.com"
    gemini_api_key: SecretStr | None = None
    gemini_model: str = "imagen-4.0-generate-001"
    openai_api_url: str = "https://api.openai.com"
    openai_api_key: SecretStr | None = None
    openai_model: str = "gpt-image-1"
    replicate_api_url: str = "https://api.replicate.com"
    replicate_api_token: SecretStr | None = None
    replicate_model: str = "black-forest-labs/flux-schnell"
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
    download_max_bytes: int = Field(30 * 1024 * 1024, ge=1024)

    # Storage.
    storage_backend: Literal["local", "s3"] = "local"
    storage_dir: Path | None = Field(None, description="Local image root; default data_dir/images.")
    s3_bucket: str | None = None
    s3_endpoint_url: str | None = None
    s3_public_endpoint_url: str | None = None
    s3_region: str = "us-east-1"
    s3_access_key_id: SecretStr | None = None
    s3_secret_access_key: SecretStr | None = None
    s3_create_bucket: bool = False
    image_url_ttl_s: int = Field(300, ge=1, description="Lifetime of presigned image URLs.")

    # Local GPU workers.
    worker_engine: Literal["placeholder"] = "placeholder"
    worker_heartbeat_s: float = Field(5.0, gt=0)
    worker_concurrency: int = Field(1, ge=1, description="Jobs one worker runs at once.")

    # Thumbnails.
    thumbnail_px: int = Field(128, ge=16, le=1024)

    # Reconciler.
    reconcile_interval_s: float = Field(5.0, gt=0)

    @field_validator(
        "database_url",
        "redis_url",
        "public_url",
        "storage_dir",
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
