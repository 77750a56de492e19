"""Malformed and hostile uploads for POST /detect, made at test time by the project's own code.

    image_cases(seed, limits)    one uploaded image each: its bytes, its filename, and the statuses a
                                 request holding only that image may get (200: decoded and scored)
    request_cases(seed, limits)  whole requests: every image case alone, beside a good image (200 with
                                 a per-image error) and as a raw body; plus hostile requests: bodies,
                                 images and image counts exactly at and one over each limit, thousands
                                 of parts, missing fields, wrong content types, very long filenames and
                                 header values

    fuzz_inputs()                a hypothesis strategy for the decoder: any bytes, a signature then any
                                 bytes, or a small valid file with a few edits

Every case names its kind and the set of statuses it may get; no set holds a 5xx. `seed` varies the
random parts (cut points, random bytes, flipped bytes, picture content), so many seeds try many
different uploads of the same kinds. Used by tests/service/test_service_malformed.py and by the
reliability benchmark (benchmarks/reliability/run.py).
"""

from __future__ import annotations

import functools
import io
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from hypothesis import strategies as st
from PIL import Image

DECODED = frozenset({200})
EMPTY = frozenset({400})
CORRUPT = frozenset({400})
TOO_LARGE = frozenset({413})
REFUSED_FORMAT = frozenset({415})
# Bytes changed at random can land anywhere: in the signature (415), in a size field (413), in
# pixel data (still decodes) or in structure (400). Never a 5xx.
ANY_IMAGE_OUTCOME = frozenset({200, 400, 413, 415})

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_SIGNATURE_LENGTH = {"PNG": 8, "JPEG": 3, "WEBP": 12, "BMP": 2}
_EXTENSION = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp", "BMP": "bmp"}


@dataclass(frozen=True)
class Limits:
    """The server's limits that the size cases are built around (DEDE_MAX_UPLOAD_BYTES, ...)."""

    max_upload_bytes: int = 16 * 1024 * 1024
    max_image_pixels: int = 25_000_000
    max_images_per_request: int = 64


@dataclass(frozen=True)
class ImageCase:
    kind: str
    data: bytes
    statuses: frozenset[int]
    filename: str = "upload.png"
    note: str = ""  # which variant (cut point, flipped offset, ...), for failure messages


@dataclass(frozen=True)
class RequestCase:
    kind: str
    body: bytes
    headers: tuple[tuple[str, str], ...]
    statuses: frozenset[int]
    chunked: bool = False  # sent without Content-Length, in 64 KiB chunks
    note: str = ""
    per_image_error: int | None = None  # a 200 answer must carry an error for the image at this index


# -- pictures and encoders --------------------------------------------------------------------------


def picture(rng: np.random.Generator, height: int = 40, width: int = 48) -> np.ndarray:
    """uint8 [H, W, 3]: blocky colour fields plus noise, so that encoders produce realistic streams."""
    cells = rng.integers(0, 256, size=(4, 4, 3)).astype(np.float64)
    blocks = np.kron(cells, np.ones((-(-height // 4), -(-width // 4), 1)))[:height, :width]
    return np.clip(blocks + rng.normal(0, 12, blocks.shape), 0, 255).astype(np.uint8)


def encode(image: Image.Image | np.ndarray, fmt: str, **options: object) -> bytes:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def good_image(seed: int = 0) -> bytes:
    """A small valid PNG, the well-behaved neighbour of a bad image in a multi-image request."""
    return encode(picture(np.random.default_rng(seed), 32, 32), "PNG")


def png_chunk(kind: bytes, payload: bytes, crc: int | None = None) -> bytes:
    checksum = zlib.crc32(kind + payload) if crc is None else crc
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", checksum & 0xFFFFFFFF)


def png(
    width: int,
    height: int,
    bit_depth: int,
    color_type: int,
    idat: bytes,
    *,
    before_idat: tuple[bytes, ...] = (),
    interlace: int = 0,
) -> bytes:
    """A PNG put together chunk by chunk; `idat` is the already compressed pixel stream."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, interlace)
    return (
        PNG_SIGNATURE
        + png_chunk(b"IHDR", ihdr)
        + b"".join(before_idat)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


def _rows(pixels: np.ndarray) -> bytes:
    """The uncompressed PNG pixel stream: filter type 0, then each row's big-endian samples."""
    samples = np.ascontiguousarray(pixels.astype(pixels.dtype.newbyteorder(">")))
    rows = samples.view(np.uint8).reshape(pixels.shape[0], -1)
    return np.concatenate([np.zeros((pixels.shape[0], 1), np.uint8), rows], axis=1).tobytes()


@functools.lru_cache(maxsize=16)
def _zeros_stream(raw_bytes: int, chunk: int = 1 << 20) -> bytes:
    """zlib stream of `raw_bytes` zero bytes, compressed in pieces (never holding them all)."""
    compressor = zlib.compressobj(9)
    zeros = bytes(chunk)
    out = []
    left = raw_bytes
    while left > 0:
        out.append(compressor.compress(zeros[: min(chunk, left)]))
        left -= chunk
    out.append(compressor.flush())
    return b"".join(out)


def _pad_png_to(data: bytes, size: int) -> bytes:
    """The same PNG grown to exactly `size` bytes by a private ancillary chunk before IEND."""
    padding = size - len(data) - 12
    if padding < 0:
        raise ValueError(f"a PNG of {len(data)} bytes cannot be padded to {size}")
    iend = png_chunk(b"IEND", b"")
    assert data.endswith(iend)
    return data[: -len(iend)] + png_chunk(b"pdDg", bytes(padding)) + iend


def _grey_png_with_pixels(pixel_count: int) -> bytes:
    """A valid, mostly black 8-bit grey PNG of exactly `pixel_count` pixels, as square as it factors."""
    height = int(pixel_count**0.5)
    while pixel_count % height:
        height -= 1
    width = pixel_count // height
    raw_row = 1 + width
    return png(width, height, 8, 0, _zeros_stream(raw_row * height))


# -- image cases, kind by kind ---------------------------------------------------------------------


def _zero_and_random(rng: np.random.Generator) -> Iterator[ImageCase]:
    yield ImageCase("zero_bytes", b"", EMPTY, "empty.png")
    for length in (1, 2, 7, 64, 1000, int(rng.integers(1, 20_000))):
        data = rng.bytes(length)
        yield ImageCase("random_bytes", data, frozenset({400, 415}), "noise.bin", f"{length} bytes")
    for signature in (b"\xff\xd8\xff", PNG_SIGNATURE, b"RIFF\x00\x00\x00\x00WEBP", b"BM"):
        data = signature + rng.bytes(int(rng.integers(0, 3000)))
        yield ImageCase("signature_then_random", data, ANY_IMAGE_OUTCOME, "noise.img", repr(signature))


def _text_as_images(rng: np.random.Generator) -> Iterator[ImageCase]:
    texts = {
        "photo.jpg": b"This is not a JPEG, only text with a .jpg name.\n" * int(rng.integers(1, 50)),
        "image.png": b"<html><body><img src=x onerror=alert(1)></body></html>",
        "vector.svg": b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="99999" '
        b'height="99999"><rect width="100%" height="100%"/></svg>',
        "data.json": b'{"images": ["a.png"], "score": 0}',
        "script.webp": b"#!/bin/sh\necho pwned\n",
    }
    for filename, data in texts.items():
        yield ImageCase("text_named_as_image", data, REFUSED_FORMAT, filename)


def _truncation_statuses(fmt: str, data: bytes, cut: int) -> frozenset[int]:
    if cut < _SIGNATURE_LENGTH[fmt]:
        return REFUSED_FORMAT
    if cut >= _payload_end(fmt, data):
        # Only the trailer is missing (PNG's last CRC and IEND, JPEG's end marker): the pixels are all
        # there, and a decoder may or may not insist on the trailer.
        return frozenset({200, 400})
    return CORRUPT


def _payload_end(fmt: str, data: bytes) -> int:
    """Where the pixel data ends and only the trailer follows."""
    if fmt == "PNG":
        last_idat = data.rindex(b"IDAT")
        (length,) = struct.unpack(">I", data[last_idat - 4 : last_idat])
        return last_idat + 4 + length
    if fmt == "JPEG":
        return len(data) - 2
    return len(data)


def _truncated(rng: np.random.Generator, cuts_per_format: int) -> Iterator[ImageCase]:
    pixels = picture(rng, 40, 48)
    sources = {
        "PNG": encode(pixels, "PNG"),
        "JPEG": encode(pixels, "JPEG", quality=90),
        "WEBP": encode(pixels, "WEBP", quality=80),
        "WEBP_LOSSLESS": encode(pixels, "WEBP", lossless=True),
        "JPEG_PROGRESSIVE": encode(pixels, "JPEG", quality=80, progressive=True),
        "BMP": encode(pixels, "BMP"),
    }
    for name, data in sources.items():
        fmt = name.split("_")[0]
        header = range(1, min(len(data), 48))
        tail = range(max(1, len(data) - 16), len(data))
        middle = rng.integers(48, len(data) - 16, size=cuts_per_format)
        for cut in sorted({*header, *(int(c) for c in middle), *tail}):
            yield ImageCase(
                f"truncated_{fmt.lower()}",
                data[:cut],
                _truncation_statuses(fmt, data, cut),
                f"cut.{_EXTENSION[fmt]}",
                f"{name} cut at {cut} of {len(data)}",
            )


def _corrupt_png(rng: np.random.Generator) -> Iterator[ImageCase]:
    pixels = picture(rng, 24, 24)
    idat = zlib.compress(_rows(pixels))
    text = png_chunk(b"tEXt", b"Comment\x00hello")
    valid = png(24, 24, 8, 2, idat, before_idat=(text,))
    ihdr_at = 8
    bad_ihdr_crc = bytearray(valid)
    bad_ihdr_crc[ihdr_at + 8 + 13] ^= 0xFF
    yield ImageCase("bad_crc_png", bytes(bad_ihdr_crc), CORRUPT, "crc.png", "IHDR CRC")
    bad_text_crc = valid.replace(text, text[:-4] + bytes(4))
    yield ImageCase("bad_crc_png", bad_text_crc, CORRUPT, "crc.png", "tEXt CRC")
    idat_chunk = png_chunk(b"IDAT", idat)
    bad_idat_crc = valid.replace(idat_chunk, idat_chunk[:-4] + bytes(4))
    # Decoders skip the CRC of pixel data: it may decode.
    yield ImageCase("bad_crc_png", bad_idat_crc, frozenset({200, 400}), "crc.png", "IDAT CRC")

    def ihdr(width: int, height: int, depth: int, colour: int, interlace: int = 0) -> bytes:
        return png(width, height, depth, colour, idat, interlace=interlace)

    chunks = {
        "width 0": ihdr(0, 24, 8, 2),
        "height 0": ihdr(24, 0, 8, 2),
        "bit depth 3": ihdr(24, 24, 3, 2),
        "colour type 7": ihdr(24, 24, 8, 7),
        "16-bit palette": ihdr(24, 24, 16, 3),
        "interlace 2": ihdr(24, 24, 8, 2, interlace=2),
        "width 2^31": ihdr(2**31, 1, 8, 2),
        "width 2^32-1": ihdr(2**32 - 1, 2**32 - 1, 8, 2),
        "IDAT not zlib": png(24, 24, 8, 2, rng.bytes(500)),
        "IDAT too short": png(24, 24, 8, 2, zlib.compress(_rows(pixels)[:200])),
        "IDAT empty": png(24, 24, 8, 2, b""),
        "no IDAT": PNG_SIGNATURE + png_chunk(b"IHDR", valid[16:29]) + png_chunk(b"IEND", b""),
        "no IHDR": PNG_SIGNATURE + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b""),
        "chunk length 2^32-1": valid[:33] + struct.pack(">I", 0xFFFFFFFF) + valid[37:],
        "chunk length past the end": valid[:33] + struct.pack(">I", len(valid) * 4) + valid[37:],
        "palette image without PLTE": ihdr(24, 24, 8, 3),
        "unknown critical chunk": valid[:33] + png_chunk(b"ZZZZ", rng.bytes(40)) + valid[33:],
        "huge tEXt": valid[:33] + png_chunk(b"tEXt", b"k\x00" + bytes(200_000)) + valid[33:],
        "IDAT split in 1-byte chunks": valid[:33]
        + b"".join(png_chunk(b"IDAT", idat[i : i + 1]) for i in range(len(idat)))
        + png_chunk(b"IEND", b""),
    }
    for note, data in chunks.items():
        yield ImageCase("corrupt_chunk_png", data, frozenset({200, 400, 413}), "chunk.png", note)


def _corrupt_other(rng: np.random.Generator) -> Iterator[ImageCase]:
    pixels = picture(rng, 24, 32)
    jpeg = encode(pixels, "JPEG", quality=85)
    sof = jpeg.index(b"\xff\xc0")
    dqt = jpeg.index(b"\xff\xdb")
    dht = jpeg.index(b"\xff\xc4")
    sos = jpeg.index(b"\xff\xda")
    jpegs = {
        "SOF with 0 components": jpeg[: sof + 9] + b"\x00" + jpeg[sof + 10 :],
        "SOF height 0": jpeg[: sof + 5] + b"\x00\x00" + jpeg[sof + 7 :],
        "SOF 9 components": jpeg[: sof + 9] + b"\x09" + jpeg[sof + 10 :],
        "segment length 0": jpeg[: dqt + 2] + b"\x00\x00" + jpeg[dqt + 4 :],
        "segment length 0xFFFF": jpeg[: dht + 2] + b"\xff\xff" + jpeg[dht + 4 :],
        "no Huffman tables": jpeg[:dht] + jpeg[sos:],
        "scan data random": jpeg[: sos + 14] + rng.bytes(len(jpeg) - sos - 16) + b"\xff\xd9",
        "two SOI": b"\xff\xd8" + jpeg,
        "only SOI and EOI": b"\xff\xd8\xff\xd9",
        "APP1 Exif garbage": jpeg[:2] + b"\xff\xe1\x00\x40Exif\x00\x00" + rng.bytes(58) + jpeg[2:],
    }
    for note, data in jpegs.items():
        yield ImageCase("corrupt_jpeg", data, frozenset({200, 400, 413}), "bad.jpg", note)
    webp = encode(pixels, "WEBP", quality=80)
    webps = {
        "RIFF size too large": webp[:4] + struct.pack("<I", 0x7FFFFFF0) + webp[8:],
        "RIFF size too small": webp[:4] + struct.pack("<I", 4) + webp[8:],
        "VP8 chunk random": webp[:20] + rng.bytes(len(webp) - 20),
        "unknown chunk only": b"RIFF" + struct.pack("<I", 12) + b"WEBPXXXX" + struct.pack("<I", 0),
        "VP8L bad signature": b"RIFF"
        + struct.pack("<I", 18)
        + b"WEBPVP8L"
        + struct.pack("<I", 5)
        + rng.bytes(6),
    }
    for note, data in webps.items():
        yield ImageCase("corrupt_webp", data, frozenset({200, 400, 413}), "bad.webp", note)
    bmp = encode(pixels, "BMP")
    bmps = {
        "pixel offset past the end": bmp[:10] + struct.pack("<I", 10**6) + bmp[14:],
        "header size 0": bmp[:14] + struct.pack("<I", 0) + bmp[18:],
        "bit count 7": bmp[:28] + struct.pack("<H", 7) + bmp[30:],
        "negative width": bmp[:18] + struct.pack("<i", -32) + bmp[22:],
        "RLE8 with random data": bmp[:28] + struct.pack("<HI", 8, 1) + bmp[34:54] + rng.bytes(300),
    }
    for note, data in bmps.items():
        yield ImageCase("corrupt_bmp", data, frozenset({200, 400, 413}), "bad.bmp", note)


def _flipped(rng: np.random.Generator, per_format: int) -> Iterator[ImageCase]:
    """Valid files with a few bytes overwritten at random places."""
    pixels = picture(rng, 32, 32)
    sources = {
        "PNG": encode(pixels, "PNG"),
        "JPEG": encode(pixels, "JPEG", quality=85),
        "WEBP": encode(pixels, "WEBP", quality=80),
        "BMP": encode(pixels, "BMP"),
    }
    for fmt, data in sources.items():
        for _ in range(per_format):
            changed = bytearray(data)
            places = rng.integers(0, len(data), size=int(rng.integers(1, 4)))
            for place in places:
                changed[place] = int(rng.integers(0, 256))
            yield ImageCase(
                f"flipped_bytes_{fmt.lower()}",
                bytes(changed),
                ANY_IMAGE_OUTCOME,
                f"flipped.{_EXTENSION[fmt]}",
                f"offsets {sorted(int(p) for p in places)}",
            )


def _bombs(limits: Limits) -> Iterator[ImageCase]:
    """Tiny files that declare (and some that really hold) far more pixels than the limit allows."""
    yield ImageCase(
        "bomb_png", png(100_000, 100_000, 8, 2, zlib.compress(bytes(1000))), TOO_LARGE, "bomb.png", "declared"
    )
    # Really valid: 1-bit grey, 30000 x 30000 of zeros, 112 MB of rows in a ~110 KB zlib stream.
    side = 30_000
    yield ImageCase(
        "bomb_png",
        png(side, side, 1, 0, _zeros_stream((1 + side // 8) * side)),
        TOO_LARGE,
        "bomb.png",
        "real",
    )
    # A small image whose pixel stream inflates to 64 MB: only what the image needs may be inflated.
    yield ImageCase(
        "bomb_png",
        png(16, 16, 8, 0, _zeros_stream(64 << 20)),
        frozenset({200, 400}),
        "inflate.png",
        "long IDAT",
    )
    ztxt = png_chunk(b"zTXt", b"bomb\x00\x00" + _zeros_stream(64 << 20))
    yield ImageCase(
        "bomb_png", png(8, 8, 8, 0, zlib.compress(bytes(9 * 8)), before_idat=(ztxt,)), frozenset({200, 400}),
        "text.png", "zTXt inflating to 64 MB",
    )  # fmt: skip
    iccp = png_chunk(b"iCCP", b"icc\x00\x00" + _zeros_stream(64 << 20))
    yield ImageCase(
        "bomb_png", png(8, 8, 8, 0, zlib.compress(bytes(9 * 8)), before_idat=(iccp,)), frozenset({200, 400}),
        "icc.png", "iCCP inflating to 64 MB",
    )  # fmt: skip
    # GIF is outside the allow-list: refused from its signature before any parsing.
    gif_screen = b"GIF89a" + struct.pack("<HH", 65_535, 65_535) + b"\x00\x00\x00"
    gif_image = b"\x2c" + struct.pack("<HHHH", 0, 0, 65_535, 65_535) + b"\x00" + b"\x08\x02\x4c\x01\x00\x3b"
    yield ImageCase("bomb_gif", gif_screen + gif_image, REFUSED_FORMAT, "bomb.gif", "65535 x 65535")
    # WebP: a lossless (VP8L) header declaring 16384 x 16384, and an extended (VP8X) canvas of 2^24 x 2^24.
    vp8l_size = (16_383) | (16_383 << 14)
    vp8l = b"\x2f" + struct.pack("<I", vp8l_size) + bytes(20)
    yield ImageCase(
        "bomb_webp",
        b"RIFF"
        + struct.pack("<I", 4 + 8 + len(vp8l))
        + b"WEBP"
        + b"VP8L"
        + struct.pack("<I", len(vp8l))
        + vp8l,
        frozenset({400, 413}),
        "bomb.webp",
        "VP8L 16384 x 16384",
    )
    canvas = struct.pack("<I", 0)[:4] + (2**24 - 1).to_bytes(3, "little") * 2
    vp8x = b"VP8X" + struct.pack("<I", 10) + canvas
    yield ImageCase(
        "bomb_webp",
        b"RIFF" + struct.pack("<I", 4 + len(vp8x)) + b"WEBP" + vp8x,
        frozenset({400, 413}),
        "canvas.webp",
        "VP8X 2^24 x 2^24",
    )
    jpeg = encode(np.zeros((8, 8, 3), np.uint8), "JPEG")
    sof = jpeg.index(b"\xff\xc0")
    big_jpeg = jpeg[: sof + 5] + struct.pack(">HH", 65_500, 65_500) + jpeg[sof + 9 :]
    yield ImageCase("bomb_jpeg", big_jpeg, TOO_LARGE, "bomb.jpg", "65500 x 65500")
    bmp = encode(np.zeros((4, 4, 3), np.uint8), "BMP")
    big_bmp = bmp[:18] + struct.pack("<ii", 60_000, 60_000) + bmp[26:]
    yield ImageCase("bomb_bmp", big_bmp, TOO_LARGE, "bomb.bmp", "60000 x 60000")


def _animated(rng: np.random.Generator) -> Iterator[ImageCase]:
    frames = [Image.fromarray(picture(rng, 8, 8)) for _ in range(8)]
    many = [frames[i % len(frames)] for i in range(400)]
    gif = encode(many[0], "GIF", save_all=True, append_images=many[1:], duration=10, loop=0)
    yield ImageCase("animated_gif", gif, REFUSED_FORMAT, "anim.gif", "400 frames")
    apng = encode(many[0], "PNG", save_all=True, append_images=many[1:], duration=10, loop=0)
    yield ImageCase("animated_png", apng, DECODED, "anim.png", "400 frames")
    actl = apng.index(b"acTL")
    lying = apng[: actl - 4] + png_chunk(b"acTL", struct.pack(">II", 2**31 - 1, 0)) + apng[actl + 16 :]
    yield ImageCase("animated_png", lying, frozenset({200, 400}), "anim.png", "acTL claims 2^31-1 frames")
    webp = encode(many[0], "WEBP", save_all=True, append_images=many[1:], duration=10, lossless=True)
    yield ImageCase("animated_webp", webp, DECODED, "anim.webp", "400 frames")


def _other_formats(rng: np.random.Generator) -> Iterator[ImageCase]:
    image = Image.fromarray(picture(rng, 24, 24))
    saved = {
        "TIFF": "tif",
        "GIF": "gif",
        "ICO": "ico",
        "PPM": "ppm",
        "PCX": "pcx",
        "TGA": "tga",
        "PDF": "pdf",
    }
    saved |= {"SGI": "sgi", "DDS": "dds", "QOI": "qoi"}
    for fmt, extension in saved.items():
        try:
            data = encode(image, fmt)
        except (KeyError, OSError, ValueError):
            continue  # this Pillow build cannot write it
        yield ImageCase("format_not_allowed", data, REFUSED_FORMAT, f"image.{extension}", fmt)
    # Signatures of formats Pillow may not write here: refused from the bytes all the same.
    headers = {
        "heic": b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic",
        "avif": b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00avifmif1miaf",
        "jp2": b"\x00\x00\x00\x0cjP  \r\n\x87\n",
        "psd": b"8BPS\x00\x01" + bytes(20),
        "jxl": b"\xff\x0a" + bytes(20),
        "pdf": b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n",
    }
    for extension, header in headers.items():
        data = header + rng.bytes(200)
        yield ImageCase("format_not_allowed", data, REFUSED_FORMAT, f"image.{extension}", extension)


def _colour_modes(rng: np.random.Generator) -> Iterator[ImageCase]:
    pixels = picture(rng, 20, 28)
    rgb = Image.fromarray(pixels)
    cmyk = encode(rgb.convert("CMYK"), "JPEG", quality=90)
    yield ImageCase("cmyk_jpeg", cmyk, DECODED, "cmyk.jpg")
    yield ImageCase("ycck_jpeg", ycck_from_cmyk(cmyk), DECODED, "ycck.jpg")
    # 16-bit PNGs, put together by hand (Pillow writes 16 bits only for grey).
    wide = pixels.astype(np.uint16) * 257
    alpha = rng.integers(0, 65_536, size=(*pixels.shape[:2], 1), dtype=np.uint16)
    rgba16 = np.concatenate([wide, alpha], axis=2)
    yield ImageCase("png_16bit", png(28, 20, 16, 6, zlib.compress(_rows(rgba16))), DECODED, "rgba16.png")
    yield ImageCase("png_16bit", png(28, 20, 16, 2, zlib.compress(_rows(wide))), DECODED, "rgb16.png")
    grey16 = wide[..., 0]
    trns16 = png_chunk(b"tRNS", struct.pack(">H", int(grey16[0, 0])))
    yield ImageCase(
        "png_16bit",
        png(28, 20, 16, 0, zlib.compress(_rows(grey16)), before_idat=(trns16,)),
        DECODED,
        "g16.png",
    )
    grey_alpha16 = np.stack([grey16, alpha[..., 0]], axis=2)
    yield ImageCase("png_16bit", png(28, 20, 16, 4, zlib.compress(_rows(grey_alpha16))), DECODED, "la16.png")
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    with_alpha = palette.copy()
    with_alpha.info["transparency"] = bytes(range(0, 256, 16))
    yield ImageCase("png_palette_alpha", encode(with_alpha, "PNG"), DECODED, "palette.png", "tRNS per entry")
    yield ImageCase(
        "png_palette_alpha", encode(palette, "PNG", transparency=3), DECODED, "palette.png", "key"
    )
    for bits in (1, 2, 4):
        yield ImageCase(
            "png_palette_alpha", encode(palette, "PNG", bits=bits), DECODED, "palette.png", f"{bits}-bit"
        )
    grey = rgb.convert("L")
    yield ImageCase("grey_and_la", encode(grey, "PNG"), DECODED, "grey.png", "L")
    yield ImageCase("grey_and_la", encode(grey, "JPEG"), DECODED, "grey.jpg", "L JPEG")
    yield ImageCase("grey_and_la", encode(rgb.convert("LA"), "PNG"), DECODED, "la.png", "LA")
    yield ImageCase("grey_and_la", encode(rgb.convert("1"), "PNG"), DECODED, "bw.png", "1-bit")
    yield ImageCase(
        "grey_and_la", encode(rgb.convert("RGBA"), "WEBP", lossless=True), DECODED, "a.webp", "RGBA"
    )
    yield ImageCase("grey_and_la", encode(grey, "BMP"), DECODED, "grey.bmp", "L BMP")


def ycck_from_cmyk(cmyk_jpeg: bytes) -> bytes:
    """The same JPEG with its Adobe marker's colour transform set to 2 (YCCK): the decoder then
    reads the four channels as YCCK and converts them."""
    adobe = cmyk_jpeg.index(b"Adobe") - 4  # the APP14 marker, then its length, then "Adobe"
    assert cmyk_jpeg[adobe : adobe + 2] == b"\xff\xee"
    (length,) = struct.unpack(">H", cmyk_jpeg[adobe + 2 : adobe + 4])
    transform_at = adobe + 2 + length - 1
    return cmyk_jpeg[:transform_at] + b"\x02" + cmyk_jpeg[transform_at + 1 :]


def _shapes(rng: np.random.Generator, limits: Limits) -> Iterator[ImageCase]:
    for fmt in ("PNG", "JPEG", "WEBP", "BMP"):
        yield ImageCase("one_pixel", encode(picture(rng, 1, 1), fmt), DECODED, f"dot.{_EXTENSION[fmt]}", fmt)
    # Extreme aspect ratios decode; a strip may still be refused (413) for a side longer than the
    # service takes, or, under a centre-crop resize rule, for the pixels it would grow to on its way
    # to the model's input.
    for height, width in ((1, 4000), (4000, 1), (2, 3000), (3000, 2)):
        data = encode(picture(rng, height, width), "PNG")
        yield ImageCase("extreme_aspect", data, frozenset({200, 413}), "strip.png", f"{width} x {height}")
    for long_side in (65_535, 65_536, limits.max_image_pixels):
        strip = png(long_side, 1, 1, 0, _zeros_stream(1 + -(-long_side // 8)))
        yield ImageCase("extreme_aspect", strip, frozenset({200, 413}), "strip.png", f"{long_side} x 1")


def _exif_orientations(rng: np.random.Generator) -> Iterator[ImageCase]:
    pixels = picture(rng, 16, 24)
    for orientation in (*range(1, 9), 0, 9, 65_535):
        exif = Image.Exif()
        exif[0x0112] = orientation
        kind = "exif_orientation" if 1 <= orientation <= 8 else "exif_orientation_invalid"
        for fmt in ("JPEG", "PNG", "WEBP"):
            data = encode(pixels, fmt, exif=exif)
            yield ImageCase(kind, data, DECODED, f"o{orientation}.{_EXTENSION[fmt]}", f"{fmt} {orientation}")


def _pixel_limit(limits: Limits) -> Iterator[ImageCase]:
    at = _grey_png_with_pixels(limits.max_image_pixels)
    yield ImageCase("pixels_at_limit", at, DECODED, "at.png", f"{limits.max_image_pixels} pixels")
    over = _grey_png_with_pixels(limits.max_image_pixels + 1)
    yield ImageCase("pixels_over_limit", over, TOO_LARGE, "over.png", f"{limits.max_image_pixels + 1} pixels")


def image_cases(seed: int = 0, limits: Limits | None = None, cuts_per_format: int = 12) -> list[ImageCase]:
    """Every image-level kind; `seed` varies the random parts."""
    limits = limits or Limits()
    rng = np.random.default_rng(seed)
    makers: list[Callable[[], Iterator[ImageCase]]] = [
        lambda: _zero_and_random(rng),
        lambda: _text_as_images(rng),
        lambda: _truncated(rng, cuts_per_format),
        lambda: _corrupt_png(rng),
        lambda: _corrupt_other(rng),
        lambda: _flipped(rng, cuts_per_format),
        lambda: _bombs(limits),
        lambda: _animated(rng),
        lambda: _other_formats(rng),
        lambda: _colour_modes(rng),
        lambda: _shapes(rng, limits),
        lambda: _exif_orientations(rng),
        lambda: _pixel_limit(limits),
    ]
    return [case for make in makers for case in make()]


# -- whole requests ----------------------------------------------------------------------------------

BOUNDARY = "dede-malformed-3f9a"
_MEDIA_TYPE = {"png": "image/png", "jpg": "image/jpeg", "webp": "image/webp", "bmp": "image/bmp"}


def multipart(
    parts: list[tuple[str | None, str | None, bytes, str | None]], boundary: str = BOUNDARY
) -> bytes:
    """A multipart/form-data body from (field name, filename, data, content type) parts; a None name
    or filename leaves that parameter out, a None content type leaves the header out."""
    out = []
    for name, filename, data, content_type in parts:
        disposition = "form-data"
        if name is not None:
            disposition += f'; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        head = f"--{boundary}\r\nContent-Disposition: {disposition}\r\n"
        if content_type is not None:
            head += f"Content-Type: {content_type}\r\n"
        out.append(head.encode("utf-8") + b"\r\n" + data + b"\r\n")
    return b"".join(out) + f"--{boundary}--\r\n".encode()


def _form(boundary: str = BOUNDARY) -> tuple[tuple[str, str], ...]:
    return (("Content-Type", f"multipart/form-data; boundary={boundary}"),)


def _media_type(filename: str) -> str:
    return _MEDIA_TYPE.get(filename.rsplit(".", 1)[-1], "application/octet-stream")


def _wrapped(case: ImageCase, form: str, good: bytes) -> RequestCase:
    """One image case as a request: alone in a form, beside a good image, or as a raw body."""
    part = ("images", case.filename, case.data, _media_type(case.filename))
    note = f"{form}: {case.note}" if case.note else form
    if form == "alone":
        return RequestCase(case.kind, multipart([part]), _form(), case.statuses, note=note)
    if form == "beside_good":
        body = multipart([("images", "good.png", good, "image/png"), part])
        error_expected = 1 if 200 not in case.statuses else None
        return RequestCase(case.kind, body, _form(), DECODED, note=note, per_image_error=error_expected)
    if form == "raw_body":
        statuses = frozenset({422}) if not case.data else case.statuses  # an empty raw body holds no image
        headers = (("Content-Type", _media_type(case.filename)),)
        return RequestCase(case.kind, case.data, headers, statuses, note=note)
    raise ValueError(f"unknown form {form!r}")


def _size_limits(limits: Limits, good: bytes) -> Iterator[RequestCase]:
    raw = (("Content-Type", "image/png"),)
    limit = limits.max_upload_bytes
    yield RequestCase("body_at_limit", _pad_png_to(good, limit), raw, DECODED, note=f"raw {limit} bytes")
    yield RequestCase("body_over_limit", _pad_png_to(good, limit + 1), raw, TOO_LARGE, note="raw, one over")
    overhead = len(multipart([("images", "a.png", b"", "image/png")]))
    at = multipart([("images", "a.png", _pad_png_to(good, limit - overhead), "image/png")])
    assert len(at) == limit
    yield RequestCase("body_at_limit", at, _form(), DECODED, note=f"multipart {limit} bytes")
    over = multipart([("images", "a.png", _pad_png_to(good, limit - overhead + 1), "image/png")])
    yield RequestCase("body_over_limit", over, _form(), TOO_LARGE, note="multipart, one over")
    yield RequestCase(
        "body_over_limit",
        _pad_png_to(good, limit + 1),
        raw,
        TOO_LARGE,
        chunked=True,
        note="chunked, one over",
    )
    count = limits.max_images_per_request
    images = [("images", f"{i}.png", good, "image/png") for i in range(count + 1)]
    at_count, over_count = multipart(images[:count]), multipart(images)
    if len(over_count) <= limit:
        yield RequestCase("images_at_limit", at_count, _form(), DECODED, note=f"{count} images")
        yield RequestCase(
            "images_over_limit", over_count, _form(), frozenset({422}), note=f"{count + 1} images"
        )


def _many_parts(limits: Limits, good: bytes) -> Iterator[RequestCase]:
    short = "b"
    budget = limits.max_upload_bytes - 1000
    note_part = len(multipart([("note", None, b"x", None)], short)) - len(f"--{short}--\r\n")
    fields = min(20_000, budget // note_part)
    yield RequestCase(
        "thousands_of_parts",
        multipart([("note", None, b"x", None)] * fields, short),
        _form(short),
        frozenset({422}),
        note=f"{fields} fields, none of them images",
    )
    bare = min(20_000, budget // len(f"--{short}\r\n\r\n\r\n"))
    body = f"--{short}\r\n\r\n\r\n".encode() * bare + f"--{short}--\r\n".encode()
    yield RequestCase("thousands_of_parts", body, _form(short), frozenset({422}), note=f"{bare} bare parts")
    empty_part = len(multipart([("images", "e.png", b"", None)], short)) - len(f"--{short}--\r\n")
    empty_images = min(20_000, budget // empty_part)
    body = multipart([("images", "e.png", b"", None)] * empty_images, short)
    yield RequestCase(
        "thousands_of_parts", body, _form(short), frozenset({422}), note=f"{empty_images} empty image parts"
    )
    headers = "".join(f"X-Header-{i}: {i}\r\n" for i in range(min(5_000, budget // 40)))
    crowded = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="images"; filename="a.png"\r\n{headers}\r\n'.encode()
        + good
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )
    # A multipart parser may cap the headers of one part (400).
    yield RequestCase(
        "thousands_of_parts",
        crowded,
        _form(),
        frozenset({200, 400}),
        note="one part with thousands of headers",
    )


def _missing_fields(good: bytes) -> Iterator[RequestCase]:
    no_images = frozenset({422})
    yield RequestCase("missing_fields", f"--{BOUNDARY}--\r\n".encode(), _form(), no_images, note="no parts")
    yield RequestCase("missing_fields", b"", _form(), frozenset({400}), note="empty body")
    yield RequestCase(
        "missing_fields", b"", (("Content-Type", "image/png"),), no_images, note="empty raw body"
    )
    yield RequestCase(
        "missing_fields",
        multipart([("image", "a.png", good, "image/png")]),
        _form(),
        no_images,
        note="field 'image'",
    )
    yield RequestCase(
        "missing_fields", multipart([(None, "a.png", good, "image/png")]), _form(), no_images, note="no name"
    )
    no_disposition = f"--{BOUNDARY}\r\nContent-Type: image/png\r\n\r\n".encode() + good
    no_disposition += f"\r\n--{BOUNDARY}--\r\n".encode()
    yield RequestCase("missing_fields", no_disposition, _form(), no_images, note="no Content-Disposition")
    yield RequestCase(
        "missing_fields",
        multipart([("images", None, good, None)]),
        _form(),
        DECODED,
        note="no filename, no type",
    )
    unterminated = multipart([("images", "a.png", good, "image/png")])[: -len(f"--{BOUNDARY}--\r\n")]
    yield RequestCase("missing_fields", unterminated, _form(), frozenset({400}), note="no closing boundary")


def _wrong_content_types(good: bytes) -> Iterator[RequestCase]:
    form_body = multipart([("images", "a.png", good, "image/png")])
    refused = frozenset({415})
    for content_type, body in (
        ("application/json", b'{"images": ["aGVsbG8="]}'),
        ("text/plain", good),
        ("application/x-www-form-urlencoded", b"images=" + good[:50]),
        ("multipart/mixed; boundary=" + BOUNDARY, form_body),
        ("text/html; charset=utf-8", b"<html></html>"),
        ("application/xml", b"<?xml version='1.0'?><images/>"),
        ("image", good),
        (";;;===", good),
    ):
        yield RequestCase(
            "wrong_content_type", body, (("Content-Type", content_type),), refused, note=content_type
        )
    yield RequestCase("wrong_content_type", good, (), refused, note="no Content-Type")
    yield RequestCase(
        "wrong_content_type",
        good,
        (("Content-Type", "multipart/form-data"),),
        frozenset({400}),
        note="no boundary",
    )
    yield RequestCase(
        "wrong_content_type", form_body, _form("another-boundary"), frozenset({400}), note="boundary mismatch"
    )
    yield RequestCase(
        "wrong_content_type",
        form_body,
        (("Content-Type", "image/png"),),
        refused,
        note="form sent as image/png",
    )
    for content_type in ("IMAGE/PNG", "image/png; charset=utf-8", "application/octet-stream", "image/gif"):
        yield RequestCase(
            "wrong_content_type", good, (("Content-Type", content_type),), DECODED, note=content_type
        )
    long_boundary = "x" * 500
    body = multipart([("images", "a.png", good, "image/png")], long_boundary)
    yield RequestCase(
        "wrong_content_type", body, _form(long_boundary), frozenset({200, 400}), note="500-char boundary"
    )
    lying_part = multipart([("images", "a.png", encode(np.zeros((8, 8, 3), np.uint8), "GIF"), "image/png")])
    yield RequestCase(
        "wrong_content_type", lying_part, _form(), refused, note="GIF bytes in a part said image/png"
    )
    honest_bytes = multipart([("images", "a.txt", good, "text/plain")])
    yield RequestCase(
        "wrong_content_type", honest_bytes, _form(), DECODED, note="PNG bytes in a text/plain part"
    )


def _long_names_and_headers(limits: Limits, good: bytes) -> Iterator[RequestCase]:
    # A multipart parser may cap a part's header size: a very long filename may be a 400, never a 5xx.
    length = min(100_000, (limits.max_upload_bytes - len(good) - 500) // 2)
    for note, filename, statuses in (
        ("1000-char filename", "a" * 996 + ".png", DECODED),
        (f"{length}-char filename", "a" * (length - 4) + ".png", frozenset({200, 400})),
        ("path traversal", "../../../../etc/passwd", DECODED),
        ("quotes and backslashes", 'a\\"b\\\\c.png', DECODED),
        ("unicode", "\u8d8a\u5883\u2603\U0001f600.png", DECODED),
        ("control characters", "a\x00b\x01c\x7f.png", DECODED),
        ("only a dot", ".", DECODED),
    ):
        body = multipart([("images", filename, good, "image/png")])
        yield RequestCase("long_filename", body, _form(), statuses, note=note)
    disposition = f"form-data; name=\"images\"; filename*=UTF-8''%e2%98%83{'%41' * 2000}"
    rfc2231 = f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n".encode()
    rfc2231 += good + f"\r\n--{BOUNDARY}--\r\n".encode()
    yield RequestCase("long_filename", rfc2231, _form(), frozenset({200, 400}), note="RFC 2231 filename*")
    # Header values: far longer than any client sends. The server may refuse them (400, 431); never 5xx.
    header_outcomes = frozenset({200, 400, 431})
    raw = ("Content-Type", "image/png")
    yield RequestCase(
        "long_header", good, (raw, ("X-Request-ID", "r" * 8_000)), DECODED, note="8 kB request id"
    )
    for size in (8_000, 60_000):
        yield RequestCase(
            "long_header", good, (raw, ("X-Padding", "p" * size)), header_outcomes, note=f"{size}-byte header"
        )
        yield RequestCase(
            "long_header",
            good,
            (raw, ("User-Agent", "u" * size)),
            header_outcomes,
            note=f"{size}-byte User-Agent",
        )
    many = tuple((f"X-Many-{i}", "v") for i in range(2_000))
    yield RequestCase("long_header", good, (raw, *many), header_outcomes, note="2000 headers")
    params = "; ".join(f"p{i}=v{i}" for i in range(1_000))
    yield RequestCase(
        "long_header",
        good,
        (("Content-Type", f"image/png; {params}"),),
        header_outcomes,
        note="1000 parameters",
    )


def request_cases(
    seed: int = 0, limits: Limits | None = None, cuts_per_format: int = 12, every_form: bool = True
) -> list[RequestCase]:
    """Every image case as a request, then the request-level kinds. With `every_form` each image case
    is sent alone, beside a good image and as a raw body; without, alone only, plus the first case of
    each kind in the two other forms."""
    limits = limits or Limits()
    good = good_image(seed)
    cases: list[RequestCase] = []
    seen: set[str] = set()
    for image in image_cases(seed, limits, cuts_per_format):
        forms = ["alone"]
        if every_form or image.kind not in seen:
            forms += ["beside_good", "raw_body"]
        seen.add(image.kind)
        if len(image.data) + 1000 > limits.max_upload_bytes:
            continue  # the limits themselves are tried by `_size_limits`
        cases += [_wrapped(image, form, good) for form in forms]
    for make in (
        lambda: _size_limits(limits, good),
        lambda: _many_parts(limits, good),
        lambda: _missing_fields(good),
        lambda: _wrong_content_types(good),
        lambda: _long_names_and_headers(limits, good),
    ):
        cases += list(make())
    return cases


# -- fuzzing ---------------------------------------------------------------------------------------------

_SIGNATURES = [b"\xff\xd8\xff", PNG_SIGNATURE, b"RIFF\x00\x10\x00\x00WEBPVP8 ", b"BM", b"GIF89a"]


@functools.cache
def _fuzz_seeds() -> tuple[bytes, ...]:
    pixels = picture(np.random.default_rng(7), 12, 16)
    return tuple(
        encode(pixels, fmt, **options)
        for fmt, options in (
            ("PNG", {}),
            ("JPEG", {"quality": 80}),
            ("JPEG", {"quality": 80, "progressive": True}),
            ("WEBP", {"quality": 80}),
            ("WEBP", {"lossless": True}),
            ("BMP", {}),
            ("PNG", {"interlace": 1}),
        )
    )


@st.composite
def _edited_file(draw: st.DrawFn) -> bytes:
    """A valid file with a few edits: overwritten bytes, a cut, an insertion, a duplicated span."""
    data = bytearray(draw(st.sampled_from(_fuzz_seeds())))
    for _ in range(draw(st.integers(1, 4))):
        edit = draw(st.sampled_from(["overwrite", "cut", "insert", "duplicate"]))
        at = draw(st.integers(0, len(data) - 1)) if data else 0
        if edit == "overwrite" and data:
            data[at] = draw(st.integers(0, 255))
        elif edit == "cut":
            data = data[:at]
        elif edit == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif edit == "duplicate" and data:
            end = draw(st.integers(at, min(len(data), at + 256)))
            data[at:at] = data[at:end]
    return bytes(data)


def fuzz_inputs() -> st.SearchStrategy[bytes]:
    """Inputs for a property test of the decoder: it must decode them or reject them, nothing else."""
    return st.one_of(
        st.binary(max_size=4096),
        st.tuples(st.sampled_from(_SIGNATURES), st.binary(max_size=2048)).map(lambda pair: pair[0] + pair[1]),
        _edited_file(),
    )
