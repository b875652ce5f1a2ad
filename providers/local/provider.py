"""Local provider: submitting is one XADD to the GPU workers' stream."""

from __future__ import annotations

from core.events import LocalJob
from core.streams import Publisher
from providers.base import Job, Submission


class LocalProvider:
    name = "local"

    def __init__(self, publisher: Publisher) -> None:
        self.publisher = publisher

    async def submit(self, job: Job, *, webhook_url: str | None = None) -> Submission:
        message = LocalJob(
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
        # The stream entry id is not worth a second UPDATE: the job is found by
        # generation id and attempt, which the message carries.
        await self.publisher.send(self.publisher.keys.jobs_local, message)
        return Submission()

    async def cancel(self, job: Job) -> None:
        # A worker checks nothing mid-job; a late result for a cancelled generation
        # is refused by the lifecycle CAS and its object deleted by the status consumer.
        return None
