"""RunPod serverless entry point: a local-worker engine, run inside a RunPod container.

RunPod calls ``handler(job)`` with ``{"id": ..., "input": {...}}``, ``input`` being what
our RunPod adapter (``providers/runpod.py``) submits: prompt, negative_prompt, width,
height, seed, generation_id, attempt. The answer is the adapter's output contract::

    {"image_base64": "<base64 PNG>", "content_type": "image/png"}   the image
    {"error": "invalid_input: <why>"}                               a refused job

The RunPod SDK turns a returned ``error`` into a FAILED job carrying that string; an
exception from the engine (out of GPU memory, a bad model) is raised on, and the SDK
reports it as a FAILED job whose ``error`` is a JSON dump with ``error_type``. The
``invalid_input:`` prefix lets a caller tell a job that can never succeed from one
worth retrying.

The engine comes from the ``GENGUI_WORKER_*`` settings (``GENGUI_WORKER_ENGINE``,
``GENGUI_WORKER_MODEL_DIR``, ``GENGUI_WORKER_DEVICE``, ...) and is loaded once per
container, before the first job. In the container image::

    python -m providers.runpod_handler            # needs the gpu extra (runpod, diffusers)
    python -m providers.runpod_handler --test_input '{"input": {...}}'   # one local run
"""

from __future__ import annotations

import base64
import functools
import importlib
import os
from typing import Any, Final
from uuid import UUID

import structlog
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from core.events import LocalJob
from core.generations import MAX_SEED
from core.imaging import sniff_image
from core.logging import configure_logging, get_logger
from core.settings import Settings
from providers.local.engines import Engine, load_engine

__all__ = ["REFUSED", "HandlerInput", "handler", "main", "run_job"]

# Named, not __name__: run with -m, this module is __main__.
log = get_logger("providers.runpod_handler")

# Prefix of every refusal: the job's input is wrong, so running it again cannot help.
REFUSED: Final = "invalid_input: "

# The API accepts 256..2048 in steps of 64; the handler takes a little more (small
# test images) but stays within what one GPU can render, in the multiples of 8 that
# latent-diffusion models need.
_MIN_SIDE: Final = 64
_MAX_SIDE: Final = 2048
_MAX_PROMPT: Final = 4000

# RunPod jobs carry no owner, and engines never read it.
_NO_USER: Final = UUID(int=0)


class HandlerInput(BaseModel):
    """A RunPod job's ``input``. Unknown fields are ignored: the adapter may add some
    before every deployed handler knows them."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    prompt: str = Field(min_length=1, max_length=_MAX_PROMPT)
    negative_prompt: str | None = Field(default=None, max_length=_MAX_PROMPT)
    width: int = Field(ge=_MIN_SIDE, le=_MAX_SIDE, multiple_of=8)
    height: int = Field(ge=_MIN_SIDE, le=_MAX_SIDE, multiple_of=8)
    seed: int = Field(ge=0, le=MAX_SEED)
    generation_id: UUID
    attempt: int = Field(ge=1)

    def to_job(self) -> LocalJob:
        return LocalJob(
            generation_id=self.generation_id,
            attempt=self.attempt,
            user_id=_NO_USER,
            prompt=self.prompt,
            negative_prompt=self.negative_prompt,
            width=self.width,
            height=self.height,
            seed=self.seed,
        )


def _refusal(exc: ValidationError) -> str:
    reasons = (
        f"{'.'.join(str(part) for part in error['loc']) or 'input'}: {error['msg']}"
        for error in exc.errors(include_url=False, include_input=False)
    )
    return REFUSED + "; ".join(reasons)


def _no_progress(fraction: float) -> None:
    # Our RunPod adapter reads no progress; the job's status is enough.
    pass


def run_job(engine: Engine, event: Any) -> dict[str, Any]:
    """One RunPod job on ``engine``: the output dict, or ``{"error"}`` for bad input.
    Engine failures raise, so RunPod records them (with a traceback) as worth a retry."""
    raw = event.get("input") if isinstance(event, dict) else None
    if not isinstance(raw, dict):
        return {"error": REFUSED + "the job has no input object"}
    try:
        job = HandlerInput.model_validate(raw).to_job()
    except ValidationError as exc:
        log.warning("runpod.job_refused", job_id=event.get("id"), errors=exc.error_count())
        return {"error": _refusal(exc)}
    with structlog.contextvars.bound_contextvars(
        job_id=event.get("id"), generation_id=str(job.generation_id), attempt=job.attempt
    ):
        data = engine.generate(job, _no_progress)
        _, content_type = sniff_image(data)
        log.info("runpod.job_done", engine=engine.name, bytes=len(data))
    return {"image_base64": base64.b64encode(data).decode("ascii"), "content_type": content_type}


@functools.cache
def _engine() -> Engine:
    # Once per container: loading a model takes seconds to minutes. A failed load is
    # not cached, so the next job tries again (and main() fails the container first).
    settings = Settings()
    return load_engine(settings.worker_engine, settings)


def handler(event: Any) -> dict[str, Any]:
    """The function RunPod calls for each job."""
    return run_job(_engine(), event)


def main() -> None:
    """Load the engine, then serve RunPod jobs until the container stops."""
    settings = Settings()
    configure_logging(settings.log_format, settings.log_level)
    # The SDK logs every handler output at DEBUG, its default: a base64 image per job.
    os.environ.setdefault("RUNPOD_LOG_LEVEL", "INFO")
    try:
        serverless = importlib.import_module("runpod.serverless")
    except ImportError as exc:
        raise SystemExit(
            "the RunPod handler needs the runpod package from the gpu extra: "
            "pip install -e '.[gpu]'"
        ) from exc
    # Before start(): a container that cannot load its model fails at once, visibly,
    # rather than failing every job it is given.
    engine = _engine()
    log.info("runpod.handler_ready", engine=engine.name)
    serverless.start({"handler": handler})


if __name__ == "__main__":
    main()
