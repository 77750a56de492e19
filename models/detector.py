"""The fused detector: uint8 images -> normalize -> frozen encoder -> DeDe decoder -> score.

This is the module that is exported as ONE ONNX graph, so the service runs exactly what was
calibrated. The test-time visible patches are a fixed buffer (deterministic scores).
"""

from __future__ import annotations

import torch
from torch import nn

from models.decoder import DeDeDecoder, masked_patch_error, unpatchify

# How per-patch errors become one score: the sum is the method's; the max looks at the worst patch
# (a local trigger changes few patches, which a sum over the whole image can dilute).
SCORE_KINDS = ("sse", "max_patch")


class Normalize(nn.Module):
    """uint8 (N, 3, H, W) -> float normalized with the encoder's mean/std."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (images.to(self.mean.dtype) / 255.0 - self.mean) / self.std


class DetectorHead(nn.Module):
    """(uint8 images, embeddings) -> (score, reconstruction). Used alone when the encoder is an
    ONNX black box: the export then composes the encoder's graph in front of this one."""

    def __init__(
        self,
        decoder: DeDeDecoder,
        visible: list[int],
        mean: tuple[float, ...],
        std: tuple[float, ...],
        score_kind: str = "sse",
    ) -> None:
        super().__init__()
        if score_kind not in SCORE_KINDS:
            raise ValueError(f"score kind {score_kind!r} is not one of {SCORE_KINDS}")
        self.normalize = Normalize(mean, std)
        self.decoder = decoder
        self.score_kind = score_kind
        self.register_buffer("visible", torch.tensor(visible, dtype=torch.long).view(1, -1))

    def forward(self, images: torch.Tensor, embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.normalize(images)
        visible = self.visible.expand(x.shape[0], -1)
        pred = self.decoder(x, embedding.to(x.dtype), visible)
        error = masked_patch_error(pred, x, visible, self.decoder.config.patch_size)  # (N, L)
        score = error.sum(dim=1) if self.score_kind == "sse" else error.amax(dim=1)
        p = self.decoder.config.patch_size
        return score, unpatchify(pred, p, x.shape[2], x.shape[3])


class Detector(nn.Module):
    """uint8 images (N, 3, H, W) -> (score (N,), reconstruction (N, 3, H, W) normalized)."""

    def __init__(self, encoder: nn.Module, head: DetectorHead) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = self.encoder(self.head.normalize(images))
        return self.head(images, embedding)
