"""Engines a local worker can run. Each turns a job into image bytes, synchronously
(the worker runs it in a thread)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from core.events import LocalJob

ProgressFn = Callable[[float], None]


class Engine(Protocol):
    name: str

    def generate(self, job: LocalJob, progress: ProgressFn) -> bytes: ...


class PlaceholderEngine:
    """Not AI: draws a deterministic picture from prompt and seed (see placeholder.py)."""

    name = "placeholder"

    def generate(self, job: LocalJob, progress: ProgressFn) -> bytes:
        from providers.local.engines.placeholder import render_placeholder

        return render_placeholder(job.prompt, job.negative_prompt, job.width, job.height, job.seed)


def load_engine(name: str) -> Engine:
    if name == "placeholder":
        return PlaceholderEngine()
    raise ValueError(f"unknown engine {name!r}")
