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
import io

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


def normalise_map(discrepancy_map: np.ndarray, spec: ExplainSpec) -> np.ndarray:
    """Raw map [h, w] (as the graph gives it) -> float32 [h, w] in threshold units."""
    return (np.asarray(discrepancy_map, dtype=np.float64) / spec.map_scale).astype(np.float32)


def heat_rgba(normalised: np.ndarray) -> np.ndarray:
    """Normalised map [h, w] -> uint8 RGBA [h, w, 4] on the colour scale 0..HEAT_MAX."""
    position = np.clip(np.nan_to_num(normalised, nan=0.0, posinf=HEAT_MAX) / HEAT_MAX, 0.0, 1.0)
    channels = [np.interp(position, _RAMP[:, 0], _RAMP[:, k]) for k in range(1, 5)]
    return np.stack(channels, axis=-1).round().astype(np.uint8)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=_PNG_LEVEL)
    return buffer.getvalue()


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
        "map_png": data_uri(png_bytes(Image.fromarray(heat_rgba(normalised), mode="RGBA"))),
        "rebuild_png": data_uri(png_bytes(chw_to_image(evidence.rebuild))),
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
    heat = Image.fromarray(heat_rgba(normalise_map(evidence.discrepancy_map, spec)), mode="RGBA")
    over = Image.alpha_composite(source.convert("RGBA"), heat.resize(source.size, Image.Resampling.NEAREST))
    panels = [source, chw_to_image(evidence.rebuild), over.convert("RGB")]
    gap = 2 * scale
    grid = Image.new("RGB", (3 * size[0] + 2 * gap, size[1]), (255, 255, 255))
    for k, panel in enumerate(panels):
        grid.paste(panel.resize(size, Image.Resampling.NEAREST), (k * (size[0] + gap), 0))
    return grid
