"""The DeDe decoder: an MAE-style ViT that rebuilds an image from the frozen encoder's embedding.

Reading order: config and presets, patchify helpers, the model (encode visible patches, replace the
global token with the embedding's projection, decode all patches), the training loss and the
detection score.

Shapes: images (N, 3, H, W) -> patches (N, L, p*p*3) with L = (H/p) * (W/p).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class DecoderConfig:
    image_size: int = 32
    patch_size: int = 4
    width: int = 192  # token width of the patch encoder and the decoder
    depth: int = 12  # patch-encoder blocks
    decoder_depth: int = 4
    heads: int = 3
    mlp_ratio: float = 4.0
    mask_ratio_train: float = 0.9
    mask_ratio_test: float = 0.99
    mask_seed: int = 0  # fixes the test-time visible patches, so scores are deterministic
    # Share of training batches shown the test-time mask (at 32 px with patch 4: no patch at all),
    # so the decoder is trained on the task it is scored on; the rest get the random training mask.
    test_mask_share: float = 0.5
    family: str = "mae"

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


PRESETS: dict[str, DecoderConfig] = {
    # The reference configuration (for GPUs).
    "paper": DecoderConfig(),
    # Sized for 2 CPU cores: see benchmarks/fit/REPORT.md for the loss curves behind the choice.
    "lab": DecoderConfig(width=96, depth=2, decoder_depth=2, heads=3),
    # More capacity where it counts at test time: with no patch visible, the image is rebuilt by
    # the decoder blocks from the embedding alone, so they get the extra width and depth.
    "lab_wide": DecoderConfig(width=128, depth=2, decoder_depth=4, heads=4),
    # For tests only: a few thousand parameters.
    "tiny": DecoderConfig(width=32, depth=1, decoder_depth=1, heads=2),
    "tiny_wide": DecoderConfig(width=48, depth=1, decoder_depth=2, heads=2),
}


# Patches per side at any resolution, unless a patch size is given: the presets were sized and
# measured on an 8 x 8 token grid (32 px, patch 4), and the decoder's cost grows with the square of
# the token count, so larger inputs get larger patches (64 px: 8, 96 px: 12, 224 px: 28).
TOKEN_GRID = 8


def preset_config(name: str, image_size: int, **overrides: float | int) -> DecoderConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown decoder preset {name!r}; known: {', '.join(PRESETS)}")
    if "patch_size" not in overrides and image_size > PRESETS[name].patch_size * TOKEN_GRID:
        overrides = {**overrides, "patch_size": max(1, image_size // TOKEN_GRID)}
    config = replace(PRESETS[name], image_size=image_size, **overrides)
    if image_size % config.patch_size:
        raise ValueError(f"image size {image_size} is not a multiple of patch size {config.patch_size}")
    return config


def fixed_visible_patches(config: DecoderConfig) -> list[int]:
    """The test-time visible patches: a seeded choice, recorded in the bundle's manifest."""
    keep = int(config.num_patches * (1 - config.mask_ratio_test))
    order = np.random.default_rng(config.mask_seed).permutation(config.num_patches)
    return sorted(int(i) for i in order[:keep])


def patchify(images: torch.Tensor, p: int) -> torch.Tensor:
    """(N, 3, H, W) -> (N, L, p*p*3), patches in row-major order."""
    n, c, h, w = images.shape
    x = images.reshape(n, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(n, (h // p) * (w // p), p * p * c)


def unpatchify(patches: torch.Tensor, p: int, h: int, w: int) -> torch.Tensor:
    """(N, L, p*p*3) -> (N, 3, H, W)."""
    n = patches.shape[0]
    x = patches.reshape(n, h // p, w // p, p, p, 3)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(n, 3, h, w)


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class DeDeDecoder(nn.Module):
    def __init__(self, config: DecoderConfig, embedding_dim: int) -> None:
        super().__init__()
        self.config = config
        self.embedding_dim = embedding_dim
        c, p, width = config, config.patch_size, config.width
        self.patch_embed = nn.Conv2d(3, width, kernel_size=p, stride=p)
        self.pos_embed = nn.Parameter(torch.zeros(1, c.num_patches, width))
        self.global_token = nn.Parameter(torch.zeros(1, 1, width))
        self.blocks = nn.ModuleList(Block(width, c.heads, c.mlp_ratio) for _ in range(c.depth))
        self.norm = nn.LayerNorm(width)
        # The embedding's projection replaces the global token: bias-free, as in the method.
        self.embedding_proj = nn.Linear(embedding_dim, width, bias=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, c.num_patches, width))
        self.decoder_blocks = nn.ModuleList(
            Block(width, c.heads, c.mlp_ratio) for _ in range(c.decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, p * p * 3)
        for param in (self.pos_embed, self.global_token, self.mask_token, self.decoder_pos_embed):
            nn.init.normal_(param, std=0.02)

    def encode_visible(self, images: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """images (N, 3, H, W) normalized, visible (N, K) patch indices -> tokens (N, K, width)."""
        tokens = self.patch_embed(images).flatten(2).transpose(1, 2) + self.pos_embed  # (N, L, width)
        index = visible.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])
        tokens = torch.gather(tokens, 1, index)
        x = torch.cat([self.global_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 1:]

    def forward(self, images: torch.Tensor, embedding: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """Rebuild all patches: (N, 3, H, W), (N, D), (N, K) -> predicted patches (N, L, p*p*3).

        With K = 0 (the test-time default on 32x32) the rebuild comes from the embedding alone.
        """
        n, num_patches = embedding.shape[0], self.config.num_patches
        global_token = self.embedding_proj(embedding).unsqueeze(1)  # (N, 1, width)
        x = self.mask_token.expand(n, num_patches, -1)
        if visible.shape[1] > 0:
            seen = self.encode_visible(images, visible)
            index = visible.unsqueeze(-1).expand(-1, -1, seen.shape[-1])
            x = x.scatter(1, index, seen)
        x = torch.cat([global_token, x + self.decoder_pos_embed], dim=1)
        for block in self.decoder_blocks:
            x = block(x)
        return self.head(self.decoder_norm(x))[:, 1:]

    def random_visible(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Training-time mask: (N, K) random visible indices per image."""
        keep = int(self.config.num_patches * (1 - self.config.mask_ratio_train))
        noise = torch.rand(n, self.config.num_patches, generator=generator)
        return noise.argsort(dim=1)[:, :keep].to(self.pos_embed.device)


def masked_patch_error(
    pred: torch.Tensor, images: torch.Tensor, visible: torch.Tensor, patch_size: int
) -> torch.Tensor:
    """Squared error per image and patch (N, L), zeroed on the visible patches."""
    target = patchify(images, patch_size)
    error = (pred - target).pow(2).sum(dim=-1)
    masked = torch.ones_like(error)
    if visible.shape[1] > 0:
        masked = masked.scatter(1, visible, 0.0)
    return error * masked


def training_loss(
    pred: torch.Tensor, images: torch.Tensor, visible: torch.Tensor, patch_size: int
) -> torch.Tensor:
    """Mean squared error per pixel over the masked patches (normalized pixel space)."""
    error = masked_patch_error(pred, images, visible, patch_size)
    masked_count = (error.shape[1] - visible.shape[1]) * patch_size * patch_size * 3
    return error.sum() / (error.shape[0] * masked_count)
