"""CPU-bound image helpers: thumbnails and format sniffing.

Every function here is synchronous and blocking; async callers must run them
via ``asyncio.to_thread`` so decoding never stalls the event loop.
"""

from __future__ import annotations

import io
import threading
import warnings
from typing import Final

from PIL import Image, ImageOps

__all__ = [
    "MAX_SOURCE_PIXELS",
    "ImageRejected",
    "make_thumbnail",
    "sniff_image",
]

# A 2048x2048 generation is 4.2 MP, so 40 MP leaves ~10x headroom for any
# legitimate output; an image a provider returns that is bigger than this is
# treated as hostile (decompression bomb) and never decoded.
MAX_SOURCE_PIXELS: Final = 40_000_000

# Only the formats we produce or accept from providers are parsed; this keeps
# Pillow's long tail of rarely-fuzzed plugins away from untrusted bytes.
_ALLOWED_FORMATS: Final = ("PNG", "JPEG", "WEBP")

# warnings.catch_warnings() swaps the process-global filter list and is not
# thread-safe; since callers run us in to_thread workers, overlapping
# enter/exit pairs could leave our filter installed for good. Image.open only
# parses the header, so serialising it costs next to nothing.
_OPEN_LOCK: Final = threading.Lock()

_PNG_MAGIC: Final = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC: Final = b"\xff\xd8\xff"


class ImageRejected(ValueError):
    """Raised when image bytes are refused; ``code`` is a stable machine tag."""

    def __init__(self, code: str, detail: str = "") -> None:
        super().__init__(f"{code}: {detail}" if detail else code)
        self.code = code


def sniff_image(data: bytes) -> tuple[str, str]:
    """Return ``(ext, content_type)`` for PNG/JPEG/WebP bytes by magic number."""
    if data.startswith(_PNG_MAGIC):
        return "png", "image/png"
    if data.startswith(_JPEG_MAGIC):
        return "jpg", "image/jpeg"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp", "image/webp"
    raise ImageRejected("image_unsupported", "not a PNG, JPEG or WebP image")


def _open_checked(data: bytes) -> Image.Image:
    """Parse only the header and refuse oversized images before any decoding."""
    try:
        with _OPEN_LOCK, warnings.catch_warnings():
            # Pillow's own bomb guard only *warns* between 1x and 2x its limit;
            # turn that into an exception locally instead of changing the
            # process-global Image.MAX_IMAGE_PIXELS that other code relies on.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=_ALLOWED_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageRejected("image_too_large", str(exc)) from exc
    except Exception as exc:
        # Pillow signals bad input with assorted exception types (OSError,
        # SyntaxError, struct.error, ...); any of them means "unreadable".
        raise ImageRejected("image_unreadable", str(exc)) from exc
    width, height = im.size
    if width * height > MAX_SOURCE_PIXELS:
        im.close()
        raise ImageRejected(
            "image_too_large", f"{width}x{height} exceeds {MAX_SOURCE_PIXELS} pixels"
        )
    return im


def _target_mode(im: Image.Image) -> str:
    """RGBA when the source carries any transparency, else RGB (WebP's modes)."""
    return "RGBA" if im.has_transparency_data else "RGB"


def make_thumbnail(data: bytes, max_side: int = 128, quality: int = 80) -> bytes:
    """Return a WebP thumbnail whose longest side is at most ``max_side``.

    Raises ``ImageRejected`` (``image_too_large`` / ``image_unreadable``).
    """
    if max_side < 1:
        raise ValueError("max_side must be >= 1")
    im = _open_checked(data)
    try:
        if im.format == "JPEG":
            # libjpeg can decode at 1/2..1/8 scale (DCT scaling): it averages whole
            # 8x8 blocks, a proper downscale, so we ask for the final size itself
            # (draft picks the smallest scale at least that big). Measured on a
            # 1024 px JPEG: 1.6 ms against 2.2 ms when asking for 2x, as Pillow's
            # thumbnail() does. Keep the aspect ratio so a wide image still
            # scales by its long side.
            width, height = im.size
            scale = max_side / max(width, height)
            if scale < 1:
                im.draft("RGB", (max(1, int(width * scale)), max(1, int(height * scale))))
        im.load()
        # Pillow resizes "P" and "1" images with nearest-neighbour; converting
        # first makes the filter blend real colours instead of palette indices.
        mode = _target_mode(im)
        work = im if im.mode == mode else im.convert(mode)
        # The box is square, so resizing before the EXIF rotation gives the
        # same dimensions while rotating a 128 px image instead of the source.
        # BICUBIC: after the draft it looks the same as LANCZOS at 128 px
        # and measured ~10% faster end to end.
        work.thumbnail((max_side, max_side), Image.Resampling.BICUBIC, reducing_gap=2.0)
        ImageOps.exif_transpose(work, in_place=True)
        out = io.BytesIO()
        # No exif/icc passed on purpose: thumbnails must not leak metadata.
        # method 2 of 0..6: at 128 px it encodes ~1.5x faster than the default 4
        # for ~10% more bytes (about 1.1 KB against 1.0 KB).
        work.save(out, "WEBP", quality=quality, method=2)
    except ImageRejected:
        raise
    except Exception as exc:
        # Truncated or corrupt pixel data surfaces here, at decode time.
        raise ImageRejected("image_unreadable", str(exc)) from exc
    finally:
        im.close()
    return out.getvalue()
