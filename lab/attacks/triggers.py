"""Triggers as the lab uses them: every one maps images to triggered images in PIXEL space, BEFORE
any normalization (the reference code pastes after normalization, which distorts the whole image).

Every trigger has two forms of one rule: `apply_torch` (float [N, 3, H, W] in [0, 1], what attack
training loops use, on any device) and `apply_uint8_nchw` (uint8 in, uint8 out, rounded: what an
attacker would upload). Families, by name (`make_trigger`, `dede attack --trigger`, the suites):

  patch      BadEncoder's 10x10 white square at rows/cols 21-30 of a 32x32 image (scaled with size)
  checker    a small high-contrast pattern: a 6x6 black/white checkerboard (2 px cells) at 24-29
  noise      a random-noise patch: 8x8 uniform random colours (fixed seed) at 22-29
  blend      a full-image blend: x * (1 - 0.15) + 0.15 * a fixed random-colour image (Chen et al. 2017)
  invisible  a low-amplitude additive pattern: x + 6/255 * a fixed random +-1 pattern, clamped
  sig        a sinusoidal signal (Barni et al. 2019, SIG): x + 20/255 * sin(2 pi * 6 * col / W),
             the same horizontal stripes on every row and channel, clamped
  warp       a WaNet-style smooth warping field (Nguyen & Tran 2021): a fixed random 4x4 flow grid,
             upsampled bicubically to the image, displaces pixels by up to ~1 px; no pixel is added
  ctrl       CTRL's frequency trigger (below)
  <patch family>@random   the same patch at a uniformly random position per image (patch, checker,
             noise); the positions come from a seeded generator, so the same batch gets the same
             positions on every call of `apply_uint8_nchw`
Files give any other patch (an .npz with `pattern` HxWx3 uint8 and `mask` HxW in [0, 1], or an RGBA
.png whose alpha is the mask).

CTRL's frequency trigger: RGB -> YUV, orthonormal 2-D DCT over the whole image per channel, add a
fixed magnitude at chosen frequencies of the U and V channels, inverse DCT, back to RGB, clamp.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

TRIGGER_FAMILIES = ("patch", "checker", "noise", "blend", "invisible", "sig", "warp", "ctrl")
PATCH_FAMILIES = ("patch", "checker", "noise")
RANDOM_POSITION = "@random"


def _to_uint8(images_float: torch.Tensor) -> np.ndarray:
    return np.clip(np.rint(images_float.numpy() * 255.0), 0, 255).astype(np.uint8)


class PixelTrigger:
    """Base of the pixel-space triggers: `apply_uint8_nchw` through `apply_torch`, so both forms
    are one rule. `seed` fixes whatever is random at application time (random positions)."""

    seed: int = 0

    def apply_torch(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError

    def apply_float(self, images: np.ndarray) -> np.ndarray:
        """float [N, 3, H, W] in [0, 1] -> triggered, same range (deterministic)."""
        x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
        return self.apply_torch(x, torch.Generator().manual_seed(self.seed)).numpy()

    def apply_uint8_nchw(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N, 3, H, W] -> triggered uint8 (rounded), what an attacker would upload."""
        x = torch.from_numpy(np.ascontiguousarray(images)).float() / 255.0
        return _to_uint8(self.apply_torch(x, torch.Generator().manual_seed(self.seed)))


@dataclass(frozen=True)
class PatchTrigger(PixelTrigger):
    """x * (1 - mask) + pattern * mask. random_position: the patch (the mask's bounding box) moves
    to a uniformly random place inside the image, one draw per image."""

    pattern: np.ndarray  # float32 [3, H, W] in [0, 1]
    mask: np.ndarray  # float32 [1, H, W] in [0, 1]
    random_position: bool = False
    seed: int = 0

    def _box(self) -> tuple[int, int, int, int]:
        rows = np.flatnonzero(self.mask[0].any(axis=1))
        cols = np.flatnonzero(self.mask[0].any(axis=0))
        if len(rows) == 0:
            return 0, 0, 0, 0
        return int(rows[0]), int(cols[0]), int(rows[-1] + 1 - rows[0]), int(cols[-1] + 1 - cols[0])

    def apply_torch(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        pattern = torch.from_numpy(self.pattern).to(images.device, images.dtype)
        mask = torch.from_numpy(self.mask).to(images.device, images.dtype)
        if not self.random_position:
            return images * (1 - mask) + pattern * mask
        r0, c0, rs, cs = self._box()
        n, _, h, w = images.shape
        rows = torch.randint(0, h - rs + 1, (n,), generator=generator).tolist()
        cols = torch.randint(0, w - cs + 1, (n,), generator=generator).tolist()
        patch_p = pattern[:, r0 : r0 + rs, c0 : c0 + cs]
        patch_m = mask[:, r0 : r0 + rs, c0 : c0 + cs]
        full_p = torch.zeros((n, 3, h, w), dtype=images.dtype, device=images.device)
        full_m = torch.zeros((n, 1, h, w), dtype=images.dtype, device=images.device)
        for i, (r, c) in enumerate(zip(rows, cols, strict=True)):
            full_p[i, :, r : r + rs, c : c + cs] = patch_p
            full_m[i, :, r : r + rs, c : c + cs] = patch_m
        return images * (1 - full_m) + full_p * full_m


def _scaled_box(size: tuple[int, int], start: int, side: int) -> tuple[int, int, int, int]:
    """(row, col, rows, cols) of a square given for 32 px, at the same relative place for `size`."""
    h, w = size
    r0, c0 = round(start * h / 32), round(start * w / 32)
    rs, cs = max(1, round(side * h / 32)), max(1, round(side * w / 32))
    return r0, c0, rs, cs


def white_square(size: tuple[int, int], start: int = 21, side: int = 10) -> PatchTrigger:
    """BadEncoder's default trigger, placed at the same relative position for other sizes."""
    h, w = size
    r0, c0, rs, cs = _scaled_box(size, start, side)
    mask = np.zeros((1, h, w), np.float32)
    mask[:, r0 : r0 + rs, c0 : c0 + cs] = 1.0
    return PatchTrigger(pattern=np.ones((3, h, w), np.float32), mask=mask)


def checkerboard(size: tuple[int, int], start: int = 24, side: int = 6, cell: int = 2) -> PatchTrigger:
    """A small high-contrast pattern: black/white cells of `cell` px (scaled with the size)."""
    h, w = size
    r0, c0, rs, cs = _scaled_box(size, start, side)
    cell_px = max(1, round(cell * h / 32))
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    board = (((rows - r0) // cell_px + (cols - c0) // cell_px) % 2).astype(np.float32)
    mask = np.zeros((1, h, w), np.float32)
    mask[:, r0 : r0 + rs, c0 : c0 + cs] = 1.0
    return PatchTrigger(pattern=np.repeat(board[None], 3, axis=0), mask=mask)


def noise_patch(size: tuple[int, int], start: int = 22, side: int = 8, seed: int = 1) -> PatchTrigger:
    """A random-noise patch: uniform random colours per pixel, fixed by `seed`."""
    h, w = size
    r0, c0, rs, cs = _scaled_box(size, start, side)
    pattern = np.random.default_rng(seed).random((3, h, w)).astype(np.float32)
    mask = np.zeros((1, h, w), np.float32)
    mask[:, r0 : r0 + rs, c0 : c0 + cs] = 1.0
    return PatchTrigger(pattern=pattern, mask=mask)


@dataclass(frozen=True)
class BlendTrigger(PixelTrigger):
    """x * (1 - alpha) + alpha * image: the whole image carries the trigger."""

    image: np.ndarray  # float32 [3, H, W] in [0, 1]
    alpha: float = 0.15
    seed: int = 0

    def apply_torch(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        blend = torch.from_numpy(self.image).to(images.device, images.dtype)
        return images * (1 - self.alpha) + blend * self.alpha


def random_blend(size: tuple[int, int], alpha: float = 0.15, seed: int = 2) -> BlendTrigger:
    """A fixed random-colour image, in 2x2 px blocks (so resizing the input does not average it
    away entirely), blended at `alpha`."""
    h, w = size
    blocks = np.random.default_rng(seed).random((3, (h + 1) // 2, (w + 1) // 2)).astype(np.float32)
    image = np.kron(blocks, np.ones((1, 2, 2), np.float32))[:, :h, :w]
    return BlendTrigger(image=np.ascontiguousarray(image), alpha=alpha)


@dataclass(frozen=True)
class AdditiveTrigger(PixelTrigger):
    """clamp(x + amplitude * pattern): a low-amplitude, image-wide pattern (invisible at 6/255)."""

    pattern: np.ndarray  # float32 [3, H, W] in [-1, 1]
    amplitude: float = 6 / 255
    seed: int = 0

    def apply_torch(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        pattern = torch.from_numpy(self.pattern).to(images.device, images.dtype)
        return (images + self.amplitude * pattern).clamp(0, 1)


def invisible_pattern(size: tuple[int, int], amplitude: float = 6 / 255, seed: int = 3) -> AdditiveTrigger:
    """A fixed random +-1 pattern per pixel and channel, scaled to `amplitude`."""
    h, w = size
    signs = np.random.default_rng(seed).integers(0, 2, (3, h, w)).astype(np.float32) * 2 - 1
    return AdditiveTrigger(pattern=signs, amplitude=amplitude)


def sinusoidal_signal(
    size: tuple[int, int], amplitude: float = 20 / 255, frequency: int = 6
) -> AdditiveTrigger:
    """SIG's ramp-free signal: `frequency` periods of a sine across the image's width, the same on
    every row and channel, scaled to `amplitude` (SIG's 20 of 255 and 6 periods on 32 px images)."""
    h, w = size
    stripes = np.sin(2 * np.pi * frequency * np.arange(w) / w).astype(np.float32)
    pattern = np.broadcast_to(stripes, (3, h, w))
    return AdditiveTrigger(pattern=np.ascontiguousarray(pattern), amplitude=amplitude)


@dataclass(frozen=True)
class WarpTrigger(PixelTrigger):
    """WaNet-style: every image resampled through one fixed, smooth displacement field (bilinear,
    border padding). No pixel value is added; only positions move."""

    flow: np.ndarray  # float32 [H, W, 2] displacement in grid_sample's [-1, 1] coordinates (x, y)
    seed: int = 0

    def apply_torch(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        n, _, h, w = images.shape
        if self.flow.shape[:2] != (h, w):
            raise ValueError(f"warp field is {self.flow.shape[:2]}, images are {h}x{w}")
        ys = torch.linspace(-1, 1, h, device=images.device, dtype=images.dtype)
        xs = torch.linspace(-1, 1, w, device=images.device, dtype=images.dtype)
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        identity = torch.stack([gx, gy], dim=-1)
        grid = (identity + torch.from_numpy(self.flow).to(images.device, images.dtype)).clamp(-1, 1)
        return _resample(images, grid.unsqueeze(0).expand(n, h, w, 2))

    def near_miss(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """WaNet's noise mode: the field plus independent noise of up to half a pixel per position
        and image. The fine-tune keeps these at their clean embedding, so that the backdoor answers
        this field only, not any slight resampling (without it, a warp backdoor also fires on
        blurred or resized images: the clean embeddings suffer, and so does any rebuild of them)."""
        n, _, h, w = images.shape
        ys = torch.linspace(-1, 1, h, device=images.device, dtype=images.dtype)
        xs = torch.linspace(-1, 1, w, device=images.device, dtype=images.dtype)
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        identity = torch.stack([gx, gy], dim=-1).unsqueeze(0)
        noise = (torch.rand(n, h, w, 2, generator=generator) * 2 - 1).to(images.device, images.dtype)
        pixel = torch.tensor([2 / (w - 1), 2 / (h - 1)], device=images.device, dtype=images.dtype)
        flow = torch.from_numpy(self.flow).to(images.device, images.dtype).unsqueeze(0)
        return _resample(images, (identity + flow + 0.5 * noise * pixel).clamp(-1, 1))


def _resample(images: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=True)


def smooth_warp(size: tuple[int, int], grid: int = 4, strength: float = 1.0, seed: int = 4) -> WarpTrigger:
    """WaNet's field: uniform [-1, 1] flow on a `grid` x `grid` control grid, normalised by its mean
    absolute value, upsampled bicubically and scaled so the mean displacement is `strength` px."""
    h, w = size
    control = torch.from_numpy(
        np.random.default_rng(seed).uniform(-1, 1, (1, 2, grid, grid)).astype(np.float32)
    )
    control = control / control.abs().mean()
    field = F.interpolate(control, size=(h, w), mode="bicubic", align_corners=True)[0]  # (2, H, W)
    # One pixel is 2 / (side - 1) in grid_sample's coordinates (align_corners=True).
    scale = torch.tensor([2 / (w - 1), 2 / (h - 1)]).view(2, 1, 1) * strength
    return WarpTrigger(flow=np.ascontiguousarray((field * scale).permute(1, 2, 0).numpy()))


def load_trigger(name: str, size: tuple[int, int]) -> PatchTrigger:
    """`patch` or a patch trigger file, resized to `size` (H, W)."""
    if name == "patch":
        return white_square(size)
    path = Path(name)
    if not path.is_file():
        raise FileNotFoundError(
            f"trigger {name!r}: not one of {', '.join(TRIGGER_FAMILIES)} (optionally {RANDOM_POSITION} "
            "for a patch family) and no such file"
        )
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

    def apply_torch(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor: ...


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

    def apply_torch(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The same rule on float [0, 1] tensors (through NumPy: CTRL poisons data, no training loop
        calls this per step)."""
        out = self.apply_float255(images.detach().cpu().double().numpy() * 255.0) / 255.0
        return torch.from_numpy(np.clip(out, 0, 1)).to(images.device, images.dtype)


def make_trigger(kind: str, size: tuple[int, int] = (32, 32)) -> Trigger:
    """A trigger family by name (module docstring), `<patch family>@random`, or a trigger file."""
    family, random_position = kind, False
    if kind.endswith(RANDOM_POSITION):
        family, random_position = kind.removesuffix(RANDOM_POSITION), True
        if family not in PATCH_FAMILIES:
            raise ValueError(
                f"trigger {kind!r}: {RANDOM_POSITION} applies to the patch families "
                f"({', '.join(PATCH_FAMILIES)}), not to {family!r}"
            )
    makers = {
        "patch": white_square,
        "checker": checkerboard,
        "noise": noise_patch,
        "blend": random_blend,
        "invisible": invisible_pattern,
        "sig": sinusoidal_signal,
        "warp": smooth_warp,
    }
    if family == "ctrl":
        return FrequencyTrigger()
    if family in makers:
        trigger = makers[family](size)
        return replace(trigger, random_position=True) if random_position else trigger
    return load_trigger(kind, size)


def apply_to_nhwc(trigger: Trigger, images_nhwc: np.ndarray) -> np.ndarray:
    """Convenience: uint8 NHWC in, uint8 NHWC out."""
    return trigger.apply_uint8_nchw(images_nhwc.transpose(0, 3, 1, 2)).transpose(0, 2, 3, 1).copy()
