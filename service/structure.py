"""Structural pre-checks: refuse an image whose decoding cost lies in its structure, before any pixel
is decoded, and estimate what decoding the rest will cost.

The byte, pixel and format limits do not catch files like these (issue 21): a progressive JPEG that
repeats one scan tens of thousands of times (every scan is another pass over every block), a JPEG
with ~100k APP1 segments (Pillow reads each in Python), a JPEG whose restart markers are missing or
out of order, a large RLE-compressed BMP (Pillow decodes RLE in pure Python, a pixel at a time), a PNG
with tens of thousands of chunks, an animated WebP with thousands of frames. Each walk below reads
only headers and segment lengths (plus a C-speed search for markers in JPEG scan data), stops as
soon as a limit is crossed, and so costs microseconds whatever the file holds.

`check_structure` raises `ImageRejected` (422 `image_too_complex` naming the DEDE_* setting, or 400
`corrupt_image` for restart markers that do not match the restart interval, or a PNG with more than
the one ICC profile its format allows) or returns a `Structure`: the cost of decoding per pixel, in
"passes" (a progressive JPEG's scan count, more for formats Pillow decodes in Python), the cost of
the metadata Pillow reads besides the pixels, and the size the header declares. The service decodes
an image in its own process only when pixels x passes + metadata cost is small
(`DEDE_INPROCESS_DECODE_MAX_COST`), in a worker process it can kill otherwise (service/decode_workers.py).

Metadata costs in proportion to its bytes, whatever the pixel count: Pillow walks EXIF, MPF and
Photoshop directories in Python, an entry at a time (a 1x1 JPEG with a 64 KiB EXIF directory took
~40 ms to open and ~20 ms more to orient), and inflates every compressed PNG chunk (iCCP, zTXt,
iTXt) up to 1 MiB each, when the file is opened (a 1x1 PNG of 4 MB holding 4,000 iCCP chunks took
5 s, on the event loop, as a thumbnail). So the walk charges metadata to the cost, and reports the
size it read from the header (JPEG's frame, PNG's IHDR): the service then never opens such a file
with Pillow on its event loop, and decodes it off the loop, in a worker past the in-process cost.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from service.rejection import ImageRejected

# Pillow decodes RLE BMPs in pure Python, about 50x slower per pixel than its C decoders.
RLE_PASSES = 64
# Segments a WebP may hold besides its frames (VP8X, ICCP, ANIM, EXIF, XMP, unknown ones).
WEBP_OTHER_CHUNKS = 64
# Cost per byte of metadata that Pillow parses in Python (EXIF, MPF, Photoshop resources): as an RLE
# pixel. Other metadata costs a pass per byte (copied, or inflated at C speed).
METADATA_PASSES = RLE_PASSES
# Pillow inflates a compressed PNG chunk up to this many bytes (PngImagePlugin.MAX_TEXT_CHUNK), and
# deflate expands at most ~1032 times.
PNG_MAX_INFLATED = 1 << 20
DEFLATE_MAX_RATIO = 1032
_PNG_COMPRESSED = {b"iCCP", b"zTXt", b"iTXt"}
# JPEG APPn segments whose payload Pillow parses in Python, by their leading identifier.
_JPEG_PARSED_APP = ((0xE1, b"Exif"), (0xE2, b"MPF\0"), (0xED, b"Photoshop"))

_JPEG_RST = range(0xD0, 0xD8)
# The end of a scan's entropy-coded data: 0xFF followed by a marker other than a stuffed zero, a
# restart marker or a fill byte.
_JPEG_SCAN_END = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_JPEG_RST_MARKER = re.compile(rb"\xff([\xd0-\xd7])")
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_JPEG_STANDALONE = {0x01, *_JPEG_RST}


@dataclass(frozen=True)
class StructureLimits:
    """Each is a DEDE_* setting (service/settings.py); the defaults here are the settings' defaults."""

    jpeg_max_scans: int = 64
    jpeg_max_segments: int = 256
    jpeg_max_metadata_bytes: int = 4 * 1024 * 1024
    bmp_max_rle_pixels: int = 1024 * 1024
    png_max_chunks: int = 4096
    webp_max_frames: int = 1024


def _too_complex(message: str, setting: str) -> ImageRejected:
    return ImageRejected(422, "image_too_complex", f"{message} (limit: {setting})")


@dataclass(frozen=True)
class Structure:
    """What the walk found: decoding costs width x height x `passes` + `metadata_cost`."""

    passes: int = 1  # passes over the pixels (>= 1)
    metadata_cost: int = 0  # in pixel-passes
    size: tuple[int, int] | None = None  # (width, height) as Pillow reads it, when the walk read it

    def cost(self, width: int, height: int) -> int:
        return width * height * self.passes + self.metadata_cost


def check_structure(data: bytes, image_format: str, limits: StructureLimits) -> Structure:
    """The passes over the pixels and the metadata cost of decoding `data`; raises `ImageRejected`
    when its structure breaks a limit. Data it cannot walk is left for Pillow to refuse (truncated,
    corrupt)."""
    if image_format == "JPEG":
        return _check_jpeg(data, limits)
    if image_format == "BMP":
        return Structure(_check_bmp(data, limits))
    if image_format == "PNG":
        return _check_png(data, limits)
    if image_format == "WEBP":
        return _check_webp(data, limits)
    return Structure()


@dataclass
class _Frame:
    width: int
    height: int
    components: dict[int, tuple[int, int]]  # component id -> (horizontal, vertical) sampling


def _check_jpeg(data: bytes, limits: StructureLimits) -> Structure:
    pos, size = 2, len(data)
    scans = segments = metadata_bytes = metadata_cost = restart_interval = 0
    frame: _Frame | None = None
    declared: tuple[int, int] | None = None  # the frame Pillow reads: the last one before the first scan
    while pos + 4 <= size:
        if data[pos] != 0xFF:
            # Not a marker. libjpeg and Pillow skip such junk to the next marker and read on, so
            # the walk does too: stopping here would let junk hide the scans that follow.
            junk_end = _JPEG_SCAN_END.search(data, pos)
            if junk_end is None:
                break
            pos = junk_end.start()
            continue
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker == 0xD9:  # EOI
            break
        if marker in _JPEG_STANDALONE:
            pos += 2
            continue
        (length,) = struct.unpack_from(">H", data, pos + 2)
        body_start, body_end = pos + 4, pos + 2 + length
        if length < 2 or body_end > size:
            break  # truncated: Pillow refuses it
        if marker == 0xDA:  # SOS, then the scan's entropy-coded data up to the next marker
            if scans == 0 and frame is not None:
                declared = (frame.width, frame.height)
            scans += 1
            if scans > limits.jpeg_max_scans:
                raise _too_complex(
                    f"the JPEG has more than {limits.jpeg_max_scans} scans", "DEDE_JPEG_MAX_SCANS"
                )
            end = _JPEG_SCAN_END.search(data, body_end)
            scan_end = end.start() if end else size
            if restart_interval and frame is not None:
                _check_restarts(data, body_start, body_end, scan_end, frame, restart_interval)
            pos = scan_end
            continue
        segments += 1
        if segments > limits.jpeg_max_segments:
            raise _too_complex(
                f"the JPEG has more than {limits.jpeg_max_segments} segments besides its scans",
                "DEDE_JPEG_MAX_SEGMENTS",
            )
        if 0xE0 <= marker <= 0xEF or marker == 0xFE:  # APPn, COM
            metadata_bytes += length - 2
            if metadata_bytes > limits.jpeg_max_metadata_bytes:
                raise _too_complex(
                    f"the JPEG's APPn and COM segments hold more than {limits.jpeg_max_metadata_bytes} bytes",
                    "DEDE_JPEG_MAX_METADATA_BYTES",
                )
            parsed = any(marker == m and data.startswith(tag, body_start) for m, tag in _JPEG_PARSED_APP)
            metadata_cost += (length - 2) * (METADATA_PASSES if parsed else 1)
        elif marker == 0xDD and length >= 4:  # DRI
            (restart_interval,) = struct.unpack_from(">H", data, body_start)
        elif marker in _JPEG_SOF:
            frame = _parse_frame(data, body_start, body_end)
        pos = body_end
    return Structure(max(1, scans), metadata_cost, declared)


def _parse_frame(data: bytes, start: int, end: int) -> _Frame | None:
    if end - start < 6:
        return None
    height, width, count = struct.unpack_from(">HHB", data, start + 1)
    components = {}
    for index in range(count):
        offset = start + 6 + 3 * index
        if offset + 3 > end:
            return None
        sampling = data[offset + 1]
        components[data[offset]] = (max(1, sampling >> 4), max(1, sampling & 0x0F))
    return _Frame(width, height, components) if components else None


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _check_restarts(
    data: bytes, header_start: int, header_end: int, scan_end: int, frame: _Frame, interval: int
) -> None:
    """A scan under a restart interval holds exactly ceil(MCUs / interval) - 1 restart markers, RST0
    to RST7 in turn. libjpeg resynchronises on a missing or misplaced one by searching forwards, a
    cost the file's author controls; a conforming encoder never writes such a scan."""
    count = data[header_start] if header_start < header_end else 0
    ids = [data[header_start + 1 + 2 * i] for i in range(count) if header_start + 2 + 2 * i < header_end]
    h_max = max(h for h, _ in frame.components.values())
    v_max = max(v for _, v in frame.components.values())
    if len(ids) == 1 and ids[0] in frame.components:
        # A non-interleaved scan: one block per MCU, over the component's own (subsampled) size.
        h, v = frame.components[ids[0]]
        mcus = _ceil_div(_ceil_div(frame.width * h, h_max), 8) * _ceil_div(
            _ceil_div(frame.height * v, v_max), 8
        )
    else:
        mcus = _ceil_div(frame.width, 8 * h_max) * _ceil_div(frame.height, 8 * v_max)
    expected = max(0, _ceil_div(mcus, interval) - 1) if frame.height else None
    found = 0
    for match in _JPEG_RST_MARKER.finditer(data, header_end, scan_end):
        if match.group(1)[0] - 0xD0 != found % 8:
            raise ImageRejected(
                400,
                "corrupt_image",
                f"the JPEG's restart markers are out of order (RST{match.group(1)[0] - 0xD0} where "
                f"RST{found % 8} belongs)",
            )
        found += 1
        if expected is not None and found > expected:
            break
    if expected is not None and found != expected:
        raise ImageRejected(
            400,
            "corrupt_image",
            f"the JPEG declares a restart interval of {interval} MCUs, so a scan of {mcus} MCUs holds "
            f"{expected} restart markers; this one holds {'more' if found > expected else found}",
        )


def _check_bmp(data: bytes, limits: StructureLimits) -> int:
    if len(data) < 34:
        return 1
    (header_size,) = struct.unpack_from("<I", data, 14)
    if header_size < 40:
        return 1  # OS/2 core header: no compression field
    width, height, _, _, compression = struct.unpack_from("<iiHHI", data, 18)
    if compression not in (1, 2):  # BI_RLE8, BI_RLE4
        return 1
    pixels = abs(width) * abs(height)
    if pixels > limits.bmp_max_rle_pixels:
        raise _too_complex(
            f"the BMP is RLE-compressed and {abs(width)}x{abs(height)} = {pixels} pixels; RLE BMPs "
            f"are accepted up to {limits.bmp_max_rle_pixels} pixels",
            "DEDE_BMP_MAX_RLE_PIXELS",
        )
    return RLE_PASSES


def _check_png(data: bytes, limits: StructureLimits) -> Structure:
    pos, size, chunks, passes, metadata_cost, profiles = 8, len(data), 0, 1, 0, 0
    declared: tuple[int, int] | None = None
    seen_data = False
    while pos + 8 <= size:
        (length,) = struct.unpack_from(">I", data, pos)
        kind = data[pos + 4 : pos + 8]
        chunks += 1
        if chunks > limits.png_max_chunks:
            raise _too_complex(f"the PNG has more than {limits.png_max_chunks} chunks", "DEDE_PNG_MAX_CHUNKS")
        if kind == b"IHDR" and length >= 13 and pos + 21 <= size:
            if data[pos + 20] == 1:
                passes = 2  # Adam7 interlacing: seven passes over a buffer of the whole image
            if not seen_data:  # Pillow reads the chunks up to the first IDAT; the last IHDR wins
                declared = struct.unpack_from(">II", data, pos + 8)
        elif kind == b"IDAT":
            seen_data = True
        elif kind in _PNG_COMPRESSED:
            if kind == b"iCCP":
                profiles += 1
                if profiles > 1:
                    raise ImageRejected(
                        400,
                        "corrupt_image",
                        "the PNG holds more than one iCCP chunk; the format allows one ICC profile",
                    )
            metadata_cost += min(PNG_MAX_INFLATED, DEFLATE_MAX_RATIO * length)
        elif kind == b"eXIf":
            metadata_cost += METADATA_PASSES * length
        else:
            metadata_cost += length if kind == b"tEXt" else 0
        if kind == b"IEND":
            break
        pos += 12 + length
    return Structure(passes, metadata_cost, declared)


def _check_webp(data: bytes, limits: StructureLimits) -> Structure:
    pos, size, frames, others, metadata_cost = 12, len(data), 0, 0, 0
    while pos + 8 <= size:
        kind = data[pos : pos + 4]
        (length,) = struct.unpack_from("<I", data, pos + 4)
        if kind == b"ANMF":
            frames += 1
            if frames > limits.webp_max_frames:
                raise _too_complex(
                    f"the WebP has more than {limits.webp_max_frames} frames", "DEDE_WEBP_MAX_FRAMES"
                )
        else:
            others += 1
            if others > WEBP_OTHER_CHUNKS:
                raise _too_complex(
                    f"the WebP has more than {WEBP_OTHER_CHUNKS} chunks besides its frames",
                    "DEDE_WEBP_MAX_FRAMES",
                )
            if kind == b"EXIF":
                metadata_cost += METADATA_PASSES * length
            elif kind in (b"ICCP", b"XMP "):
                metadata_cost += length
        pos += 8 + length + (length & 1)
    return Structure(1, metadata_cost)
