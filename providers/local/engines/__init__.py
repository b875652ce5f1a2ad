"""Engines a local worker can run. Each turns a job into image bytes, synchronously
(the worker runs it in a thread)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from core.events import LocalJob

if TYPE_CHECKING:
    from core.settings import Settings

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


class InstantEngine:
    """Not AI and not even a picture of the prompt: the same tiny PNG at once, for load
    tests of the pipeline (``bench/e2e.py --engine instant``)."""

    name = "instant"

    def generate(self, job: LocalJob, progress: ProgressFn) -> bytes:
        from providers.local.engines.placeholder import tiny_png

        return tiny_png()


def load_engine(name: str, settings: Settings | None = None) -> Engine:
    """Build the engine called ``name``. ``diffusers`` reads its model directory,
    device and steps from ``settings`` and loads the model now (blocking, seconds)."""
    if name == "placeholder":
        return PlaceholderEngine()
    if name == "instant":
        return InstantEngine()
    if name == "diffusers":
        from providers.local.engines.diffusers import DiffusersEngine, EngineUnavailable

        if settings is None or settings.worker_model_dir is None:
            raise EngineUnavailable("the diffusers engine needs GENGUI_WORKER_MODEL_DIR")
        return DiffusersEngine(
            settings.worker_model_dir,
            device=settings.worker_device,
            steps=settings.worker_steps,
            guidance_scale=settings.worker_guidance_scale,
        )
    raise ValueError(f"unknown engine {name!r}")
