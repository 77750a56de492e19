"""Safe decoding: every accepted format decodes exactly as `prepare_image` would; every refusal has
the right status and code, and size limits bite before the pixels are decoded."""

from __future__ import annotations

import io
import struct
import time
import zlib

import numpy as np
import pytest
from conftest import encode, random_images
from PIL import Image

from models.bundle import InputSpec, prepare_image
from service.decoding import DecodeLimits, ImageRejected, decode_image, decode_images, sniff_format

SPEC = InputSpec(height=32, width=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
LIMITS = DecodeLimits(max_image_pixels=1_000_000)


def reference(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return prepare_image(img, SPEC)


def rejection(data: bytes, limits: DecodeLimits = LIMITS) -> ImageRejected:
    with pytest.raises(ImageRejected) as caught:
        decode_image(data, SPEC, limits)
    return caught.value


@pytest.mark.parametrize(
    ("fmt", "options", "lossless"),
    [
        ("PNG", {}, True),
        ("BMP", {}, True),
        ("WEBP", {"lossless": True}, True),
        ("JPEG", {"quality": 90}, False),
    ],
)
def test_each_allowed_format_decodes_like_the_shared_preprocessing(
    fmt: str, options: dict, lossless: bool
) -> None:
    pixels = random_images(1, seed=3)[0]
    data = encode(pixels, fmt, **options)
    decoded = decode_image(data, SPEC, LIMITS)
    assert decoded.dtype == np.uint8 and decoded.shape == (3, 32, 32)
    np.testing.assert_array_equal(decoded, reference(data))
    if lossless:
        np.testing.assert_array_equal(decoded, pixels.transpose(2, 0, 1))


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "CMYK"])
def test_any_mode_and_size_becomes_rgb_at_the_input_size(mode: str) -> None:
    image = Image.fromarray(random_images(1, seed=4, size=(48, 40))[0]).convert(
        mode if mode != "I;16" else "L"
    )
    if mode == "I;16":
        image = Image.fromarray((np.asarray(image, dtype=np.uint16) * 257).astype(np.uint16))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG" if mode == "CMYK" else "PNG")
    data = buffer.getvalue()
    decoded = decode_image(data, SPEC, LIMITS)
    assert decoded.shape == (3, 32, 32)
    np.testing.assert_array_equal(decoded, reference(data))


def test_exif_orientation_is_applied() -> None:
    pixels = np.zeros((16, 32, 3), np.uint8)
    pixels[:, :16] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    data = encode(pixels, "PNG", exif=exif)
    spec = SPEC.model_copy(update={"height": 32, "width": 16})
    decoded = decode_image(data, spec, LIMITS)
    assert decoded.shape == (3, 32, 16)
    assert decoded[:, :16].mean() == 255 and decoded[:, 16:].mean() == 0  # white is now on top


def test_format_is_decided_from_the_bytes() -> None:
    png = encode(random_images(1, seed=5)[0], "PNG")
    assert sniff_format(png) == "PNG"
    gif = encode(random_images(1, seed=5)[0], "GIF")
    refused = rejection(gif)
    assert (refused.status, refused.code) == (415, "unsupported_format") and "GIF" in refused.message
    tiff = encode(random_images(1, seed=5)[0], "TIFF")
    assert rejection(tiff).status == 415
    assert rejection(b"<html>not an image</html>").code == "unsupported_format"


def test_empty_input_is_a_400() -> None:
    assert (rejection(b"").status, rejection(b"").code) == (400, "empty_image")


def test_bytes_that_start_like_an_allowed_format_but_are_garbage_are_a_400() -> None:
    for data in (b"BM" + bytes(100), b"\x89PNG\r\n\x1a\n" + b"garbage" * 10, b"\xff\xd8\xff" + bytes(50)):
        refused = rejection(data)
        assert refused.status == 400, data[:8]
        assert refused.code in {"corrupt_image", "truncated_image"}


def test_truncated_files_are_refused_not_padded() -> None:
    for fmt in ("PNG", "JPEG"):
        data = encode(random_images(1, seed=6, size=(64, 64))[0], fmt)
        refused = rejection(data[: len(data) * 2 // 3])
        assert refused.status == 400, fmt
        assert refused.code in {"truncated_image", "corrupt_image"}


def png_header_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims a huge size, followed by a little data: decoding it would be a bomb."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    ihdr_chunk = struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    idat = zlib.compress(bytes(1000))
    idat_chunk = struct.pack(">I", len(idat)) + b"IDAT" + idat + struct.pack(">I", zlib.crc32(b"IDAT" + idat))
    return b"\x89PNG\r\n\x1a\n" + ihdr_chunk + idat_chunk


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_pixel_limit_is_checked_from_the_header_before_decoding() -> None:
    started = time.perf_counter()
    refused = rejection(png_header_claiming(12_000, 12_000))
    assert time.perf_counter() - started < 0.5  # 144 MP were never decoded
    assert (refused.status, refused.code) == (413, "image_too_large")
    assert "12000x12000" in refused.message
    small_limit = DecodeLimits(max_image_pixels=32 * 32 - 1)
    assert rejection(encode(random_images(1, seed=7)[0]), small_limit).status == 413


def test_pillows_decompression_bomb_guard_becomes_a_413(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow refuses > 2x this outright
    refused = rejection(encode(random_images(1, seed=8)[0]), DecodeLimits(max_image_pixels=10**9))
    assert (refused.status, refused.code) == (413, "image_too_large")


def test_decode_images_returns_failures_in_place() -> None:
    good = encode(random_images(1, seed=9)[0])
    results = decode_images([good, b"nonsense", good], SPEC, LIMITS)
    assert isinstance(results[0], np.ndarray) and isinstance(results[2], np.ndarray)
    assert isinstance(results[1], ImageRejected) and results[1].status == 415


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_header_pixels_reads_sizes_without_decoding_and_ignores_refused_data() -> None:
    from service.decoding import header_pixels

    small = encode(random_images(1, seed=10, size=(20, 30))[0])
    assert header_pixels([small, small]) == 2 * 600
    assert header_pixels([small, b"nonsense", b"\x89PNG\r\n\x1a\n broken"]) == 600
    assert header_pixels([png_header_claiming(12_000, 12_000)]) == 144_000_000  # so it goes to a thread
