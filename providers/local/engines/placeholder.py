"""Placeholder engine for development and tests. This is NOT AI image generation.

It draws a deterministic abstract picture (gradient, circles, rectangles and
the start of the prompt) derived from a hash of prompt, negative prompt and
seed, so the whole pipeline can run without a GPU or a model. Same inputs give
byte-identical PNGs for a given Pillow/zlib build.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
import struct
import threading
import zlib
from typing import Final

from PIL import Image, ImageDraw, ImageFont

__all__ = ["MAX_SIDE", "render_placeholder"]

# Big enough for any real generation size, small enough that a bad request
# cannot make a dev box allocate gigabytes.
MAX_SIDE: Final = 8192

_CAPTION_CHARS: Final = 40

_PNG_SIGNATURE: Final = b"\x89PNG\r\n\x1a\n"

Colour = tuple[int, int, int]


def _digest(prompt: str, negative_prompt: str | None, seed: int) -> bytes:
    # JSON framing instead of "a:b:c" so a ':' inside a prompt cannot make two
    # different inputs hash the same.
    payload = json.dumps([seed, prompt, negative_prompt], ensure_ascii=False)
    return hashlib.blake2b(payload.encode("utf-8"), digest_size=32).digest()


def _palette(digest: bytes) -> list[Colour]:
    """Four colours read straight from the hash bytes."""
    return [(digest[i], digest[i + 1], digest[i + 2]) for i in range(0, 12, 3)]


def _background(
    width: int, height: int, start: Colour, end: Colour, rng: random.Random
) -> Image.Image:
    """Two-colour linear gradient built in C, no per-pixel Python."""
    # linear_gradient is a 256x256 ramp; stretching it is far cheaper than
    # drawing one line per row at large sizes.
    mask = Image.linear_gradient("L")
    mask = mask.transpose(
        rng.choice(
            [
                Image.Transpose.ROTATE_90,
                Image.Transpose.ROTATE_180,
                Image.Transpose.ROTATE_270,
                Image.Transpose.FLIP_LEFT_RIGHT,
            ]
        )
    )
    mask = mask.resize((width, height), Image.Resampling.BILINEAR)
    return Image.composite(
        Image.new("RGB", (width, height), end), Image.new("RGB", (width, height), start), mask
    )


def _shapes(
    draw: ImageDraw.ImageDraw, width: int, height: int, palette: list[Colour], rng: random.Random
) -> None:
    """A handful of translucent circles and rectangles."""
    short = min(width, height)
    for _ in range(rng.randint(4, 8)):
        r, g, b = rng.choice(palette)
        fill = (r, g, b, rng.randint(90, 200))
        cx, cy = rng.randrange(width), rng.randrange(height)
        half = max(1, int(short * rng.uniform(0.05, 0.25)))
        box = (cx - half, cy - half, cx + half, cy + half)
        if rng.random() < 0.5:
            draw.ellipse(box, fill=fill)
        else:
            draw.rectangle(box, fill=fill)


@functools.lru_cache(maxsize=64)
def _font(size: int, thread_id: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    # Loading the bundled font costs more than drawing the whole picture, and sizes are
    # few. One font per thread: a FreeType face is not safe to share between threads.
    return ImageFont.load_default(size=size)


def _caption(draw: ImageDraw.ImageDraw, width: int, height: int, prompt: str) -> None:
    """Write the start of the prompt in the bottom-left corner."""
    text = " ".join(prompt.split())[:_CAPTION_CHARS]
    if not text:
        return
    size = max(8, min(width, height) // 24)
    font = _font(size, threading.get_ident())
    if not isinstance(font, ImageFont.FreeTypeFont):
        # The bitmap fallback font (Pillow without FreeType) is Latin-1 only.
        text = text.encode("latin-1", "replace").decode("latin-1")
    margin = max(2, size // 2)
    # No anchor= here: the bitmap fallback font does not support anchors. One layout
    # pass (a third of the caption's cost): the box at the origin is this one shifted.
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    x, y = margin, height - margin - bottom
    # Glyphs missing from the bundled font (CJK, emoji) render as boxes rather
    # than failing, which is fine for a placeholder.
    left, top, right, bottom = left + x, top + y, right + x, bottom + y
    pad = max(1, size // 4)
    draw.rectangle((left - pad, top - pad, right + pad, bottom + pad), fill=(0, 0, 0, 140))
    draw.text((x, y), text, font=font, fill=(255, 255, 255, 255))


def _png_chunk(tag: bytes, body: bytes) -> bytes:
    crc = zlib.crc32(body, zlib.crc32(tag))
    return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", crc)


def _encode_png(image: Image.Image) -> bytes:
    """An 8-bit RGB PNG with every row unfiltered, deflated at level 1.

    Pillow's encoder tries four filters on every row; on these smooth pictures that
    costs more than it saves (256 px: 1.7 ms against 1.0 ms here, the file ~7 %
    larger), and the worker pays it on every job."""
    width, height = image.size
    stride = width * 3
    raw = image.tobytes()
    # Each row starts with its filter type: 0, none.
    rows = b"\x00" + b"\x00".join([raw[i : i + stride] for i in range(0, len(raw), stride)])
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit, truecolour
    return b"".join(
        (
            _PNG_SIGNATURE,
            _png_chunk(b"IHDR", header),
            _png_chunk(b"IDAT", zlib.compress(rows, 1)),
            _png_chunk(b"IEND", b""),
        )
    )


def render_placeholder(
    prompt: str,
    negative_prompt: str | None,
    width: int,
    height: int,
    seed: int,
) -> bytes:
    """Draw a deterministic non-AI picture of ``width`` x ``height``; return PNG bytes."""
    if not (1 <= width <= MAX_SIDE and 1 <= height <= MAX_SIDE):
        raise ValueError(f"width and height must be within 1..{MAX_SIDE}")
    digest = _digest(prompt, negative_prompt, seed)
    rng = random.Random(int.from_bytes(digest[12:20], "big"))
    palette = _palette(digest)
    image = _background(width, height, palette[0], palette[1], rng)
    # An RGBA draw context on an RGB image alpha-blends each shape directly,
    # avoiding a full-size overlay + alpha_composite pass.
    draw = ImageDraw.Draw(image, "RGBA")
    _shapes(draw, width, height, palette[2:] + palette[:1], rng)
    _caption(draw, width, height, prompt)
    # Level 1, no filters: placeholder PNGs are throwaway; speed beats size.
    return _encode_png(image)


@functools.cache
def tiny_png() -> bytes:
    """The ``instant`` engine's image, the same for every job: an 8x8 grey PNG (a few
    dozen bytes), so a load test measures the pipeline rather than a renderer."""
    return _encode_png(Image.new("RGB", (8, 8), (128, 128, 128)))
