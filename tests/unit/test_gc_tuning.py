"""Service processes tune the garbage collector before they serve (core.cli._serve)."""

from __future__ import annotations

import json
import subprocess
import sys

from core.cli import GC_THRESHOLDS


def test_a_service_process_freezes_its_startup_objects_and_raises_the_thresholds() -> None:
    code = (
        "import gc, json; from core.cli import tune_gc; tune_gc(); "
        "print(json.dumps([gc.get_threshold(), gc.get_freeze_count()]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    thresholds, frozen = json.loads(out)
    assert tuple(thresholds) == GC_THRESHOLDS
    assert frozen > 10_000  # the modules' objects, imported before serving
