"""Every Redis stream, group, channel and key name gengui uses, in one place."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from uuid import UUID


@dataclass(frozen=True)
class Keys:
    """Names under one prefix, so test runs and deployments never collide."""

    prefix: str = "gengui"

    @property
    def requested(self) -> str:
        return f"{self.prefix}:generation:requested"

    @property
    def jobs_local(self) -> str:
        return self.jobs("local")

    def jobs(self, provider: str) -> str:
        """Jobs waiting for a queue provider's runners: GPU workers, hosted API callers."""
        return f"{self.prefix}:jobs:{provider}"

    @property
    def results(self) -> str:
        """Provider results that still need fetching (an output URL to download)."""
        return f"{self.prefix}:provider:results"

    @property
    def cancels(self) -> str:
        """Cancels to carry out at a provider (user cancel, deadline)."""
        return f"{self.prefix}:provider:cancels"

    def rate(self, provider: str) -> str:
        return f"{self.prefix}:rate:{provider}"

    @property
    def job_status(self) -> str:
        return f"{self.prefix}:job:status"

    @property
    def thumbnails(self) -> str:
        return f"{self.prefix}:thumbnails"

    @property
    def dead(self) -> str:
        return f"{self.prefix}:dead"

    def user_channel(self, user_id: UUID | str) -> str:
        return f"{self.prefix}:user:{user_id}"

    def user_events(self, user_id: UUID | str) -> str:
        """The user's replay log: a capped stream of the events sent on ``user_channel``,
        read by reconnecting clients (``Last-Event-ID``)."""
        return f"{self.prefix}:user:{user_id}:events"

    def worker_heartbeat(self, worker_id: str) -> str:
        return f"{self.prefix}:worker:{worker_id}"


# Consumer groups: one per role; replicas of a role share the group.
GROUP_DISPATCHERS = "dispatchers"
GROUP_GPU_WORKERS = "gpu-workers"
GROUP_STATUS = "status-processors"
GROUP_THUMBNAILERS = "thumbnailers"
GROUP_HOSTED = "hosted-runners"
GROUP_RESULTS = "result-fetchers"
GROUP_CANCELS = "cancellers"


def runners_group(provider: str) -> str:
    """The group a queue provider's runners read ``Keys.jobs(provider)`` with."""
    return GROUP_GPU_WORKERS if provider == "local" else GROUP_HOSTED


def consumer_groups(keys: Keys, providers: Iterable[str]) -> list[tuple[str, str]]:
    """Every (stream, group) a gengui process reads, with the job queues of
    ``providers``."""
    return [
        (keys.requested, GROUP_DISPATCHERS),
        (keys.job_status, GROUP_STATUS),
        (keys.thumbnails, GROUP_THUMBNAILERS),
        (keys.results, GROUP_RESULTS),
        (keys.cancels, GROUP_CANCELS),
        *((keys.jobs(p), runners_group(p)) for p in providers),
    ]
