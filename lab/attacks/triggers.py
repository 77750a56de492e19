"""Triggers as the lab uses them: every one maps uint8 images to triggered uint8 images in PIXEL space,
BEFORE any normalization (the reference code pastes after normalization, which distorts the whole image).

Two kinds:
  - patch triggers (BadEncoder, DRUPE): x * (1 - mask) + pattern * mask on uint8/[0,1] images. The
    default `patch` is BadEncoder's, a 10x10 white square at rows/cols 21-30 of a 32x32 image (scaled
    with the image size); files give any other (an .npz with `pattern` HxWx3 uint8 and `mask` HxW in
    [0,1], or an RGBA .png whose alpha is the mask);
  - CTRL's frequency trigger: RGB -> YUV, orthonormal 2-D DCT over the whole image per channel, add a
    fixed magnitude at chosen frequencies of the U and V channels, inverse DCT, back to RGB, clamp.

`torch_patch` gives the torch form used inside attack training loops, where images are float [0, 1]
on the training device.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
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


class Trigger(Protocol):
    def apply_uint8_nchw(self, images: np.ndarray) -> np.ndarray: ...


def torch_patch(trigger: PatchTrigger, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """(pattern (1, 3, H, W), mask (1, 1, H, W)) float tensors: triggered = x * (1 - m) + p * m."""
    pattern = torch.from_numpy(trigger.pattern).unsqueeze(0).to(device)
    mask = torch.from_numpy(trigger.mask).unsqueeze(0).to(device)
    return pattern, mask


# RGB <-> YUV (BT.601, analogue form), on [0, 255] pixel values.
_RGB_TO_YUV = np.array(
    [[0.299, 0.587, 0.114], [-0.14713, -0.28886, 0.436], [0.615, -0.51499, -0.10001]], dtype=np.float64
)
_YUV_TO_RGB = np.linalg.inv(_RGB_TO_YUV)


def dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix C (n, n): coefficients = C @ x @ C.T, inverse = C.T @ X @ C."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    c = np.sqrt(2.0 / n) * np.cos(np.pi * (2 * i + 1) * k / (2 * n))
    c[0] /= np.sqrt(2.0)
    return c


@dataclass(frozen=True)
class FrequencyTrigger:
    """CTRL's trigger: +magnitude at each (row, col) frequency of the U and V channels' DCT."""

    magnitude: float = 100.0
    frequencies: tuple[tuple[int, int], ...] = ((15, 15), (31, 31))
    channels: tuple[int, ...] = (1, 2)  # U and V of YUV

    def apply_float255(self, images: np.ndarray) -> np.ndarray:
        """float [N, 3, H, W] in [0, 255] (square) -> triggered, unclamped."""
        n, _, h, w = images.shape
        if h != w:
            raise ValueError(f"the frequency trigger needs square images, got {h}x{w}")
        c = dct_matrix(h)
        yuv = np.einsum("ij,njhw->nihw", _RGB_TO_YUV, images.astype(np.float64))
        coeffs = c @ yuv @ c.T  # (N, 3, H, W) per-channel 2-D DCT
        scale = h / 32  # frequencies are given for 32 px; keep their relative position
        for row, col in self.frequencies:
            r, q = min(h - 1, round(row * scale)), min(w - 1, round(col * scale))
            for channel in self.channels:
                coeffs[:, channel, r, q] += self.magnitude
        yuv = c.T @ coeffs @ c
        return np.einsum("ij,njhw->nihw", _YUV_TO_RGB, yuv)

    def apply_uint8_nchw(self, images: np.ndarray) -> np.ndarray:
        out = self.apply_float255(images.astype(np.float64))
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def make_trigger(kind: str, size: tuple[int, int] = (32, 32)) -> Trigger:
    """`patch` (BadEncoder's white square), `ctrl` (frequency trigger), or a trigger file (.npz/.png)."""
    if kind == "ctrl":
        return FrequencyTrigger()
    return load_trigger(kind, size)


def apply_to_nhwc(trigger: Trigger, images_nhwc: np.ndarray) -> np.ndarray:
    """Convenience: uint8 NHWC in, uint8 NHWC out."""
    return trigger.apply_uint8_nchw(images_nhwc.transpose(0, 3, 1, 2)).transpose(0, 2, 3, 1).copy()
