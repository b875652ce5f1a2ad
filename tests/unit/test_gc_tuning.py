"""Service processes tune the garbage collector before they serve (core.cli._serve)."""

from __future__ import annotations

import subprocess
import sys

from core.cli import GC_THRESHOLDS


def test_a_service_process_freezes_its_startup_objects_and_raises_the_thresholds() -> None:
    code = (
        "import gc; from core.cli import _tune_gc; _tune_gc(); "
        "print(gc.get_threshold(), gc.get_freeze_count() > 10_000)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout.split(")")
    assert out[0] + ")" == str(GC_THRESHOLDS)
    assert out[1].strip() == "True"
