"""The RunPod serverless handler, with the placeholder engine.

The last tests run the handler through the real ``runpod`` SDK (the ``gpu`` extra):
once in-process through the SDK's job runner, to pin what RunPod records for our
answers, and once as ``python -m providers.runpod_handler --test_input ...``, the SDK's
own local mode, which exercises ``main()`` end to end.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from runpod.serverless.modules import rp_job

from core.events import LocalJob
from providers import runpod_handler
from providers.local.engines import PlaceholderEngine, ProgressFn
from providers.local.engines.placeholder import render_placeholder
from providers.runpod_handler import REFUSED, handler, run_job

ROOT = Path(__file__).resolve().parents[2]


def _input(**changes: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "prompt": "a lighthouse at dusk",
        "negative_prompt": "blurry",
        "width": 320,
        "height": 256,
        "seed": 42,
        "generation_id": str(uuid.uuid4()),
        "attempt": 1,
    }
    fields.update(changes)
    return fields


def _event(**changes: Any) -> dict[str, Any]:
    return {"id": "job-1", "input": _input(**changes)}


@pytest.fixture
def fresh_engine(monkeypatch: pytest.MonkeyPatch) -> Any:
    """``handler`` with its once-per-container engine cache emptied before and after."""
    monkeypatch.setenv("GENGUI_WORKER_ENGINE", "placeholder")
    runpod_handler._engine.cache_clear()
    yield runpod_handler._engine
    runpod_handler._engine.cache_clear()


def test_answers_the_adapter_contract_with_the_engine_image() -> None:
    out = run_job(PlaceholderEngine(), _event())
    assert set(out) == {"image_base64", "content_type"}
    assert out["content_type"] == "image/png"
    data = base64.b64decode(out["image_base64"], validate=True)
    # Every input reached the engine: the placeholder is a pure function of them.
    assert data == render_placeholder("a lighthouse at dusk", "blurry", 320, 256, 42)
    assert Image.open(io.BytesIO(data)).size == (320, 256)


def test_unknown_input_fields_are_ignored() -> None:
    out = run_job(PlaceholderEngine(), _event(steps=50, user="x"))
    assert out["content_type"] == "image/png"


def test_negative_prompt_may_be_missing() -> None:
    event = _event()
    del event["input"]["negative_prompt"]
    data = base64.b64decode(run_job(PlaceholderEngine(), event)["image_base64"])
    assert data == render_placeholder("a lighthouse at dusk", None, 320, 256, 42)


@pytest.mark.parametrize(
    ("event", "field"),
    [
        (_event(prompt=""), "prompt"),
        (_event(prompt="x" * 4001), "prompt"),
        (_event(width=4096), "width"),
        (_event(width=321), "width"),
        (_event(height=32), "height"),
        (_event(seed=-1), "seed"),
        (_event(seed=2**32), "seed"),
        (_event(seed="many"), "seed"),
        (_event(generation_id="not-a-uuid"), "generation_id"),
        (_event(attempt=0), "attempt"),
        ({"id": "job-1", "input": {"prompt": "a fox"}}, "width"),
    ],
    ids=[
        "empty_prompt",
        "long_prompt",
        "too_wide",
        "not_multiple_of_8",
        "too_short",
        "negative_seed",
        "seed_too_big",
        "seed_not_int",
        "bad_generation_id",
        "attempt_zero",
        "missing_fields",
    ],
)
def test_bad_input_is_refused_with_the_field_named(event: dict[str, Any], field: str) -> None:
    out = run_job(PlaceholderEngine(), event)
    assert set(out) == {"error"}
    assert out["error"].startswith(REFUSED)
    assert field in out["error"]


@pytest.mark.parametrize(
    "event", [{"id": "job-1"}, {"id": "job-1", "input": "a fox"}, None, ["input"]]
)
def test_an_event_without_an_input_object_is_refused(event: Any) -> None:
    assert run_job(PlaceholderEngine(), event) == {"error": REFUSED + "the job has no input object"}


def test_an_engine_failure_raises_rather_than_refusing() -> None:
    # Raised on, the SDK reports it as a FAILED job with a traceback: worth a retry,
    # unlike a refusal.
    class Broken:
        name = "broken"

        def generate(self, job: LocalJob, progress: ProgressFn) -> bytes:
            raise RuntimeError("CUDA out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        run_job(Broken(), _event())


def test_handler_loads_the_configured_engine_once(fresh_engine: Any) -> None:
    first = handler(_event(seed=1))
    second = handler(_event(seed=2))
    assert first["image_base64"] != second["image_base64"]
    info = fresh_engine.cache_info()
    assert (info.misses, info.hits) == (1, 1)


def test_handler_fails_the_job_when_the_engine_cannot_load(
    fresh_engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GENGUI_WORKER_ENGINE", "diffusers")
    monkeypatch.delenv("GENGUI_WORKER_MODEL_DIR", raising=False)
    with pytest.raises(RuntimeError, match="GENGUI_WORKER_MODEL_DIR"):
        handler(_event())


async def test_the_sdk_reports_an_image_as_output_and_a_refusal_as_an_error(
    fresh_engine: Any,
) -> None:
    # What the SDK posts back to RunPod for each kind of answer: ``output`` makes a
    # COMPLETED job; a top-level ``error`` makes a FAILED one carrying our string.
    done = await rp_job.run_job(handler, _event())
    assert set(done) == {"output"}
    assert done["output"]["content_type"] == "image/png"
    refused = await rp_job.run_job(handler, _event(width=7))
    assert set(refused) == {"error"}
    assert refused["error"].startswith(REFUSED)


def _run_main(job: dict[str, Any], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("GENGUI_", "RUNPOD_"))
    }
    env |= {"GENGUI_WORKER_ENGINE": "placeholder", "GENGUI_DATA_DIR": str(tmp_path)}
    return subprocess.run(
        [sys.executable, "-m", "providers.runpod_handler", "--test_input", json.dumps(job)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )


def test_main_serves_a_job_through_the_sdk(tmp_path: Path) -> None:
    ok = _run_main(_event(), tmp_path)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "completed successfully" in ok.stdout
    assert "image_base64" in ok.stdout
