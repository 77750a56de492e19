"""Image files whose decoding cost lies in their structure, not in their size or pixel count.

Each maker builds its file at run time from a small Pillow-encoded image plus hand-written segments,
scaled by its arguments: the tests use sizes that decode in moments even without a limit, the
reliability benchmark ("costly structure") the hostile sizes of issue 21, where Pillow at b31f78f
decoded for seconds to minutes. Used by tests/service/test_service_costly.py and
benchmarks/reliability/costly.py.

Classes (`COSTLY_CLASSES`):
  jpeg_many_scans       progressive JPEG whose scan list repeats one empty scan thousands of times
                        (each scan is a pass over every block);
  jpeg_cmyk_many_scans  the same in four-channel CMYK (Adobe), hundreds of scans;
  jpeg_restart_missing  a restart interval is declared but the restart markers are stripped out;
  jpeg_restart_shuffled the restart markers are present but out of order;
  jpeg_many_app         ~100k tiny APP1 (EXIF) segments before the frame;
  bmp_rle               a large RLE8 BMP made of end-of-line codes (Pillow pads each row in Python);
  png_many_chunks       tens of thousands of ancillary chunks before the image data;
  png_many_iccp         a 1x1 PNG with thousands of iCCP chunks, each inflating to 1 MiB (Pillow inflates
                        every one when it opens the file: 4,000 of them took 5 s);
  webp_many_frames      an animated WebP with thousands of frames.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

SOI, EOI, SOS, DRI = 0xD8, 0xD9, 0xDA, 0xDD


def _flat_image(width: int, height: int, mode: str = "RGB") -> Image.Image:
    """A gently varying picture: tiny once compressed, so a large frame costs few bytes."""
    ramp = (np.arange(width, dtype=np.uint16)[None, :] + np.arange(height, dtype=np.uint16)[:, None]) // 16
    rgb = np.stack([ramp % 256, (ramp * 3) % 256, (ramp * 7) % 256], axis=-1).astype(np.uint8)
    image = Image.fromarray(rgb)
    return image.convert("CMYK") if mode == "CMYK" else image


def _encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


@dataclass
class JpegSegment:
    marker: int
    payload: bytes  # without the length field
    entropy: bytes = b""  # for SOS: the entropy-coded data that follows it, restart markers included

    def to_bytes(self) -> bytes:
        if self.marker in (SOI, EOI):
            return bytes([0xFF, self.marker])
        return (
            bytes([0xFF, self.marker])
            + struct.pack(">H", len(self.payload) + 2)
            + self.payload
            + self.entropy
        )


def split_jpeg(data: bytes) -> list[JpegSegment]:
    """A well-formed JPEG -> its segments in order (SOI and EOI included)."""
    segments = [JpegSegment(SOI, b"")]
    pos = 2
    while pos < len(data):
        if data[pos] != 0xFF:
            raise ValueError(f"no marker at {pos}")
        marker = data[pos + 1]
        if marker == EOI:
            segments.append(JpegSegment(EOI, b""))
            break
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        payload = data[pos + 4 : pos + 2 + length]
        pos += 2 + length
        entropy = b""
        if marker == SOS:
            end = pos
            while True:
                end = data.index(b"\xff", end)
                following = data[end + 1]
                if following == 0 or 0xD0 <= following <= 0xD7:
                    end += 2
                    continue
                break
            entropy, pos = data[pos:end], end
        segments.append(JpegSegment(marker, payload, entropy))
    return segments


def join_jpeg(segments: list[JpegSegment]) -> bytes:
    return b"".join(segment.to_bytes() for segment in segments)


def jpeg_many_scans(width: int = 256, height: int = 256, scans: int = 200, mode: str = "RGB") -> bytes:
    """Progressive JPEG with `scans` scans in all: Pillow's own, then copies of its first (DC) scan
    header with no data (libjpeg warns and reads zeros: a full pass over the blocks each time)."""
    segments = split_jpeg(_encode(_flat_image(width, height, mode), "JPEG", progressive=True, quality=60))
    scan_headers = [s for s in segments if s.marker == SOS]
    extra = max(0, scans - len(scan_headers))
    empty = JpegSegment(SOS, scan_headers[0].payload, b"")
    return join_jpeg(segments[:-1] + [empty] * extra + segments[-1:])


def jpeg_restart_broken(width: int = 256, height: int = 256, how: str = "missing") -> bytes:
    """Baseline JPEG with a restart interval of one MCU row whose RST markers are stripped out
    (`how="missing"`) or put out of order (`how="shuffled"`)."""
    data = _encode(_flat_image(width, height), "JPEG", quality=60, restart_marker_blocks=1)
    segments = split_jpeg(data)
    for segment in segments:
        if segment.marker != SOS:
            continue
        entropy = bytearray(segment.entropy)
        if how == "missing":
            out, i = bytearray(), 0
            while i < len(entropy):
                if entropy[i] == 0xFF and i + 1 < len(entropy) and 0xD0 <= entropy[i + 1] <= 0xD7:
                    i += 2
                    continue
                out.append(entropy[i])
                i += 1
            entropy = out
        elif how == "shuffled":
            for i in range(len(entropy) - 1):
                if entropy[i] == 0xFF and 0xD0 <= entropy[i + 1] <= 0xD7:
                    entropy[i + 1] = 0xD0 + (entropy[i + 1] - 0xD0 + 3) % 8
        else:
            raise ValueError(f"unknown how {how!r}")
        segment.entropy = bytes(entropy)
    return join_jpeg(segments)


def jpeg_many_app(segments_count: int = 100_000, width: int = 64, height: int = 64) -> bytes:
    """A small baseline JPEG with `segments_count` minimal APP1 "Exif" segments after SOI."""
    segments = split_jpeg(_encode(_flat_image(width, height), "JPEG", quality=80))
    app1 = JpegSegment(0xE1, b"Exif\x00\x00")
    return join_jpeg(segments[:1] + [app1] * segments_count + segments[1:])


def bmp_rle(width: int = 1000, height: int = 1000, rle4: bool = False) -> bytes:
    """An RLE8 (or RLE4) BMP whose rows are each one pixel and an end-of-line code: 4 bytes a row on
    disk, `width` pixels of padding a row, one at a time, for Pillow's pure-Python RLE decoder."""
    bits = 4 if rle4 else 8
    colours = 1 << bits
    palette = b"".join(bytes((i, i, i, 0)) for i in range(colours))
    pixels = b"\x01\x00\x00\x00" * height + b"\x00\x01"  # a pixel, end of line; end of bitmap
    header_size = 14 + 40 + len(palette)
    info = struct.pack(
        "<IiiHHIIiiII", 40, width, height, 1, bits, 2 if rle4 else 1, len(pixels), 2835, 2835, colours, 0
    )
    file_header = b"BM" + struct.pack("<IHHI", header_size + len(pixels), 0, 0, header_size)
    return file_header + info + palette + pixels


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_many_chunks(chunks: int = 50_000, width: int = 32, height: int = 32) -> bytes:
    """A small PNG with `chunks` empty private ancillary chunks ("prVt") before its IDAT."""
    data = _encode(_flat_image(width, height), "PNG")
    ihdr_end = 8 + 8 + 13 + 4
    return data[:ihdr_end] + _png_chunk(b"prVt", b"") * chunks + data[ihdr_end:]


def png_many_iccp(chunks: int = 4_000, width: int = 1, height: int = 1) -> bytes:
    """A small PNG with `chunks` iCCP chunks, each a profile of 1 MiB of zeros (~1 KB deflated)."""
    data = _encode(_flat_image(width, height), "PNG")
    ihdr_end = 8 + 8 + 13 + 4
    profile = _png_chunk(b"iCCP", b"icc\0\0" + zlib.compress(bytes(1 << 20), 9))
    return data[:ihdr_end] + profile * chunks + data[ihdr_end:]


def png_with_text(chunks: int = 64, width: int = 1, height: int = 1) -> bytes:
    """A small PNG with `chunks` zTXt chunks, each 1 MiB of zeros (~1 KB deflated): as much as
    Pillow inflates (64 MiB in all) before it refuses more text."""
    data = _encode(_flat_image(width, height), "PNG")
    ihdr_end = 8 + 8 + 13 + 4
    text = _png_chunk(b"zTXt", b"note\0\0" + zlib.compress(bytes(1 << 20), 9))
    return data[:ihdr_end] + text * chunks + data[ihdr_end:]


def jpeg_with_exif(entries: int = 5_400, width: int = 8, height: int = 8) -> bytes:
    """A small JPEG whose APP1 EXIF directory holds `entries` entries (5,400 fill the 64 KiB segment):
    Pillow reads the directory in Python when it opens the file, and again to orient it."""
    directory = struct.pack("<H", entries) + b"".join(
        struct.pack("<HHLL", 0x9000 + i, 3, 1, 1) for i in range(entries)
    )
    exif = b"Exif\0\0" + b"II*\0\x08\0\0\0" + directory + b"\0\0\0\0"
    data = _encode(_flat_image(width, height), "JPEG")
    return data[:2] + b"\xff\xe1" + struct.pack(">H", 2 + len(exif)) + exif + data[2:]


def webp_many_frames(frames: int = 2_000, width: int = 16, height: int = 16) -> bytes:
    """An animated WebP of `frames` frames (alternating two pictures, so none is merged away)."""
    first = _flat_image(width, height)
    second = Image.fromarray(255 - np.asarray(first))
    sequence = [first if i % 2 == 0 else second for i in range(frames)]
    return _encode(sequence[0], "WEBP", save_all=True, append_images=sequence[1:], lossless=False, quality=50)


@dataclass(frozen=True)
class CostlyClass:
    name: str
    make: Callable[[], bytes]  # the hostile file, as issue 21 met it (or larger)
    make_small: Callable[[], bytes]  # same structure at a size that decodes in moments anyway


COSTLY_CLASSES = (
    CostlyClass(
        "jpeg_many_scans",
        lambda: jpeg_many_scans(2048, 2048, 50_000),
        lambda: jpeg_many_scans(128, 128, 300),
    ),
    CostlyClass(
        "jpeg_cmyk_many_scans",
        lambda: jpeg_many_scans(2048, 2048, 600, mode="CMYK"),
        lambda: jpeg_many_scans(128, 128, 300, mode="CMYK"),
    ),
    CostlyClass(
        "jpeg_restart_missing",
        lambda: jpeg_restart_broken(2048, 2048, "missing"),
        lambda: jpeg_restart_broken(128, 128, "missing"),
    ),
    CostlyClass(
        "jpeg_restart_shuffled",
        lambda: jpeg_restart_broken(2048, 2048, "shuffled"),
        lambda: jpeg_restart_broken(128, 128, "shuffled"),
    ),
    CostlyClass("jpeg_many_app", lambda: jpeg_many_app(100_000), lambda: jpeg_many_app(2_000)),
    CostlyClass("bmp_rle", lambda: bmp_rle(4000, 4000), lambda: bmp_rle(1500, 1500)),
    CostlyClass("png_many_chunks", lambda: png_many_chunks(200_000), lambda: png_many_chunks(20_000)),
    CostlyClass("png_many_iccp", lambda: png_many_iccp(4_000), lambda: png_many_iccp(16)),
    CostlyClass("webp_many_frames", lambda: webp_many_frames(5_000), lambda: webp_many_frames(2_000)),
)
