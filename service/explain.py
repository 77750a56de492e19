"""Per-image evidence for people: the discrepancy map normalised and coloured, the rebuild, as small
PNGs (data URIs) or arrays. Torch-free: the service renders answers with it, `dede score --explain`
renders overlay grids with it.

Normalised map: the graph's map divided by the manifest's `explain.map_scale`, so that 1.0 means
"as unusual as the threshold" (models.bundle.ExplainSpec). The heat map's colour scale covers 0 to
HEAT_MAX; 1.0 sits in its middle, and cells far below the threshold are transparent, so the heat map
can be laid over the image.
"""

from __future__ import annotations

import base64
import struct
import zlib

import numpy as np
from PIL import Image

from models.bundle import ExplainSpec
from service.batcher import Evidence

HEAT_MAX = 2.0  # the top of the colour scale, in threshold units
# (position on the scale 0..1, RGBA): transparent blue at 0, yellow at the threshold, deep red above.
_RAMP = np.array(
    [
        (0.00, 49, 54, 149, 0),
        (0.25, 69, 117, 180, 70),
        (0.50, 254, 224, 144, 170),
        (0.75, 244, 109, 67, 215),
        (1.00, 165, 0, 38, 240),
    ],
    dtype=np.float64,
)
# zlib level: 1 encodes several times faster than the default 6 and these PNGs are small either way.
_PNG_LEVEL = 1
_LUT_SIZE = 1025  # colour-scale steps (odd: the threshold, 0.5 of the scale, is one exactly)
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_COLOUR_TYPE = {3: 2, 4: 6}  # channels -> PNG colour type (RGB, RGBA)


def normalise_map(discrepancy_map: np.ndarray, spec: ExplainSpec) -> np.ndarray:
    """Raw map [h, w] (as the graph gives it) -> float32 [h, w] in threshold units."""
    return (np.asarray(discrepancy_map, dtype=np.float64) / spec.map_scale).astype(np.float32)


def _colour_table() -> np.ndarray:
    steps = np.linspace(0.0, 1.0, _LUT_SIZE)
    channels = [np.interp(steps, _RAMP[:, 0], _RAMP[:, k]) for k in range(1, 5)]
    return np.stack(channels, axis=-1).round().astype(np.uint8)


_COLOURS = _colour_table()  # [_LUT_SIZE, 4]: a table look-up per cell instead of four interpolations


def heat_rgba(normalised: np.ndarray) -> np.ndarray:
    """Normalised map [h, w] -> uint8 RGBA [h, w, 4] on the colour scale 0..HEAT_MAX."""
    position = np.clip(np.nan_to_num(normalised, nan=0.0, posinf=HEAT_MAX) / HEAT_MAX, 0.0, 1.0)
    return _COLOURS[np.rint(position * (_LUT_SIZE - 1)).astype(np.intp)]


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_png(pixels: np.ndarray) -> bytes:
    """uint8 [H, W, 3 or 4] -> PNG bytes (8-bit RGB or RGBA, no filter). Written here because on the
    small images of an answer PIL's encoder spends more time setting up than compressing (measured:
    about twice as slow on 32 x 32)."""
    height, width, channels = pixels.shape
    rows = np.zeros((height, 1 + width * channels), np.uint8)  # each row: filter byte 0, then pixels
    rows[:, 1:] = pixels.reshape(height, -1)
    header = struct.pack(">IIBBBBB", width, height, 8, _PNG_COLOUR_TYPE[channels], 0, 0, 0)
    return b"".join(
        [
            _PNG_SIGNATURE,
            _png_chunk(b"IHDR", header),
            _png_chunk(b"IDAT", zlib.compress(rows.tobytes(), _PNG_LEVEL)),
            _png_chunk(b"IEND", b""),
        ]
    )


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def chw_to_image(image_chw: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(np.asarray(image_chw, dtype=np.uint8).transpose(1, 2, 0)))


def explanation(evidence: Evidence, spec: ExplainSpec, with_arrays: bool = False) -> dict:
    """One image's `explanation` in a /detect answer.

    map_png: the heat map at the map's own size (h x w pixels, RGBA; scale it up without smoothing);
    rebuild_png: the rebuild at the input size (RGB); map_max: the largest normalised cell, so a
    reader sees at a glance whether any place is as unusual as the threshold (>= 1.0).
    with_arrays adds `map` (normalised, [h][w], 4 significant digits) and `rebuild` ([3][H][W] uint8).
    """
    normalised = normalise_map(evidence.discrepancy_map, spec)
    finite = normalised[np.isfinite(normalised)]
    answer = {
        "map_png": data_uri(encode_png(heat_rgba(normalised))),
        "rebuild_png": data_uri(encode_png(np.asarray(evidence.rebuild, dtype=np.uint8).transpose(1, 2, 0))),
        "map_shape": list(normalised.shape),
        "map_max": float(finite.max()) if finite.size else None,
        "heat_scale_max": HEAT_MAX,
    }
    if with_arrays:
        # NaN and inf are not JSON: a cell the graph could not compute is given as null.
        rounded = [[float(f"{v:.4g}") if np.isfinite(v) else None for v in row] for row in normalised]
        answer["map"] = rounded
        answer["rebuild"] = np.asarray(evidence.rebuild, dtype=np.uint8).tolist()
    return answer


def overlay_grid(image_chw: np.ndarray, evidence: Evidence, spec: ExplainSpec, scale: int = 4) -> Image.Image:
    """input | rebuild | heat map over the input, side by side, each enlarged `scale` times (nearest
    neighbour, so patches stay sharp): the offline review picture of `dede score --explain`."""
    source = chw_to_image(image_chw)
    size = (source.width * scale, source.height * scale)
    heat = Image.fromarray(heat_rgba(normalise_map(evidence.discrepancy_map, spec)))
    over = Image.alpha_composite(source.convert("RGBA"), heat.resize(source.size, Image.Resampling.NEAREST))
    panels = [source, chw_to_image(evidence.rebuild), over.convert("RGB")]
    gap = 2 * scale
    grid = Image.new("RGB", (3 * size[0] + 2 * gap, size[1]), (255, 255, 255))
    for k, panel in enumerate(panels):
        grid.paste(panel.resize(size, Image.Resampling.NEAREST), (k * (size[0] + gap), 0))
    return grid
