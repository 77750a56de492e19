"""Untrusted image bytes -> the detector's uint8 [3, H, W] input, or a clear per-image rejection.

The safety layer runs before the shared `prepare_image` (models/bundle.py), in this order:
  1. empty input refused;
  2. the format is decided from the leading bytes, never from a declared type or file name,
     and only JPEG, PNG, WebP and BMP pass (415 otherwise);
  3. Pillow is told to try that format alone, so a file cannot be routed to another decoder;
  4. the file's structure is walked (service/structure.py): JPEG scans, segments and restart
     markers, RLE BMPs, PNG chunks and ICC profiles, WebP frames, each under a DEDE_* limit (422,
     or 400); the walk also prices the decode, metadata included (`decode_cost`);
  5. the pixel count is read from the header and checked BEFORE the pixels are decoded (413);
     Pillow's own decompression-bomb guard, should it fire, is also a 413; so is a side longer than
     `MAX_SIDE`, and an image whose
     resize on the way to the model's input would pass through more pixels than the limit (a long
     thin strip under the centre-crop rule grows to its long side times the input size);
  6. truncated or corrupt data is refused (400), never padded out with grey;
  7. `prepare_image` (EXIF orientation, any mode to RGB, resize rule) exactly as training did it.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, UnidentifiedImageError

from models.bundle import InputSpec, prepare_image
from service.rejection import ImageRejected
from service.structure import StructureLimits, check_structure

__all__ = [
    "DecodeLimits",
    "ImageRejected",
    "decode_cost",
    "decode_image",
    "decode_images",
    "header_pixels",
    "sniff_format",
]

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP")
# Longest side accepted (JPEG's own limit). Pillow's resize holds coefficients in proportion to the
# side it shrinks: a 25-megapixel strip one pixel high needs 400 MB for them and seconds of work.
MAX_SIDE = 65_535

# Formats we recognise only to name them in the refusal.
_REFUSED_SIGNATURES = {
    b"GIF87a": "GIF",
    b"GIF89a": "GIF",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
    b"%PDF": "PDF",
    b"\x00\x00\x01\x00": "ICO",
}


@dataclass(frozen=True)
class DecodeLimits:
    max_image_pixels: int
    structure: StructureLimits = field(default_factory=StructureLimits)


def sniff_format(data: bytes) -> str | None:
    """The allowed format these bytes start with, or None."""
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data.startswith(b"BM"):
        return "BMP"
    return None


def _refused_format_message(data: bytes) -> str:
    allowed = "JPEG, PNG, WebP or BMP"
    for signature, name in _REFUSED_SIGNATURES.items():
        if data.startswith(signature):
            return f"{name} images are not accepted; send {allowed}"
    return f"not a recognised image (format decided from the bytes); send {allowed}"


def resize_pixels(width: int, height: int, spec: InputSpec) -> int:
    """Most pixels `prepare_image` holds at once while resizing a width x height image (either way
    round: EXIF may turn it). Only the centre-crop rule grows an image before cutting it down."""
    if spec.resize != "shorter_side_center_crop":
        return spec.width * spec.height
    largest = 0
    for w, h in ((max(1, width), max(1, height)), (max(1, height), max(1, width))):
        scale = max(spec.width / w, spec.height / h)
        largest = max(largest, max(spec.width, round(w * scale)) * max(spec.height, round(h * scale)))
    return largest


def decode_image(
    data: bytes, spec: InputSpec, limits: DecodeLimits, structure_checked: bool = False
) -> np.ndarray:
    """Bytes of one uploaded image -> uint8 [3, H, W]; raises `ImageRejected` with the reason.
    `structure_checked`: `decode_cost` has already walked these bytes (the service's decode step)."""
    if not data:
        raise ImageRejected(400, "empty_image", "the image is empty (0 bytes)")
    image_format = sniff_format(data)
    if image_format is None:
        raise ImageRejected(415, "unsupported_format", _refused_format_message(data))
    if not structure_checked:
        check_structure(data, image_format, limits.structure)
    try:
        with Image.open(io.BytesIO(data), formats=[image_format]) as image:
            width, height = image.size  # from the header: nothing decoded yet
            if width * height > limits.max_image_pixels:
                raise ImageRejected(
                    413,
                    "image_too_large",
                    f"image is {width}x{height} = {width * height} pixels; the limit is "
                    f"{limits.max_image_pixels}",
                )
            if max(width, height) > MAX_SIDE:
                raise ImageRejected(
                    413,
                    "image_too_large",
                    f"image is {width}x{height}: a side longer than {MAX_SIDE} pixels is not accepted",
                )
            resized = resize_pixels(width, height, spec)
            if resized > limits.max_image_pixels:
                raise ImageRejected(
                    413,
                    "image_too_large",
                    f"image is {width}x{height}: resizing it to the model's {spec.width}x{spec.height} "
                    f"input (centre crop) passes through {resized} pixels; the limit is "
                    f"{limits.max_image_pixels}",
                )
            image.load()
            return prepare_image(image, spec)
    except ImageRejected:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageRejected(413, "image_too_large", f"refused as a decompression bomb: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise ImageRejected(
            400, "corrupt_image", f"starts like {image_format} but its header cannot be read"
        ) from exc
    except OSError as exc:
        # Pillow reports truncation as OSError("image file is truncated ...").
        code = "truncated_image" if "truncated" in str(exc) else "corrupt_image"
        raise ImageRejected(400, code, f"{image_format} data cannot be decoded: {exc}") from exc
    except (ValueError, SyntaxError, EOFError, IndexError, TypeError, struct.error) as exc:
        # Malformed headers surface from Pillow's plugins as any of these.
        raise ImageRejected(400, "corrupt_image", f"{image_format} data cannot be decoded: {exc}") from exc


def header_pixels(images: list[bytes], stop_above: int | None = None) -> int:
    """Total width x height the images' headers declare, reading no pixel data; stops counting
    once past `stop_above`. Refused or unreadable images count as 0: `decode_image` rejects them
    before decoding anything."""
    total = 0
    for data in images:
        if stop_above is not None and total > stop_above:
            break
        image_format = sniff_format(data)
        if image_format is None:
            continue
        try:
            with Image.open(io.BytesIO(data), formats=[image_format]) as image:
                total += image.width * image.height
        except Exception:  # noqa: BLE001 - any header Pillow cannot read is decode_image's to reject
            continue
    return total


def decode_images(
    images: list[bytes], spec: InputSpec, limits: DecodeLimits, structure_checked: bool = False
) -> list[np.ndarray | ImageRejected]:
    """Decode every image of one request; a failure is returned in its place, never raised."""
    results: list[np.ndarray | ImageRejected] = []
    for data in images:
        try:
            results.append(decode_image(data, spec, limits, structure_checked))
        except ImageRejected as rejection:
            results.append(rejection)
    return results


def decode_cost(data: bytes, limits: DecodeLimits) -> int:
    """What decoding `data` will cost, in pixels x passes plus its metadata (service/structure.py),
    read from its structure and header alone; raises `ImageRejected` for a structure over a limit.
    Data that is refused for another reason, or unreadable, costs its metadata: `decode_image`
    refuses it at once. The size comes from the walk where it read one (JPEG, PNG): opening the file
    with Pillow already parses its metadata, which is the decode's to do, off the event loop."""
    image_format = sniff_format(data)
    if image_format is None:
        return 0
    structure = check_structure(data, image_format, limits.structure)
    if structure.size is not None:
        return structure.cost(*structure.size)
    try:
        with Image.open(io.BytesIO(data), formats=[image_format]) as image:
            return structure.cost(image.width, image.height)
    except Exception:  # noqa: BLE001 - any header Pillow cannot read is decode_image's to reject
        return structure.metadata_cost
