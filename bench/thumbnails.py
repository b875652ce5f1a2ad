"""Thumbnails: ``core.imaging.make_thumbnail`` against plain Pillow, side by side.

    .venv/bin/python bench/thumbnails.py [--rounds 200] [--size 1024]

Both turn the same JPEG (the placeholder engine's picture saved at quality 90) into a
128 px WebP on one core (the process is pinned to CPU 0). Rounds alternate the order
of the two so drift in the machine's speed hits both alike; the ratio of medians is
the figure to quote.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from PIL import Image

# This tree's gengui first, not the venv's editable install (an older commit's worktree
# measures its own code).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.imaging import make_thumbnail
from providers.local.engines.placeholder import render_placeholder


def source_jpeg(size: int) -> bytes:
    png = render_placeholder("a lighthouse on a cliff at dusk", "blurry", size, size, 1234)
    out = io.BytesIO()
    Image.open(io.BytesIO(png)).convert("RGB").save(out, "JPEG", quality=90)
    return out.getvalue()


def plain_pillow(data: bytes) -> bytes:
    """What a first version would write: Pillow's default thumbnail() and WebP save."""
    im = Image.open(io.BytesIO(data))
    im.thumbnail((128, 128))
    out = io.BytesIO()
    im.save(out, "WEBP")
    return out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--size", type=int, default=1024)
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {0})
    data = source_jpeg(args.size)
    cases: dict[str, Callable[[bytes], bytes]] = {
        "plain Pillow": plain_pillow,
        "make_thumbnail": make_thumbnail,
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for fn in cases.values():
        for _ in range(10):
            fn(data)  # warm-up
    for i in range(args.rounds):
        order = list(cases.items()) if i % 2 else list(reversed(cases.items()))
        for name, fn in order:
            started = time.perf_counter()
            fn(data)
            times[name].append((time.perf_counter() - started) * 1000)
    print(f"{args.size}x{args.size} JPEG ({len(data)} bytes) -> 128 px WebP, {args.rounds} rounds")
    for name, fn in cases.items():
        print(
            f"  {name:15s} median {statistics.median(times[name]):6.3f} ms  "
            f"p90 {statistics.quantiles(times[name], n=10)[-1]:6.3f} ms  "
            f"output {len(fn(data))} bytes"
        )
    ratio = statistics.median(times["plain Pillow"]) / statistics.median(times["make_thumbnail"])
    print(f"  speed-up (plain / make_thumbnail, medians): {ratio:.2f}x")


if __name__ == "__main__":
    main()
