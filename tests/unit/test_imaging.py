"""Unit tests for core.imaging (thumbnails, bomb rejection, sniffing)."""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import pytest
from PIL import Image

from core.imaging import MAX_SOURCE_PIXELS, ImageRejected, make_thumbnail, sniff_image


def _encode(im: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **params)
    return buf.getvalue()


def _picture(size: tuple[int, int], mode: str = "RGB") -> Image.Image:
    """Non-flat content so encoders produce realistic, non-trivial streams."""
    im = Image.linear_gradient("L").resize(size).convert("RGB")
    im.paste((200, 30, 90), (0, 0, size[0] // 3, size[1] // 3))
    im = im.convert(mode)
    if mode.endswith("A"):
        # Real transparency: libwebp drops an all-opaque alpha channel.
        im.putalpha(Image.linear_gradient("L").resize(size))
    return im


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_header_only(width: int, height: int, colour_type: int = 2) -> bytes:
    """A valid PNG header whose pixel data is garbage: decoding it must fail."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", b"definitely not zlib")
        + _png_chunk(b"IEND", b"")
    )


def _open_webp(data: bytes) -> Image.Image:
    assert data[:4] == b"RIFF"
    assert data[8:12] == b"WEBP"
    im = Image.open(io.BytesIO(data))
    assert im.format == "WEBP"
    return im


def _rejection_code(data: bytes) -> str:
    with pytest.raises(ImageRejected) as info:
        make_thumbnail(data)
    return info.value.code


@pytest.mark.parametrize(
    ("size", "fmt", "expected"),
    [
        ((1024, 1024), "JPEG", (128, 128)),
        ((1000, 500), "PNG", (128, 64)),
        ((2000, 1000), "JPEG", (128, 64)),  # wide JPEG goes through draft()
    ],
)
def test_thumbnail_is_webp_and_keeps_aspect(
    size: tuple[int, int], fmt: str, expected: tuple[int, int]
) -> None:
    data = _encode(_picture(size), fmt, quality=90)
    assert _open_webp(make_thumbnail(data)).size == expected


def test_max_side_and_small_images_are_not_upscaled() -> None:
    data = _encode(_picture((400, 300)), "PNG")
    assert _open_webp(make_thumbnail(data, max_side=64)).size == (64, 48)
    small = _encode(_picture((50, 30)), "PNG")
    assert _open_webp(make_thumbnail(small)).size == (50, 30)


def test_exif_orientation_is_applied_and_metadata_stripped() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    data = _encode(_picture((200, 100)), "JPEG", exif=exif)
    im = _open_webp(make_thumbnail(data))
    assert im.size == (64, 128)
    assert not im.info.get("exif")


def test_rgba_png_keeps_alpha() -> None:
    src = Image.new("RGBA", (300, 300), (10, 20, 30, 0))
    src.paste((255, 0, 0, 255), (0, 0, 150, 150))
    im = _open_webp(make_thumbnail(_encode(src, "PNG")))
    assert im.mode == "RGBA"
    # Both fully transparent and fully opaque pixels survive.
    assert im.getchannel("A").getextrema() == (0, 255)


@pytest.mark.parametrize(
    ("mode", "fmt", "params", "expected"),
    [
        ("P", "PNG", {"transparency": 0}, "RGBA"),
        ("P", "PNG", {}, "RGB"),
        ("LA", "PNG", {}, "RGBA"),
        ("L", "PNG", {}, "RGB"),
        ("1", "PNG", {}, "RGB"),
        ("I;16", "PNG", {}, "RGB"),
        ("CMYK", "JPEG", {}, "RGB"),
        ("L", "JPEG", {}, "RGB"),
    ],
)
def test_modes_are_normalised(
    mode: str, fmt: str, params: dict[str, object], expected: str
) -> None:
    data = _encode(_picture((256, 256), mode), fmt, **params)
    im = _open_webp(make_thumbnail(data))
    assert im.mode == expected
    assert im.size == (128, 128)


def test_palette_image_is_resampled_in_rgb() -> None:
    # 1 px black/white columns: resampling palette indices (nearest) would keep
    # pure black or white, a real filter averages them to mid-grey.
    src = Image.new("P", (256, 256), 0)
    src.putpalette([0, 0, 0, 255, 255, 255])
    for x in range(1, 256, 2):
        src.paste(1, (x, 0, x + 1, 256))
    grey = _open_webp(make_thumbnail(_encode(src, "PNG"))).convert("L").getpixel((64, 64))
    assert isinstance(grey, int)
    assert 96 <= grey <= 160


@pytest.mark.parametrize(
    "size",
    [
        (8001, 5000),  # just over our own limit, far below Pillow's warning threshold
        (10_000, 10_000),  # Pillow's DecompressionBombWarning range
        (20_000, 20_000),  # Pillow's DecompressionBombError range
    ],
)
def test_oversized_header_is_rejected_before_decoding(size: tuple[int, int]) -> None:
    # The pixel data is garbage, so reaching the decoder would yield
    # image_unreadable; image_too_large proves the header check came first.
    assert _rejection_code(_png_header_only(*size, colour_type=0)) == "image_too_large"


def test_crafted_header_within_limit_reaches_the_decoder() -> None:
    # Control for the test above: the same construction within the limit
    # (small, and exactly at it) passes the header check and fails decoding.
    assert MAX_SOURCE_PIXELS == 8000 * 5000
    assert _rejection_code(_png_header_only(100, 100)) == "image_unreadable"
    assert _rejection_code(_png_header_only(8000, 5000, colour_type=0)) == "image_unreadable"


def test_garbage_is_unreadable() -> None:
    assert _rejection_code(b"this is not an image at all" * 10) == "image_unreadable"
    assert _rejection_code(b"") == "image_unreadable"
    # Formats outside PNG/JPEG/WebP are never handed to a Pillow plugin.
    assert _rejection_code(_encode(_picture((64, 64)), "GIF")) == "image_unreadable"
    assert issubclass(ImageRejected, ValueError)


def test_truncated_jpeg_is_unreadable() -> None:
    data = _encode(Image.effect_noise((512, 512), 64).convert("RGB"), "JPEG", quality=90)
    _open_webp(make_thumbnail(data))  # sanity: the intact file works
    assert _rejection_code(data[: len(data) // 2]) == "image_unreadable"


def test_process_globals_are_untouched_and_no_warning_escapes() -> None:
    before_limit = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        before_filters = list(warnings.filters)
        for data in (_png_header_only(10_000, 10_000), _png_header_only(20_000, 20_000)):
            assert _rejection_code(data) == "image_too_large"
        make_thumbnail(_encode(_picture((300, 200)), "PNG"))
        assert list(warnings.filters) == before_filters
    assert before_limit == Image.MAX_IMAGE_PIXELS
    assert [w.message for w in caught] == []


def test_sniff_image() -> None:
    assert sniff_image(_encode(_picture((16, 16)), "PNG")) == ("png", "image/png")
    assert sniff_image(_encode(_picture((16, 16)), "JPEG")) == ("jpg", "image/jpeg")
    assert sniff_image(_encode(_picture((16, 16)), "WEBP")) == ("webp", "image/webp")


@pytest.mark.parametrize(
    "data",
    [b"", b"GIF89a" + b"\x00" * 20, b"RIFF\x00\x00\x00\x00WAVEfmt ", b"\x89PNG", b"garbage"],
)
def test_sniff_image_rejects_others(data: bytes) -> None:
    with pytest.raises(ImageRejected) as info:
        sniff_image(data)
    assert info.value.code == "image_unsupported"
