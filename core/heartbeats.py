"""Runner heartbeats: a key per runner (GPU worker, hosted runner) that names the jobs it
has in hand, so the reconciler can tell a long job on a live runner from a job whose
result was lost.

The key ``worker:{id}`` holds ``{"at": <iso time>, "jobs": ["<generation>:<attempt>", ...]}``
with a TTL of three beats; it is rewritten every ``worker_heartbeat_s`` and soon after a
job is taken (so a new job is listed long before the reconciler first looks at it; a job
already finished by then is not worth a write: most jobs of a fast engine), and deleted
on a clean stop. A job the runner finished drops out at the next beat: if its
report was lost (a Redis restart between its XADD and the status consumer's read), the
reconciler then sees a live runner that no longer holds it and starts a new attempt,
instead of waiting for the generation's deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from uuid import UUID

from core.runtime import Runtime

# A new job is published at most this long after it is taken: starts of many jobs at once
# share one write.
_EAGER_S = 0.05


def job_ref(generation_id: UUID | str, attempt: int) -> str:
    return f"{generation_id}:{attempt}"


class InHand:
    """The jobs one runner is working on now."""

    def __init__(self) -> None:
        self.jobs: set[str] = set()
        self.changed = asyncio.Event()

    @contextlib.contextmanager
    def holding(self, generation_id: UUID, attempt: int) -> Iterator[None]:
        ref = job_ref(generation_id, attempt)
        self.jobs.add(ref)
        self.changed.set()  # published at once: see beat()
        try:
            yield
        finally:
            self.jobs.discard(ref)  # published at the next regular beat

    def value(self) -> str:
        return json.dumps({"at": datetime.now(UTC).isoformat(), "jobs": sorted(self.jobs)})


async def beat(rt: Runtime, runner_id: str, in_hand: InHand, stop: asyncio.Event) -> None:
    """Keep the runner's key alive, naming its jobs, until ``stop``; delete it then."""
    key = rt.settings.keys.worker_heartbeat(runner_id)
    interval = rt.settings.worker_heartbeat_s
    ttl = max(1, int(interval * 3))
    stopping = asyncio.ensure_future(stop.wait())
    published: set[str] = set()
    tried_at = -math.inf  # the last write, whether it went through or not
    try:
        while not stop.is_set():
            in_hand.changed.clear()
            # Every interval, whatever happened (the TTL runs out otherwise, even while
            # jobs come and go all the time); sooner only for a new job still in hand.
            if time.monotonic() - tried_at >= interval or not in_hand.jobs <= published:
                tried_at = time.monotonic()
                with contextlib.suppress(Exception):  # Redis away: the next beat tries again
                    jobs = set(in_hand.jobs)
                    await rt.redis.set(key, in_hand.value(), ex=ttl)
                    published = jobs
            wait_s = max(0.0, tried_at + interval - time.monotonic())
            changed = asyncio.ensure_future(in_hand.changed.wait())
            await asyncio.wait({stopping, changed}, timeout=wait_s, return_when="FIRST_COMPLETED")
            changed.cancel()
            if in_hand.changed.is_set():
                await asyncio.sleep(_EAGER_S)  # let the other jobs of this batch start too
    finally:
        stopping.cancel()
    with contextlib.suppress(Exception):
        await rt.redis.delete(key)


def jobs_held(value: bytes | str | None) -> frozenset[str] | None:
    """The jobs (``job_ref``) a runner whose key holds ``value`` is working on: empty for
    no key, None for a key in the older format (a bare timestamp), which says only that
    its runner lives: it holds everything. Parse a key once for all the rows it runs
    (the reconciler looks at many rows of few runners)."""
    if value is None:
        return frozenset()
    try:
        data = json.loads(value)
    except ValueError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("jobs"), list):
        return None
    return frozenset(str(job) for job in data["jobs"])


def covers(held: frozenset[str] | None, generation_id: UUID | str, attempt: int) -> bool:
    """Whether ``held`` (from ``jobs_held``) includes this job."""
    return held is None or job_ref(generation_id, attempt) in held


def holds(value: bytes | str | None, generation_id: UUID | str, attempt: int) -> bool:
    """Whether a runner whose key holds ``value`` is working on this job."""
    return covers(jobs_held(value), generation_id, attempt)
