"""A convolutional DeDe decoder: the image rebuilt from the frozen encoder's embedding alone.

At test time the method shows the decoder no patch of the input (mask ratio 0.99 on an 8 x 8 grid
keeps none), so what it must learn is embedding -> image. This family does only that:

  embedding -> standardised with the auxiliary set's per-dimension mean and std (buffers, so the
  exported graph applies them) -> linear -> (width, g, g) -> k stages of [2x transposed conv,
  batch norm, GELU] -> 3x3 conv to 3 channels, in the encoder's normalized pixel space.

g is the image side divided by 2^k, with k the largest number of halvings that leaves g >= 4
(32 px: g = 4, k = 3; 64 px: 4, 4; 224 px: 7, 5). Channels halve at every stage, from `width`.
Standardising the embedding matters: SSL embeddings differ in scale by orders of magnitude between
encoders (and a backdoor may inflate the norm), and the decoder should see the same numeric range
whatever encoder it is fitted on.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

FAMILY = "conv"


@dataclass(frozen=True)
class ConvDecoderConfig:
    image_size: int = 32
    width: int = 128  # channels at the smallest grid; halved at every upsampling stage
    min_width: int = 32
    family: str = FAMILY

    @property
    def stages(self) -> int:
        k = 0
        while self.image_size % (2 ** (k + 1)) == 0 and self.image_size // 2 ** (k + 1) >= 4:
            k += 1
        return k

    @property
    def grid(self) -> int:
        return self.image_size // 2**self.stages

    def to_dict(self) -> dict[str, int | str]:
        return asdict(self)


CONV_PRESETS: dict[str, ConvDecoderConfig] = {
    # Sized for 2 CPU cores: about 35M multiply-adds per 32 px image (0.4M parameters with a
    # 128-d embedding), so a few thousand steps fit in minutes.
    "conv": ConvDecoderConfig(width=128),
    # For GPUs: four times the channels at every stage.
    "conv_paper": ConvDecoderConfig(width=512, min_width=128),
    # For tests only.
    "conv_tiny": ConvDecoderConfig(width=32, min_width=8),
}


def conv_preset_config(name: str, image_size: int, **overrides: int) -> ConvDecoderConfig:
    if name not in CONV_PRESETS:
        raise ValueError(f"unknown conv decoder preset {name!r}; known: {', '.join(CONV_PRESETS)}")
    config = replace(CONV_PRESETS[name], image_size=image_size, **overrides)
    if config.stages == 0:
        raise ValueError(
            f"image size {image_size} is too small or odd for the conv decoder (needs 8 px or more)"
        )
    return config


def _stage(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.ConvTranspose2d(c_in, c_out, kernel_size=4, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.GELU(),
    )


class ConvDecoder(nn.Module):
    """embedding (N, D) -> rebuilt image (N, 3, H, W) in the encoder's normalized pixel space."""

    def __init__(self, config: ConvDecoderConfig, embedding_dim: int) -> None:
        super().__init__()
        self.config = config
        self.embedding_dim = embedding_dim
        # Set from the auxiliary embeddings before training (`set_embedding_stats`); saved with
        # the weights and applied inside the exported graph.
        self.register_buffer("embedding_mean", torch.zeros(embedding_dim))
        self.register_buffer("embedding_std", torch.ones(embedding_dim))
        g, width = config.grid, config.width
        self.project = nn.Sequential(nn.Linear(embedding_dim, width * g * g), nn.GELU())
        floor = min(config.min_width, width)  # a width below min_width keeps its width throughout
        channels = [max(floor, width // 2**i) for i in range(config.stages + 1)]
        self.stages = nn.Sequential(*(_stage(channels[i], channels[i + 1]) for i in range(config.stages)))
        self.to_pixels = nn.Conv2d(channels[-1], 3, kernel_size=3, padding=1)

    @torch.no_grad()
    def set_embedding_stats(self, embeddings: torch.Tensor) -> None:
        """Per-dimension mean and std of the auxiliary set's embeddings (std floored, so a constant
        dimension is not blown up)."""
        embeddings = embeddings.double()
        std = embeddings.std(dim=0)
        self.embedding_mean.copy_(embeddings.mean(dim=0).float())
        self.embedding_std.copy_(std.clamp_min(1e-6 * max(float(std.max()), 1e-12)).float())

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        z = (embedding.to(self.embedding_mean.dtype) - self.embedding_mean) / self.embedding_std
        g = self.config.grid
        x = self.project(z).view(z.shape[0], self.config.width, g, g)
        return self.to_pixels(self.stages(x))
