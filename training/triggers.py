"""Patch triggers in PIXEL space: x * (1 - mask) + pattern * mask on uint8/[0,1] images, BEFORE any
normalization (the reference code pastes after normalization, which distorts the whole image).

A trigger is a pattern and a mask at the image's size: the default `patch` is the BadEncoder one, a
10x10 white square at rows/cols 21-30 of a 32x32 image (scaled with the image size); files give any
other (an .npz with `pattern` HxWx3 uint8 and `mask` HxW in [0,1], or an RGBA .png whose alpha is
the mask).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class PatchTrigger:
    pattern: np.ndarray  # float32 [3, H, W] in [0, 1]
    mask: np.ndarray  # float32 [1, H, W] in [0, 1]

    def apply_float(self, images: np.ndarray) -> np.ndarray:
        """float [N, 3, H, W] in [0, 1] -> triggered, same range."""
        return images * (1 - self.mask) + self.pattern * self.mask

    def apply_uint8_nchw(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N, 3, H, W] -> triggered uint8 (rounded), what an attacker would upload."""
        out = self.apply_float(images.astype(np.float32) / 255.0)
        return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)


def white_square(size: tuple[int, int], start: int = 21, side: int = 10) -> PatchTrigger:
    """BadEncoder's default trigger, placed at the same relative position for other sizes."""
    h, w = size
    r0, c0 = round(start * h / 32), round(start * w / 32)
    rs, cs = max(1, round(side * h / 32)), max(1, round(side * w / 32))
    mask = np.zeros((1, h, w), np.float32)
    mask[:, r0 : r0 + rs, c0 : c0 + cs] = 1.0
    return PatchTrigger(pattern=np.ones((3, h, w), np.float32), mask=mask)


def load_trigger(name: str, size: tuple[int, int]) -> PatchTrigger:
    """`patch` or a trigger file, resized to `size` (H, W)."""
    if name == "patch":
        return white_square(size)
    path = Path(name)
    if not path.is_file():
        raise FileNotFoundError(f"trigger {name!r}: not `patch` and no such file")
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            pattern = np.asarray(archive["pattern"], dtype=np.float32)
            mask = np.asarray(archive["mask"], dtype=np.float32)
        if pattern.max() > 1.0:
            pattern = pattern / 255.0
    else:
        rgba = np.asarray(Image.open(path).convert("RGBA"), dtype=np.float32) / 255.0
        pattern, mask = rgba[..., :3], rgba[..., 3]
    pattern_img = Image.fromarray(np.uint8(np.clip(pattern, 0, 1) * 255)).resize(
        size[::-1], Image.Resampling.NEAREST
    )
    mask_img = Image.fromarray(np.uint8(np.clip(mask, 0, 1) * 255)).resize(
        size[::-1], Image.Resampling.NEAREST
    )
    return PatchTrigger(
        pattern=np.asarray(pattern_img, np.float32).transpose(2, 0, 1) / 255.0,
        mask=np.asarray(mask_img, np.float32)[None] / 255.0,
    )
