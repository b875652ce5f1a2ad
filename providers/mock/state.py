"""What the mock remembers: jobs, the requests it got, webhook deliveries; and the
shared machinery the provider routes use (latency, hangs, images, webhooks)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import io
import itertools
import random
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp
import orjson
from aiohttp import web
from PIL import Image

from core.logging import get_logger
from providers.mock.config import Directives, MockConfig

log = get_logger("gengui.mock")

# Bytes that are no image in any format, for [mock:badimage].
NOT_AN_IMAGE = b"this is not an image, it only says so\n"


@functools.lru_cache(maxsize=256)
def _png(width: int, height: int, rgb: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), rgb).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


# 64 colours: a 1024 px PNG costs ~20 ms to encode, so images repeat (cached) and a
# benchmark measures gengui, not the mock's zlib.
_PALETTE_SIZE = 64


def png(width: int, height: int, seed: int, max_side: int) -> bytes:
    """A real PNG of the requested size (clamped), its colour derived from the seed."""
    digest = hashlib.blake2b(str(seed % _PALETTE_SIZE).encode(), digest_size=3).digest()
    w = min(max(int(width), 1), max_side)
    h = min(max(int(height), 1), max_side)
    return _png(w, h, (digest[0], digest[1], digest[2]))


@dataclass
class MockJob:
    """One RunPod job or Replicate prediction, in that provider's own words."""

    id: str
    provider: str
    target: str  # RunPod endpoint id or Replicate model
    input: dict[str, Any]
    directives: Directives
    webhook_url: str | None
    status: str
    base_url: str = ""  # where this job's client reached us (output file URLs)
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    completed_at: float | None = None
    output: Any = None
    error: str | None = None
    image: bytes | None = None
    cancel_requests: int = 0
    retries: int = 0
    webhook: str = "none"  # none | pending | suppressed | sent | failed
    deliveries: list[dict[str, Any]] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    def summary(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "provider": self.provider,
            "target": self.target,
            "status": self.status,
            "prompt": self.input.get("prompt"),
            "directives": self.directives.active(),
            "webhook_url": self.webhook_url,
            "webhook": self.webhook,
            "deliveries": self.deliveries,
            "cancel_requests": self.cancel_requests,
            "retries": self.retries,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "completed_at": self.completed_at,
        }


class Flavor(Protocol):
    """How one async provider (RunPod, Replicate) words its jobs."""

    running: str
    webhook_on_cancel: bool

    def finish(self, state: MockState, job: MockJob) -> None:
        """Set the job's final status and output from its directives."""
        ...

    def body(self, job: MockJob) -> dict[str, Any]:
        """The job as the status endpoint and the webhook show it."""
        ...

    def webhook_headers(self, state: MockState, job: MockJob, body: bytes) -> dict[str, str]:
        """Headers for one webhook delivery (Replicate signs each one)."""
        ...


class MockState:
    def __init__(self, config: MockConfig) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        self.jobs: dict[str, MockJob] = {}
        self.requests: deque[dict[str, Any]] = deque(maxlen=config.request_log_size)
        self.stopping = asyncio.Event()
        self.session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._seq = itertools.count(1)

    # -- knobs ---------------------------------------------------------------------

    def directives(self, prompt: str) -> Directives:
        """The prompt's directives, plus a seeded random transient failure."""
        d = Directives.parse(prompt)
        rate = self.config.failure_rate
        # One draw per job whatever its directives, so a directive in one prompt never
        # shifts which later jobs fail: a run with the same seed fails the same jobs.
        if rate > 0 and self.rng.random() < rate:
            d.retryable = True
        return d

    def latency_s(self, d: Directives) -> float:
        return d.latency if d.latency is not None else self.config.latency_s

    def reseed(self, seed: int) -> None:
        self.rng.seed(seed)

    def new_id(self) -> str:
        return uuid.uuid4().hex[:20]

    def record(self, entry: dict[str, Any]) -> dict[str, Any]:
        entry["seq"] = next(self._seq)
        self.requests.append(entry)
        return entry

    # -- time ----------------------------------------------------------------------

    async def pause(self, seconds: float) -> bool:
        """Wait ``seconds`` or until shutdown; True when the server is stopping."""
        if seconds <= 0:
            await asyncio.sleep(0)
            return self.stopping.is_set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), seconds)
        return self.stopping.is_set()

    async def hang(self) -> web.Response:
        """A request that never answers in time: held ``hang_s`` (or to shutdown), then
        a 503 nobody reads (the client gave up long before)."""
        await self.pause(self.config.hang_s)
        return web.json_response({"error": "mock: hung request released"}, status=503)

    # -- jobs ----------------------------------------------------------------------

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._reap)
        return task

    def _reap(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("mock.task_failed", task=task.get_name(), error=repr(task.exception()))

    def start(self, job: MockJob, flavor: Flavor) -> None:
        self._evict()
        self.jobs[job.id] = job
        job.task = self.spawn(self._run(job, flavor), f"mock-job-{job.id}")

    def _evict(self) -> None:
        """Forget the oldest finished jobs past ``max_jobs`` (a long benchmark must not
        grow the mock without bound); polling one of them then finds nothing, as
        polling an expired job does at the real services."""
        excess = len(self.jobs) - self.config.max_jobs + 1
        if excess <= 0:
            return
        for job_id in [j.id for j in self.jobs.values() if j.done.is_set()][:excess]:
            del self.jobs[job_id]

    async def _run(self, job: MockJob, flavor: Flavor) -> None:
        d = job.directives
        latency = self.latency_s(d)
        if await self.pause(latency / 2):
            return
        job.status, job.started_at = flavor.running, time.time()
        if d.stuck:
            await self.stopping.wait()  # until cancelled or shutdown: never a result
            return
        if await self.pause(latency / 2):
            return
        flavor.finish(self, job)
        job.completed_at = time.time()
        job.done.set()
        await self.send_webhooks(job, flavor)

    def cancel(self, job: MockJob, status: str, flavor: Flavor) -> None:
        """Cancel a job that has not finished; a finished one keeps its status."""
        job.cancel_requests += 1
        if job.done.is_set():
            return
        if job.task is not None:
            job.task.cancel()
        job.status, job.completed_at = status, time.time()
        job.done.set()
        if flavor.webhook_on_cancel:
            self.spawn(self.send_webhooks(job, flavor), f"mock-webhook-{job.id}")

    async def send_webhooks(self, job: MockJob, flavor: Flavor) -> None:
        d = job.directives
        if not job.webhook_url:
            return
        if d.nowebhook:
            job.webhook = "suppressed"
            log.info("mock.webhook_suppressed", job_id=job.id)
            return
        job.webhook = "pending"
        if d.latewebhook and await self.pause(d.latewebhook):
            return
        ok = await self._deliver(job, flavor)
        if d.dupwebhook:
            ok = await self._deliver(job, flavor) and ok
        job.webhook = "sent" if ok else "failed"

    async def _deliver(self, job: MockJob, flavor: Flavor) -> bool:
        """One webhook, retried like the real services do on a non-2xx or no answer."""
        assert self.session is not None and job.webhook_url is not None
        body = orjson.dumps(flavor.body(job))
        for attempt in range(1, self.config.webhook_retries + 2):
            headers = {"Content-Type": "application/json"}
            headers.update(flavor.webhook_headers(self, job, body))
            entry: dict[str, Any] = {"at": time.time(), "attempt": attempt}
            try:
                async with self.session.post(
                    job.webhook_url,
                    data=body,
                    headers=headers,
                    timeout=aiohttp.ClientTimeout(total=self.config.webhook_timeout_s),
                ) as resp:
                    await resp.read()
                    entry["status"] = resp.status
            except (aiohttp.ClientError, OSError) as exc:
                # OSError covers TimeoutError too.
                entry["error"] = f"{type(exc).__name__}: {exc}"[:200]
            job.deliveries.append(entry)
            if 200 <= entry.get("status", 0) < 300:
                log.info("mock.webhook_sent", job_id=job.id, attempt=attempt)
                return True
            log.warning(
                "mock.webhook_failed",
                job_id=job.id,
                attempt=attempt,
                status=entry.get("status"),
                error=entry.get("error"),
            )
            if attempt <= self.config.webhook_retries and await self.pause(
                self.config.webhook_retry_delay_s
            ):
                return False
        return False

    # -- lifecycle -----------------------------------------------------------------

    async def reset(self) -> None:
        await self._cancel_tasks()
        self.jobs.clear()
        self.requests.clear()
        self.rng.seed(self.config.seed)

    async def _cancel_tasks(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def close(self) -> None:
        self.stopping.set()
        await self._cancel_tasks()


def check_key(config: MockConfig, given: str | None) -> bool:
    """A credential is present (and equals the configured one, when there is one)."""
    if not given:
        return False
    if config.api_key is None:
        return True
    return hmac.compare_digest(given.encode(), config.api_key.encode())


def bearer_token(request: web.Request) -> str | None:
    value = request.headers.get("Authorization", "")
    scheme, _, token = value.partition(" ")
    if scheme.lower() in ("bearer", "token") and token.strip():
        return token.strip()
    return value.strip() or None  # RunPod also takes the bare key


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
