"""The providers one process can reach, built once from settings around one HTTP session.

Three shapes of provider (see ``providers.base``):
- queue providers (``local`` GPU workers, and the hosted APIs ``gemini``/``openai``):
  the API (a create) or dispatch appends the job to ``jobs:{provider}``; runners take
  it from there;
- polling providers (``runpod``, ``replicate``): dispatch submits over HTTP with a
  signed webhook URL; the reconciler polls as the backup path;
- sync providers (``gemini``, ``openai``): the hosted runner calls ``generate``.

A provider whose credentials are not set is simply absent: a generation routed to it
fails with ``provider_unknown`` rather than waiting for its deadline.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import aiohttp

from core.events import LocalJob
from core.settings import Settings
from core.streams import Publisher
from providers.base import Job, PollingProvider, Provider, Submission, SyncProvider

if TYPE_CHECKING:
    from core.notify import Outbox


class QueueProvider:
    """Submitting is one XADD to ``jobs:{name}``; the job carries all a runner needs."""

    def __init__(self, name: str, publisher: Publisher) -> None:
        self.name = name
        self.publisher = publisher

    @property
    def stream(self) -> str:
        return self.publisher.keys.jobs(self.name)

    @staticmethod
    def message(job: Job) -> LocalJob:
        # The job is found by generation id and attempt, which the message carries.
        return LocalJob(
            generation_id=job.generation_id,
            attempt=job.attempt,
            user_id=job.user_id,
            prompt=job.prompt,
            negative_prompt=job.negative_prompt,
            width=job.width,
            height=job.height,
            seed=job.seed,
            deadline_at=job.deadline_at,
        )

    def dispatch_in(self, outbox: Outbox, row: Any) -> None:
        """A claimed (``submitted``) row's notice and job, into ``outbox``: one script
        call sends both, so its runner cannot start it before its notice is out. The
        dispatchers and the API (a create, ``Settings.api_dispatch``) both send so."""
        outbox.notify(row, "generation.submitted")
        outbox.send(self.stream, self.message(Job.from_row(row)))

    async def submit(self, job: Job, *, webhook_url: str | None = None) -> Submission:
        await self.publisher.send(self.stream, self.message(job))
        return Submission()

    async def cancel(self, job: Job) -> None:
        # Runners check nothing mid-job: a late result for a cancelled generation is
        # refused by the lifecycle CAS and its object deleted by the status consumer.
        return None


@dataclass
class ProviderSet:
    dispatch: dict[str, Provider] = field(default_factory=dict)
    polling: dict[str, PollingProvider] = field(default_factory=dict)
    sync: dict[str, SyncProvider] = field(default_factory=dict)
    session: aiohttp.ClientSession | None = None  # for downloads of provider output

    @classmethod
    def local_only(cls, publisher: Publisher) -> ProviderSet:
        return cls(dispatch={"local": QueueProvider("local", publisher)})


def check_after(settings: Settings, provider: str) -> timedelta:
    """How long a dispatched job may stay silent before the reconciler looks at it."""
    s = settings
    seconds = {
        "runpod": s.runpod_check_s,
        "replicate": s.replicate_check_s,
        # A hosted call is bounded by the provider timeout; a runner silent past that
        # (and its retry) is gone.
        "gemini": s.provider_timeout_s + s.dispatch_grace_s,
        "openai": s.provider_timeout_s + s.dispatch_grace_s,
    }.get(provider, s.local_check_s)
    return timedelta(seconds=seconds)


def _secret(value: object) -> str:
    return value.get_secret_value() if value is not None else ""  # type: ignore[attr-defined]


def build_http_providers(
    settings: Settings, session: aiohttp.ClientSession
) -> tuple[dict[str, PollingProvider], dict[str, SyncProvider]]:
    # Imported only when configured: a process loads the adapters it uses.
    s = settings
    timeout = s.provider_timeout_s
    polling: dict[str, PollingProvider] = {}
    sync: dict[str, SyncProvider] = {}
    if s.runpod_endpoint_id and s.runpod_api_key is not None:
        from providers.runpod import RunPodProvider

        polling["runpod"] = RunPodProvider(
            session,
            base_url=s.runpod_api_url,
            endpoint_id=s.runpod_endpoint_id,
            api_key=_secret(s.runpod_api_key),
            execution_timeout_s=s.runpod_execution_timeout_s,
            ttl_s=s.runpod_ttl_s,
            timeout_s=timeout,
        )
    if s.replicate_api_token is not None:
        from providers.replicate import ReplicateProvider

        polling["replicate"] = ReplicateProvider(
            session,
            base_url=s.replicate_api_url,
            api_token=_secret(s.replicate_api_token),
            model=s.replicate_model,
            webhook_secret=_secret(s.replicate_webhook_secret) or None,
            timeout_s=timeout,
        )
    if s.gemini_api_key is not None:
        from providers.gemini import GeminiProvider

        sync["gemini"] = GeminiProvider(
            session,
            base_url=s.gemini_api_url,
            api_key=_secret(s.gemini_api_key),
            model=s.gemini_model,
            timeout_s=timeout,
        )
    if s.openai_api_key is not None:
        from providers.openai import OpenAIProvider

        sync["openai"] = OpenAIProvider(
            session,
            base_url=s.openai_api_url,
            api_key=_secret(s.openai_api_key),
            model=s.openai_model,
            timeout_s=timeout,
        )
    return polling, sync


@contextlib.asynccontextmanager
async def open_providers(settings: Settings, publisher: Publisher) -> AsyncIterator[ProviderSet]:
    """Every configured provider, sharing one ``aiohttp.ClientSession`` closed on exit."""
    connector = aiohttp.TCPConnector(limit=256, limit_per_host=64, ttl_dns_cache=300)
    async with aiohttp.ClientSession(connector=connector) as session:
        polling, sync = build_http_providers(settings, session)
        dispatch: dict[str, Provider] = {"local": QueueProvider("local", publisher)}
        dispatch.update(polling)
        dispatch.update({name: QueueProvider(name, publisher) for name in sync})
        yield ProviderSet(dispatch=dispatch, polling=polling, sync=sync, session=session)
