"""The ``diffusers`` engine: a real text-to-image pipeline loaded from a local directory.

The directory is what ``DiffusionPipeline.save_pretrained`` writes (``model_index.json``
plus one folder per component); it is opened with ``local_files_only=True``, so a worker
never reaches a model hub. torch and diffusers come with the ``gpu`` extra and are
imported only when this engine is built, so the core install does without them.

``generate`` is synchronous and blocking: the worker (and the RunPod handler) run it in
a thread. One pipeline serves one image at a time; see ``DiffusersEngine``.
"""

from __future__ import annotations

import importlib
import inspect
import io
import threading
from pathlib import Path
from types import ModuleType
from typing import Any, Final

from core.events import LocalJob
from core.logging import get_logger
from providers.local.engines import ProgressFn

__all__ = ["DEFAULT_STEPS", "DiffusersEngine", "EngineUnavailable"]

log = get_logger(__name__)

DEFAULT_STEPS: Final = 30

# Progress goes out as one stream message per report; a 5% step keeps a long run to
# about twenty of them, whatever its number of denoising steps.
_PROGRESS_STEP: Final = 0.05


class EngineUnavailable(RuntimeError):
    """The engine cannot start here: the ``gpu`` extra is missing or the model
    directory is not a diffusers pipeline."""


def _import(name: str) -> ModuleType:
    # importlib rather than ``import torch``: the core install and its type check do not
    # depend on the multi-GB optional extra being present.
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise EngineUnavailable(
            f"the diffusers engine needs {name!r} from the gpu extra: "
            "pip install -e '.[gpu]' (make does this)"
        ) from exc


def resolve_device(torch: Any, device: str) -> str:
    """``auto`` is the first CUDA GPU when torch sees one, else the CPU."""
    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


class DiffusersEngine:
    """A diffusers text-to-image pipeline (Stable Diffusion, SDXL, ...) on one device.

    Built once per process and loaded eagerly, so a worker whose model cannot load
    fails at start rather than on every job. fp16 on CUDA (half the memory, the
    precision these models ship for), fp32 elsewhere (CPU fp16 is slow or missing).
    A lock serialises calls: a pipeline's scheduler keeps per-run state, and one
    device runs one image at a time anyway, so ``worker_concurrency`` > 1 only queues.
    """

    name = "diffusers"

    def __init__(
        self,
        model_dir: Path,
        *,
        device: str = "auto",
        steps: int = DEFAULT_STEPS,
        guidance_scale: float | None = None,
    ) -> None:
        if steps < 1:
            raise ValueError("steps must be at least 1")
        if not (model_dir / "model_index.json").is_file():
            raise EngineUnavailable(
                f"{model_dir} is not a diffusers pipeline directory (no model_index.json)"
            )
        self._torch = _import("torch")
        diffusers = _import("diffusers")
        self.device = resolve_device(self._torch, device)
        self.steps = steps
        self.guidance_scale = guidance_scale
        dtype = self._torch.float16 if self.device.startswith("cuda") else self._torch.float32
        pipe = diffusers.AutoPipelineForText2Image.from_pretrained(
            model_dir, dtype=dtype, local_files_only=True
        )
        pipe = pipe.to(self.device)
        pipe.set_progress_bar_config(disable=True)
        self._pipe = pipe
        self._reports_steps = "callback_on_step_end" in inspect.signature(pipe.__call__).parameters
        self._lock = threading.Lock()
        log.info(
            "engine.loaded",
            engine=self.name,
            pipeline=type(pipe).__name__,
            model_dir=str(model_dir),
            device=self.device,
            dtype=str(dtype),
        )

    def generate(self, job: LocalJob, progress: ProgressFn) -> bytes:
        """Run the pipeline for ``job``; return PNG bytes of ``job.width`` x ``job.height``."""
        # The seed goes through a CPU generator: the same seed then gives the same
        # starting noise on a CPU test box and on any GPU.
        generator = self._torch.Generator("cpu").manual_seed(job.seed)
        kwargs: dict[str, Any] = {
            "prompt": job.prompt,
            "negative_prompt": job.negative_prompt or None,
            "width": job.width,
            "height": job.height,
            "num_inference_steps": self.steps,
            "generator": generator,
            "output_type": "pil",
        }
        if self.guidance_scale is not None:
            kwargs["guidance_scale"] = self.guidance_scale
        if self._reports_steps:
            kwargs["callback_on_step_end"] = _StepReporter(progress, self.steps)
        with self._lock:
            image = self._pipe(**kwargs).images[0]
        out = io.BytesIO()
        image.save(out, "PNG")
        return out.getvalue()


class _StepReporter:
    """diffusers' ``callback_on_step_end``: turns steps into fractions for ``progress``."""

    def __init__(self, progress: ProgressFn, steps: int) -> None:
        self.progress = progress
        self.steps = steps
        self.last = 0.0
        self.warned = False

    def __call__(
        self, pipe: Any, step: int, timestep: Any, callback_kwargs: dict[str, Any]
    ) -> dict[str, Any]:
        # Some schedulers (Heun, DPM2) run more timesteps than requested steps; the
        # pipeline's own count keeps the fraction within 0..1.
        total = getattr(pipe, "num_timesteps", None) or self.steps
        fraction = min(1.0, (step + 1) / total)
        if fraction > self.last and (fraction - self.last >= _PROGRESS_STEP or fraction == 1.0):
            self.last = fraction
            try:
                self.progress(fraction)
            except Exception:
                # A lost progress report must not cost the image.
                if not self.warned:
                    self.warned = True
                    log.warning("engine.progress_failed", exc_info=True)
        return callback_kwargs
