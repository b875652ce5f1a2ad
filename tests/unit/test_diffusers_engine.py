"""The ``diffusers`` engine on CPU, with a tiny randomly initialised Stable Diffusion
pipeline built from config and saved to a temporary directory: nothing is downloaded.

torch and diffusers come from the ``gpu`` extra, which ``make test`` installs. They are
imported plainly, not with ``importorskip``: without them this module fails to collect,
so a broken install fails the suite instead of hiding behind a skip.
"""

from __future__ import annotations

import base64
import io
import sys
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from core.events import LocalJob
from core.settings import Settings
from providers.local.engines import load_engine
from providers.local.engines.diffusers import DiffusersEngine, EngineUnavailable
from providers.runpod_handler import run_job

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STEPS = 2
# Latent side 8 is the UNet's sample_size; the VAE has two blocks, so one downsampling
# (x2) stands between pixels and latents. 64 px is 32 latents: divisible by the UNet's
# own downsampling, and tiny.
SIDE = 64


def _tokenizer() -> CLIPTokenizer:
    """A CLIP BPE tokenizer over lowercase letters: every word spells out letter by
    letter (no merges), which is all a random text encoder needs to see prompts differ."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens = ["<|startoftext|>", "<|endoftext|>", *letters, *(f"{c}</w>" for c in letters)]
    return CLIPTokenizer(
        vocab={token: i for i, token in enumerate(tokens)}, merges=[], model_max_length=16
    )


def _build_pipeline(directory: Path) -> None:
    tokenizer = _tokenizer()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=32,
        sample_size=SIDE,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            max_position_embeddings=16,
            projection_dim=32,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    # Stable Diffusion 1.x's own scheduler. PNDM keeps per-run state (its history of
    # model outputs), which is what the engine's lock protects.
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(directory)  # type: ignore[attr-defined]  # mixin mypy does not see


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    # One thread: the CI box has two cores that other suites share, and an oversubscribed
    # OpenMP pool is several times slower than a single thread on these tiny tensors.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    directory = tmp_path_factory.mktemp("tiny-sd")
    _build_pipeline(directory)
    yield directory
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> DiffusersEngine:
    return DiffusersEngine(model_dir, device="cpu", steps=STEPS)


def _job(
    seed: int = 7,
    prompt: str = "a red fox",
    negative_prompt: str | None = "blurry",
    width: int = SIDE,
    height: int = SIDE,
) -> LocalJob:
    return LocalJob(
        generation_id=uuid.uuid4(),
        attempt=1,
        user_id=uuid.uuid4(),
        prompt=prompt,
        negative_prompt=negative_prompt,
        width=width,
        height=height,
        seed=seed,
    )


def _ignore(fraction: float) -> None:
    pass


def _png(data: bytes) -> Image.Image:
    assert data.startswith(PNG_MAGIC)
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    image.load()
    return image


def test_generates_a_png_of_the_requested_size(engine: DiffusersEngine) -> None:
    image = _png(engine.generate(_job(), _ignore))
    assert image.size == (SIDE, SIDE)
    assert image.mode == "RGB"
    colours = image.getcolors(maxcolors=SIDE * SIDE)
    assert colours is not None
    assert len(colours) > 10  # a real decoded image, not a flat fill


def test_width_and_height_are_not_swapped(engine: DiffusersEngine) -> None:
    image = _png(engine.generate(_job(width=SIDE, height=SIDE // 2), _ignore))
    assert image.size == (SIDE, SIDE // 2)


def test_same_seed_gives_the_same_bytes_and_another_seed_does_not(
    engine: DiffusersEngine,
) -> None:
    first = engine.generate(_job(seed=7), _ignore)
    assert engine.generate(_job(seed=7), _ignore) == first
    assert engine.generate(_job(seed=8), _ignore) != first


@pytest.mark.parametrize(
    "change",
    [{"prompt": "a blue owl"}, {"negative_prompt": "dark"}, {"negative_prompt": None}],
    ids=["prompt", "negative_prompt", "no_negative_prompt"],
)
def test_prompts_condition_the_image(engine: DiffusersEngine, change: dict[str, Any]) -> None:
    assert engine.generate(_job(**change), _ignore) != engine.generate(_job(), _ignore)


def test_progress_is_reported_per_step_up_to_one(engine: DiffusersEngine) -> None:
    seen: list[float] = []
    engine.generate(_job(), seen.append)
    # PLMS (PNDM with skip_prk_steps) runs one warm-up timestep more than the steps
    # asked for: 2 steps are 3 UNet calls, and the fraction counts what really runs.
    assert seen == pytest.approx([1 / 3, 2 / 3, 1.0])


def test_a_failing_progress_report_does_not_cost_the_image(engine: DiffusersEngine) -> None:
    def broken(fraction: float) -> None:
        raise RuntimeError("event loop closed")

    assert engine.generate(_job(), broken) == engine.generate(_job(), _ignore)


def test_concurrent_jobs_match_serial_ones(engine: DiffusersEngine) -> None:
    # The worker runs up to worker_concurrency jobs in threads on one engine; the
    # scheduler's per-run state must not be shared between them.
    seeds = [1, 2, 3, 4]
    serial = [engine.generate(_job(seed=s), _ignore) for s in seeds]
    start = threading.Barrier(len(seeds))

    def run(seed: int) -> bytes:
        start.wait(timeout=10)
        return engine.generate(_job(seed=seed), _ignore)

    with ThreadPoolExecutor(len(seeds)) as pool:
        assert list(pool.map(run, seeds)) == serial


def test_load_engine_builds_it_from_settings(model_dir: Path, tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path, worker_model_dir=model_dir, worker_device="cpu", worker_steps=3
    )
    engine = load_engine("diffusers", settings)
    assert isinstance(engine, DiffusersEngine)
    assert (engine.name, engine.device, engine.steps) == ("diffusers", "cpu", 3)
    seen: list[float] = []
    assert _png(engine.generate(_job(), seen.append)).size == (SIDE, SIDE)
    assert seen == sorted(seen)
    assert seen[-1] == 1.0
    assert len(seen) == 3 + 1  # steps + PLMS warm-up


def test_no_model_dir_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(EngineUnavailable, match="GENGUI_WORKER_MODEL_DIR"):
        load_engine("diffusers", Settings(data_dir=tmp_path))
    with pytest.raises(EngineUnavailable, match=r"model_index\.json"):
        DiffusersEngine(tmp_path, device="cpu")


def test_missing_gpu_extra_is_a_clear_error(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # None in sys.modules makes ``import diffusers`` raise ImportError, as on a core install.
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(EngineUnavailable, match=r"gpu extra"):
        DiffusersEngine(model_dir, device="cpu")


def test_the_runpod_handler_runs_this_engine(engine: DiffusersEngine) -> None:
    event = {
        "id": "job-1",
        "input": {
            "prompt": "a red fox",
            "negative_prompt": "blurry",
            "width": SIDE,
            "height": SIDE,
            "seed": 7,
            "generation_id": str(uuid.uuid4()),
            "attempt": 1,
        },
    }
    out = run_job(engine, event)
    assert out["content_type"] == "image/png"
    assert base64.b64decode(out["image_base64"]) == engine.generate(_job(seed=7), _ignore)
